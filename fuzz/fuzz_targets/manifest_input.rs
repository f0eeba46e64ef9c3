//! What a committee member decodes to check a manifest: the round (`SecureRound`, with the
//! committee and parameters, validated), and the signed upload records of `DecryptionInput`.
#![no_main]

use cohort_protocol::pb;
use cohort_protocol::secure::{record_from_pb, round_from_pb, sealed_from_pb};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let (first, second) = data.split_at(data.len() / 2);
    if let Ok(r) = pb::SecureRound::decode(first)
        && let Ok(info) = round_from_pb("j", 1, &r)
    {
        let _ = info.validate();
        let _ = info.weight_for(u64::from_le_bytes([0xff; 8]));
    }
    if let Ok(input) = pb::DecryptionInput::decode(second) {
        match input.kind {
            Some(pb::decryption_input::Kind::Upload(u)) => {
                if let Ok((rec, keys)) = record_from_pb(&u) {
                    let _ = rec.piece_hashes.len();
                    let _ = keys.binding.is_some();
                }
            }
            Some(pb::decryption_input::Kind::Piece(p)) => {
                if let Some(sp) = p.piece.as_ref() {
                    let _ = sealed_from_pb(sp);
                }
            }
            None => {}
        }
    }
});
