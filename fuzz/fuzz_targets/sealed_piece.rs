//! A sealed key piece as a committee member receives it: decoded, then opened with the
//! member's key in a fixed context. Nothing may panic; forged pieces must not open.
#![no_main]

use cohort_crypto::seal::{SealContext, open};
use cohort_crypto::sharing::Piece;
use cohort_crypto::{MemberSecret, RoundSeed};
use cohort_protocol::pb;
use cohort_protocol::secure::sealed_from_pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = pb::SealedPiece::decode(data) else {
        return;
    };
    let Ok(sp) = sealed_from_pb(&p) else {
        return;
    };
    let mut rng = <rand::rngs::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
    let me = MemberSecret::generate(&mut rng);
    let ctx = SealContext {
        job: "j".into(),
        round: 1,
        attempt: 1,
        seed: RoundSeed(7),
        sender: "p".into(),
        recipient: sp.recipient.clone(),
        piece: sp.piece,
    };
    if let Ok(words) = open(&me, &ctx, &sp.sealed) {
        let _ = Piece::from_words(words, 2048);
        panic!("a piece nobody sealed to this key opened");
    }
});
