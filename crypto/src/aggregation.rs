//! One secure-aggregation round as each party runs it, still without I/O: what a participant
//! sends ([`protect`]), what the coordinator checks and keeps ([`UploadRecord`]), what a
//! committee member answers ([`answer`]) and how its answer is checked ([`verify_share`]).
//! The transport (gRPC messages, chunking) lives in `protocol`; the coordinator's state
//! machine and the participant's agent call these functions.

use std::collections::BTreeMap;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::CryptoError;
use crate::codec::Codec;
use crate::params::{BODY_DROPPED_BITS, GlweParams, RoundSeed};
use crate::policy::Manifest;
use crate::seal::{MemberPublic, Sealed};
use crate::sharing::Committee;
use crate::sign::{Kind, VerifyKey, share_digest, upload_digest, verify};
// The homomorphic half: what participants and committee members run.
#[cfg(feature = "he")]
use crate::glwe::{RoundKey, decryption_share_threads, default_threads, encrypt_threads};
#[cfg(feature = "he")]
use crate::policy::{MemberPolicy, SeedLog};
#[cfg(feature = "he")]
use crate::seal::{MemberSecret, Opener, SealContext, Sealer};
#[cfg(feature = "he")]
use crate::sharing::Piece;
#[cfg(feature = "he")]
use crate::sign::{Signer25519, share_sha256};
#[cfg(feature = "he")]
use rand::Rng;

/// The scheme's name, as reported by simulations and in reports.
pub const SCHEME: &str = "threshold-glwe";

/// A committee member as a round names it: its id and public keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: String,
    pub seal_key: MemberPublic,
    pub verify_key: VerifyKey,
    /// Proof that the keys are the identity's own (with mutual TLS).
    pub binding: Option<KeyBinding>,
}

/// A participant's public keys for secure aggregation, as it announced them when joining.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeys {
    pub seal: MemberPublic,
    pub verify: VerifyKey,
    /// Proof that the keys are the identity's own (with mutual TLS).
    pub binding: Option<KeyBinding>,
}

impl PublicKeys {
    /// Checks that these are `id`'s own keys, bound to its certificate (valid at `now`)
    /// from `ca_pem`'s CA.
    pub fn check(&self, ca_pem: &str, id: &str, now: SystemTime) -> Result<(), CryptoError> {
        KeyBinding::check(
            self.binding.as_ref(),
            ca_pem,
            id,
            &self.seal.0,
            &self.verify.0,
            now,
        )
    }
}

/// A participant's certificate (DER) and its key's signature over its secure-aggregation
/// keys ([`crate::pki::binding_message`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBinding {
    pub certificate: Vec<u8>,
    pub signature: Vec<u8>,
}

impl KeyBinding {
    /// Checks that `id`'s keys `seal`/`verify` are bound to `id`'s certificate from the CA
    /// of `ca_pem`, valid at `now`.
    pub fn check(
        binding: Option<&KeyBinding>,
        ca_pem: &str,
        id: &str,
        seal: &[u8; 32],
        verify: &[u8; 32],
        now: SystemTime,
    ) -> Result<(), CryptoError> {
        let b = binding.ok_or_else(|| {
            CryptoError::Pki(format!(
                "{id:?}'s keys come without a certificate binding: refusing them"
            ))
        })?;
        crate::pki::verify_binding(
            ca_pem,
            &b.certificate,
            id,
            &crate::pki::binding_message(seal, verify),
            &b.signature,
            now,
        )
    }
}

/// Examples per unit of aggregation weight for a round of `participants` whose examples add
/// up to `total_examples`, so that their weights (each at least 1) add up to at most
/// `max_total_weight`.
pub fn weight_unit(total_examples: u64, participants: usize, max_total_weight: u64) -> u64 {
    let room = max_total_weight.saturating_sub(participants as u64).max(1);
    total_examples.div_ceil(room).max(1)
}

/// The weight a participant with `num_examples` declares under `unit`: rounded, at least 1.
pub fn weight_for(num_examples: u64, unit: u64, max_total_weight: u64) -> u64 {
    let unit = unit.max(1);
    (num_examples.saturating_add(unit / 2) / unit).clamp(1, max_total_weight)
}

impl RoundInfo {
    /// Checks every committee member's key binding against the federation CA, at `now`.
    pub fn check_bindings(&self, ca_pem: &str, now: SystemTime) -> Result<(), CryptoError> {
        for m in &self.committee {
            KeyBinding::check(
                m.binding.as_ref(),
                ca_pem,
                &m.id,
                &m.seal_key.0,
                &m.verify_key.0,
                now,
            )?;
        }
        Ok(())
    }
}

/// Everything a round's parties must agree on. The coordinator sends it with each task.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundInfo {
    pub job: String,
    pub round: u64,
    pub attempt: u32,
    pub seed: RoundSeed,
    pub committee: Vec<MemberInfo>,
    /// Members needed to decrypt: a strict majority of the committee.
    pub threshold: usize,
    /// Fewest participants a manifest may list.
    pub t_min: usize,
    pub codec: Codec,
    pub params: GlweParams,
    /// Training examples per unit of aggregation weight: each participant declares
    /// `round(examples / weight_unit)`, at least 1, and signs it.
    pub weight_unit: u64,
}

impl RoundInfo {
    /// Checks the round's settings (committee, threshold, capacity); returns the committee.
    pub fn validate(&self) -> Result<Committee, CryptoError> {
        let committee = Committee::new(self.committee.len(), self.threshold)?;
        let mut ids: Vec<&str> = self.committee.iter().map(|m| m.id.as_str()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(CryptoError::Committee(
                "a member appears twice in the committee".into(),
            ));
        }
        if self.weight_unit == 0 {
            return Err(CryptoError::Committee(
                "weight_unit must be at least 1".into(),
            ));
        }
        if self.t_min == 0 {
            return Err(CryptoError::Committee("t_min must be at least 1".into()));
        }
        if !(256..=1 << 14).contains(&self.params.polynomial_size)
            || !self.params.polynomial_size.is_power_of_two()
        {
            return Err(CryptoError::Committee(format!(
                "polynomial size {} is not a power of two in 256..=16384",
                self.params.polynomial_size
            )));
        }
        self.codec.check(&self.params.budget(committee.pieces()))?;
        Ok(committee)
    }

    /// The aggregation weight a participant with `num_examples` declares.
    pub fn weight_for(&self, num_examples: u64) -> u64 {
        weight_for(num_examples, self.weight_unit, self.codec.max_total_weight)
    }

    pub fn member_index(&self, id: &str) -> Option<usize> {
        self.committee.iter().position(|m| m.id == id)
    }

    #[cfg(feature = "he")]
    fn seal_context(&self, sender: &str, recipient: &str, piece: u32) -> SealContext {
        SealContext {
            job: self.job.clone(),
            round: self.round,
            attempt: self.attempt,
            seed: self.seed,
            sender: sender.to_string(),
            recipient: recipient.to_string(),
            piece,
        }
    }

    /// The manifest of this round for `entries` (participant, weight).
    pub fn manifest(&self, entries: Vec<(String, u64)>) -> Manifest {
        Manifest {
            job: self.job.clone(),
            round: self.round,
            attempt: self.attempt,
            seed: self.seed,
            entries,
        }
    }
}

/// A key piece sealed to one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedPiece {
    pub recipient: String,
    pub piece: u32,
    pub sealed: Sealed,
}

impl SealedPiece {
    /// SHA-256 of the sealed piece as sent; the upload signature covers these.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"cohort.v1/sealed-piece-hash");
        h.update((self.recipient.len() as u64).to_le_bytes());
        h.update(self.recipient.as_bytes());
        h.update(self.piece.to_le_bytes());
        h.update(self.sealed.ephemeral);
        h.update((self.sealed.ciphertext.len() as u64).to_le_bytes());
        h.update(&self.sealed.ciphertext);
        h.finalize().into()
    }
}

/// The 6 bytes a body travels as: its top 48 bits, little-endian (its low
/// [`BODY_DROPPED_BITS`] are zero after [`crate::params::round_body`]).
pub fn body_wire_bytes(body: u64) -> [u8; 6] {
    let b = (body >> BODY_DROPPED_BITS).to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

/// A body from its 6 wire bytes.
pub fn body_from_wire(bytes: &[u8; 6]) -> u64 {
    let mut b = [0u8; 8];
    b[..6].copy_from_slice(bytes);
    u64::from_le_bytes(b) << BODY_DROPPED_BITS
}

/// SHA-256 of the bodies as sent ([`body_wire_bytes`]): the upload stream's digest.
pub fn bodies_sha256(bodies: &[u64]) -> [u8; 32] {
    let mut h = Sha256::new();
    for v in bodies {
        h.update(body_wire_bytes(*v));
    }
    h.finalize().into()
}

/// What an upload signature covers besides its context: the bodies and every sealed piece.
pub fn payload_digest(bodies_sha256: &[u8; 32], piece_hashes: &[[u8; 32]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"cohort.v1/upload-payload");
    h.update(bodies_sha256);
    h.update((piece_hashes.len() as u64).to_le_bytes());
    for p in piece_hashes {
        h.update(p);
    }
    h.finalize().into()
}

/// A participant's encrypted, signed update, ready to send.
#[derive(Debug, Clone)]
pub struct ProtectedUpdate {
    pub weight: u64,
    /// Ciphertext bodies (6 bytes per value on the wire, padded to whole ciphertexts).
    pub bodies: Vec<u64>,
    /// Their SHA-256 ([`bodies_sha256`]), which the signature covers.
    pub bodies_sha256: [u8; 32],
    pub pieces: Vec<SealedPiece>,
    pub signature: [u8; 64],
}

#[cfg(feature = "he")]
/// Encrypts `update` for the round: a fresh key, the bodies, the key's pieces sealed to the
/// members that hold them, and a signature binding the round, the declared weight and all of
/// it. Refuses a seed seen before (`seeds`) and an invalid round.
pub fn protect(
    info: &RoundInfo,
    me: &str,
    signer: &Signer25519,
    seeds: &mut SeedLog,
    update: &[f32],
    num_examples: u64,
    rng: &mut impl Rng,
) -> Result<ProtectedUpdate, CryptoError> {
    let threads = default_threads();
    protect_on(info, me, signer, seeds, update, num_examples, rng, threads)
}

/// [`protect`] with the encryption on `threads` threads (1 when the caller already runs
/// many participants in parallel, as a simulation does); the result does not depend on it.
#[cfg(feature = "he")]
#[allow(clippy::too_many_arguments)]
pub fn protect_on(
    info: &RoundInfo,
    me: &str,
    signer: &Signer25519,
    seeds: &mut SeedLog,
    update: &[f32],
    num_examples: u64,
    rng: &mut impl Rng,
    threads: usize,
) -> Result<ProtectedUpdate, CryptoError> {
    let messages: Vec<i64> = update.iter().map(|&x| info.codec.encode(x)).collect();
    protect_messages(
        info,
        me,
        signer,
        seeds,
        &messages,
        num_examples,
        rng,
        threads,
    )
}

/// [`protect_on`] for messages already encoded (by [`crate::dp::noised_messages`] under
/// distributed differential privacy).
#[cfg(feature = "he")]
#[allow(clippy::too_many_arguments)]
pub fn protect_messages(
    info: &RoundInfo,
    me: &str,
    signer: &Signer25519,
    seeds: &mut SeedLog,
    messages: &[i64],
    num_examples: u64,
    rng: &mut impl Rng,
    threads: usize,
) -> Result<ProtectedUpdate, CryptoError> {
    let committee = info.validate()?;
    seeds.use_seed(info.seed)?;
    let weight = info.weight_for(num_examples);
    let key = RoundKey::generate(&info.params, rng);
    let bodies = encrypt_threads(
        &key,
        info.seed,
        messages,
        &info.codec,
        &info.params,
        rng,
        threads,
    );
    let mut pieces = Vec::new();
    let mut sealer = Sealer::new(rng);
    for (k, piece) in committee
        .share_compact(key.coefficients(), rng)
        .iter()
        .enumerate()
    {
        for (m, member) in info.committee.iter().enumerate() {
            if committee.holds(m, k) {
                let ctx = info.seal_context(me, &member.id, k as u32);
                pieces.push(SealedPiece {
                    recipient: member.id.clone(),
                    piece: k as u32,
                    sealed: sealer.seal(&member.seal_key, &ctx, piece.words())?,
                });
            }
        }
    }
    let hashes: Vec<[u8; 32]> = pieces.iter().map(SealedPiece::hash).collect();
    let digest_of_bodies = bodies_sha256(&bodies);
    let digest = upload_digest(
        &info.job,
        info.round,
        info.seed,
        me,
        weight,
        &payload_digest(&digest_of_bodies, &hashes),
    );
    Ok(ProtectedUpdate {
        weight,
        bodies,
        bodies_sha256: digest_of_bodies,
        pieces,
        signature: signer.sign(Kind::Upload, &digest),
    })
}

/// What the coordinator keeps of an accepted upload and relays to the committee: enough to
/// verify the participant's signature (and so its declared weight), not its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    pub participant: String,
    pub weight: u64,
    pub bodies_sha256: [u8; 32],
    pub piece_hashes: Vec<[u8; 32]>,
    pub signature: [u8; 64],
}

impl UploadRecord {
    /// Checks the participant's signature over this record in `info`'s round.
    pub fn verify(&self, info: &RoundInfo, key: &VerifyKey) -> Result<(), CryptoError> {
        let digest = upload_digest(
            &info.job,
            info.round,
            info.seed,
            &self.participant,
            self.weight,
            &payload_digest(&self.bodies_sha256, &self.piece_hashes),
        );
        verify(key, Kind::Upload, &digest, &self.signature)
    }
}

/// Checks that `pieces` hold exactly one sealed piece for every (piece, holder) pair of the
/// committee, each of a plausible size, and nothing else.
pub fn check_pieces(
    info: &RoundInfo,
    committee: &Committee,
    pieces: &[SealedPiece],
) -> Result<(), CryptoError> {
    let mut seen = std::collections::BTreeSet::new();
    let (seed_len, full_len) = (4 * 8 + 16, info.params.polynomial_size * 8 + 16);
    for p in pieces {
        let m = info.member_index(&p.recipient).ok_or_else(|| {
            CryptoError::Seal(format!(
                "piece for {:?}, who is not in the committee",
                p.recipient
            ))
        })?;
        let k = p.piece as usize;
        if k >= committee.pieces() || !committee.holds(m, k) {
            return Err(CryptoError::Seal(format!(
                "piece {k} sealed to {:?}, who does not hold it",
                p.recipient
            )));
        }
        if !seen.insert((k, m)) {
            return Err(CryptoError::Seal(format!(
                "piece {k} for {:?} sent twice",
                p.recipient
            )));
        }
        let len = p.sealed.ciphertext.len();
        if len != seed_len && len != full_len {
            return Err(CryptoError::Seal(format!(
                "piece {k} for {:?} is {len} bytes, neither a seed ({seed_len}) nor a full piece ({full_len})",
                p.recipient
            )));
        }
    }
    let expected: usize = (0..committee.pieces())
        .map(|k| {
            (0..committee.size())
                .filter(|&m| committee.holds(m, k))
                .count()
        })
        .sum();
    if seen.len() != expected {
        return Err(CryptoError::Seal(format!(
            "{} sealed pieces, the committee needs {expected}",
            seen.len()
        )));
    }
    Ok(())
}

/// What the coordinator asks of one committee member.
#[derive(Debug, Clone)]
pub struct ShareRequest<'a> {
    pub info: &'a RoundInfo,
    pub manifest: &'a Manifest,
    /// The record of every participant in the manifest.
    pub uploads: &'a [UploadRecord],
    /// Participants' signature keys.
    pub keys: &'a BTreeMap<String, VerifyKey>,
    /// The pieces sealed to this member: (sender, piece).
    pub pieces: &'a [(String, SealedPiece)],
    /// The pieces this member is to answer for.
    pub assigned: &'a [usize],
    /// Values in the model (the share covers `ciphertexts(len) · N` values).
    pub len: usize,
}

#[cfg(feature = "he")]
/// A committee member's answer: it checks the request against its policy and the
/// participants' signatures, opens its pieces and returns its signed decryption share.
pub fn answer(
    req: &ShareRequest<'_>,
    me: &str,
    secret: &MemberSecret,
    signer: &Signer25519,
    policy: &mut MemberPolicy,
    rng: &mut impl Rng,
) -> Result<(Vec<u64>, [u8; 64]), CryptoError> {
    let threads = default_threads();
    answer_on(req, me, secret, signer, policy, rng, threads)
}

/// [`answer`] with the decryption share computed on `threads` threads; the share does not
/// depend on it.
#[cfg(feature = "he")]
pub fn answer_on(
    req: &ShareRequest<'_>,
    me: &str,
    secret: &MemberSecret,
    signer: &Signer25519,
    policy: &mut MemberPolicy,
    rng: &mut impl Rng,
    threads: usize,
) -> Result<(Vec<u64>, [u8; 64]), CryptoError> {
    let info = req.info;
    let committee = info.validate()?;
    let mine = info.member_index(me).ok_or_else(|| {
        CryptoError::Committee(format!("{me:?} is not in this round's committee"))
    })?;
    if info.committee[mine].seal_key != secret.public() {
        return Err(CryptoError::Committee(
            "the committee lists another sealing key for this member".into(),
        ));
    }
    let m = req.manifest;
    if (m.job.as_str(), m.round, m.attempt) != (info.job.as_str(), info.round, info.attempt) {
        return Err(CryptoError::Committee(format!(
            "manifest is for job {:?} round {} attempt {}, the request for job {:?} round {} attempt {}",
            m.job, m.round, m.attempt, info.job, info.round, info.attempt
        )));
    }
    let records: BTreeMap<&str, &UploadRecord> = req
        .uploads
        .iter()
        .map(|u| (u.participant.as_str(), u))
        .collect();
    let mut declared = BTreeMap::new();
    for (p, _) in &m.entries {
        let rec = records
            .get(p.as_str())
            .ok_or_else(|| CryptoError::Signature(format!("no signed upload of {p:?}")))?;
        let key = req
            .keys
            .get(p)
            .ok_or_else(|| CryptoError::Signature(format!("no signature key for {p:?}")))?;
        rec.verify(info, key)?;
        declared.insert(p.clone(), rec.weight);
    }
    policy.admit(
        m,
        info.seed,
        &declared,
        info.t_min,
        info.codec.max_total_weight,
    )?;
    let n = info.params.polynomial_size;
    let mut r = vec![0u64; n];
    // This member's pieces by (sender, piece), and one agreement per sender's key.
    let mine_by: std::collections::HashMap<(&str, u32), &SealedPiece> = req
        .pieces
        .iter()
        .filter(|(_, sp)| sp.recipient == me)
        .map(|(s, sp)| ((s.as_str(), sp.piece), sp))
        .collect();
    let mut opener = Opener::new(secret);
    for &k in req.assigned {
        if k >= committee.pieces() || !committee.holds(mine, k) {
            return Err(CryptoError::Committee(format!(
                "asked for piece {k}, which this member does not hold"
            )));
        }
        for (p, w) in &m.entries {
            let sp = mine_by
                .get(&(p.as_str(), k as u32))
                .ok_or_else(|| CryptoError::Seal(format!("piece {k} of {p:?} is missing")))?;
            if !records[p.as_str()].piece_hashes.contains(&sp.hash()) {
                return Err(CryptoError::Seal(format!(
                    "piece {k} of {p:?} is not one {p:?} signed"
                )));
            }
            let words = opener.open(&info.seal_context(p, me, k as u32), &sp.sealed)?;
            let piece = Piece::from_words(words, n)?;
            for (acc, v) in r.iter_mut().zip(piece.expand(n)) {
                *acc = acc.wrapping_add(v.wrapping_mul(*w));
            }
        }
    }
    let share =
        decryption_share_threads(&[(1, &r)], info.seed, req.len, &info.params, rng, threads)?;
    let signature = signer.sign(Kind::Share, &share_digest(m, me, &share_sha256(&share)));
    Ok((share, signature))
}

/// Checks a member's signature on its share of `manifest`, given the share's SHA-256
/// ([`crate::sign::share_sha256`], which the receiver computes as the share arrives).
pub fn verify_share(
    manifest: &Manifest,
    member: &str,
    key: &VerifyKey,
    share_sha256: &[u8; 32],
    signature: &[u8; 64],
) -> Result<(), CryptoError> {
    verify(
        key,
        Kind::Share,
        &share_digest(manifest, member, share_sha256),
        signature,
    )
}

#[cfg(all(test, feature = "he"))]
mod tests {
    use super::*;
    use crate::glwe::{Accumulator, decode};
    use crate::policy::Refusal;
    use crate::seal::{open, seal};
    use rand::SeedableRng;
    use rand::rngs::ChaCha8Rng;

    struct Party {
        id: String,
        seal: MemberSecret,
        sign: Signer25519,
    }

    fn party(id: &str, rng: &mut ChaCha8Rng) -> Party {
        Party {
            id: id.into(),
            seal: MemberSecret::generate(rng),
            sign: Signer25519::generate(rng),
        }
    }

    fn info(members: &[Party], t: usize, t_min: usize) -> RoundInfo {
        RoundInfo {
            job: "job".into(),
            round: 3,
            attempt: 1,
            seed: RoundSeed(0xfeed),
            committee: members
                .iter()
                .map(|p| MemberInfo {
                    id: p.id.clone(),
                    seal_key: p.seal.public(),
                    verify_key: p.sign.verify_key(),
                    binding: None,
                })
                .collect(),
            threshold: t,
            t_min,
            codec: Codec::default(),
            params: GlweParams {
                polynomial_size: 256,
                ..GlweParams::default()
            },
            weight_unit: 10,
        }
    }

    struct Round {
        info: RoundInfo,
        parties: Vec<Party>,
        records: Vec<UploadRecord>,
        sent: Vec<(String, SealedPiece)>,
        acc: Accumulator,
        keys: BTreeMap<String, VerifyKey>,
        values: Vec<(u64, Vec<f32>)>,
        bodies: Vec<Vec<u64>>,
    }

    /// `n` participants, the first `members` of them on a committee with threshold `t`.
    fn round(n: usize, members: usize, t: usize, rng: &mut ChaCha8Rng) -> Round {
        let values = |i: usize| -> Vec<f32> {
            (0..300)
                .map(|j| ((i * 13 + j) % 50) as f32 / 10.0 - 2.5)
                .collect()
        };
        round_with(n, members, t, rng, &values, 10)
    }

    /// A round where participant `i` sends `values(i)`, its weight its examples
    /// (40 + 10 i) over `weight_unit`.
    fn round_with(
        n: usize,
        members: usize,
        t: usize,
        rng: &mut ChaCha8Rng,
        values_of: &dyn Fn(usize) -> Vec<f32>,
        weight_unit: u64,
    ) -> Round {
        let parties: Vec<Party> = (0..n).map(|i| party(&format!("p{i}"), rng)).collect();
        let mut info = info(&parties[..members], t, 2);
        info.weight_unit = weight_unit;
        let committee = info.validate().unwrap();
        let len = values_of(0).len();
        let mut acc = Accumulator::new(info.params.ciphertexts(len) * 256);
        let (mut records, mut sent, mut values) = (Vec::new(), Vec::new(), Vec::new());
        let mut bodies = Vec::new();
        for (i, p) in parties.iter().enumerate() {
            let v = values_of(i);
            let up = protect(
                &info,
                &p.id,
                &p.sign,
                &mut SeedLog::default(),
                &v,
                40 + 10 * i as u64,
                rng,
            )
            .unwrap();
            check_pieces(&info, &committee, &up.pieces).unwrap();
            let rec = UploadRecord {
                participant: p.id.clone(),
                weight: up.weight,
                bodies_sha256: bodies_sha256(&up.bodies),
                piece_hashes: up.pieces.iter().map(SealedPiece::hash).collect(),
                signature: up.signature,
            };
            rec.verify(&info, &p.sign.verify_key()).unwrap();
            acc.add(up.weight, &up.bodies).unwrap();
            bodies.push(up.bodies.clone());
            values.push((up.weight, v));
            records.push(rec);
            sent.extend(up.pieces.into_iter().map(|sp| (p.id.clone(), sp)));
        }
        let keys = parties
            .iter()
            .map(|p| (p.id.clone(), p.sign.verify_key()))
            .collect();
        Round {
            info,
            parties,
            records,
            sent,
            acc,
            keys,
            values,
            bodies,
        }
    }

    impl Round {
        /// The manifest of every upload of the round, as the coordinator signs it.
        fn manifest(&self) -> Manifest {
            self.info.manifest(
                self.records
                    .iter()
                    .map(|u| (u.participant.clone(), u.weight))
                    .collect(),
            )
        }
    }

    fn ask(
        r: &Round,
        manifest: &Manifest,
        member: usize,
        assigned: &[usize],
        policy: &mut MemberPolicy,
        rng: &mut ChaCha8Rng,
    ) -> Result<(Vec<u64>, [u8; 64]), CryptoError> {
        let me = &r.parties[member];
        let pieces: Vec<(String, SealedPiece)> = r
            .sent
            .iter()
            .filter(|(_, sp)| sp.recipient == me.id)
            .cloned()
            .collect();
        let req = ShareRequest {
            info: &r.info,
            manifest,
            uploads: &r.records,
            keys: &r.keys,
            pieces: &pieces,
            assigned,
            len: r.values[0].1.len(),
        };
        answer(&req, &me.id, &me.seal, &me.sign, policy, rng)
    }

    /// One set of `bodies` at `weight` with decryption `shares` added: what the coordinator
    /// could try to decode from pieces of a round it holds.
    fn with_shares(bodies: &[u64], weight: u64, shares: &[Vec<u64>]) -> Accumulator {
        let mut acc = Accumulator::new(bodies.len());
        acc.add(weight, bodies).unwrap();
        for s in shares {
            acc.add_share(s).unwrap();
        }
        acc
    }

    /// The first two participants' bodies, one minus the other.
    fn bodies_apart(r: &Round) -> Vec<u64> {
        r.bodies[0]
            .iter()
            .zip(&r.bodies[1])
            .map(|(a, b)| a.wrapping_sub(*b))
            .collect()
    }

    /// Committee `members` answer for every piece: the round's accumulator then holds the
    /// decrypted sum.
    fn decrypt_with(r: &mut Round, members: &[usize], rng: &mut ChaCha8Rng) {
        let committee = r.info.validate().unwrap();
        let manifest = r.manifest();
        for (k, m) in committee.assign(members).unwrap() {
            let (share, _) = ask(r, &manifest, m, &[k], &mut MemberPolicy::default(), rng).unwrap();
            r.acc.add_share(&share).unwrap();
        }
    }

    #[test]
    fn exact_statistics_travel_as_digits_through_a_whole_round() {
        // Each site's statistics (counts, sums, sums of squares of any size), as digits with
        // weight 1 each; the committee's decryption gives back the exact sums.
        let codec = Codec::default();
        let digits = crate::exact::DigitCodec::new(&codec, 1e13, 10).unwrap();
        let stats = |i: usize| -> Vec<f64> {
            vec![
                100.0 + i as f64,
                -1234.5 * (i + 1) as f64,
                9.87e12 / (i + 1) as f64,
                0.001 * i as f64,
            ]
        };
        let values = |i: usize| digits.encode(&stats(i), &codec).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let mut r = round_with(4, 3, 2, &mut rng, &values, u64::MAX);
        assert!(r.values.iter().all(|(w, _)| *w == 1), "weight 1 each");
        decrypt_with(&mut r, &[0, 1], &mut rng);
        let len = r.values[0].1.len();
        let sums = crate::glwe::decode_sums(&r.acc, &[], len, &r.info.codec).unwrap();
        let got = digits.decode(&sums).unwrap();
        for (j, g) in got.iter().enumerate() {
            let want: i128 = (0..4).map(|i| (stats(i)[j] * 1024.0).round() as i128).sum();
            assert_eq!(*g, want as f64 / 1024.0, "statistic {j}");
        }
    }

    /// Distributed DP: four participants add discrete Gaussian noise to zero updates (weight
    /// 1 each); the committee's decryption gives back exactly the sum of their noise, whose
    /// empirical variance over 4,096 coordinates is 4σ² (standard error 2.2%).
    #[test]
    fn decrypted_distributed_noise_is_the_exact_sum_with_the_target_variance() {
        let codec = Codec::default();
        let (n, len, sd) = (4usize, 4096usize, 0.02f64);
        let unit = (1u64 << codec.frac_bits) as f64;
        let noise = |i: usize| -> Vec<i64> {
            let mut rng = crate::dp::simulation_noise_rng(i as u64);
            crate::dp::noised_messages(&codec, &vec![0.0; len], sd, &mut rng)
        };
        // Messages below 2^24 travel exactly as f32 values: protect encodes them back.
        let values =
            |i: usize| -> Vec<f32> { noise(i).iter().map(|&m| (m as f64 / unit) as f32).collect() };
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut r = round_with(n, 3, 2, &mut rng, &values, u64::MAX);
        decrypt_with(&mut r, &[0, 1], &mut rng);
        let sums = crate::glwe::decode_sums(&r.acc, &[], len, &r.info.codec).unwrap();
        let want: Vec<i64> = (0..len)
            .map(|j| (0..n).map(|i| noise(i)[j]).sum())
            .collect();
        assert_eq!(
            sums, want,
            "the decrypted sum is the participants' noise, exactly"
        );
        let var = sums.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / len as f64;
        let target = n as f64 * (sd * unit).powi(2);
        assert!(
            (var / target - 1.0).abs() < 0.08,
            "variance {var} vs n σ² = {target}"
        );
    }

    #[test]
    fn a_whole_round_decodes_the_weighted_mean_with_a_member_missing() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut r = round(4, 3, 2, &mut rng);
        let committee = r.info.validate().unwrap();
        let manifest = r.manifest();
        // Member 1 does not answer: members 0 and 2 cover every piece.
        for (k, m) in committee.assign(&[0, 2]).unwrap() {
            let (share, sig) = ask(
                &r,
                &manifest,
                m,
                &[k],
                &mut MemberPolicy::default(),
                &mut rng,
            )
            .unwrap();
            verify_share(
                &manifest,
                &r.parties[m].id,
                &r.parties[m].sign.verify_key(),
                &crate::sign::share_sha256(&share),
                &sig,
            )
            .unwrap();
            r.acc.add_share(&share).unwrap();
        }
        let got = decode(&r.acc, &[], 300, &r.info.codec).unwrap();
        let w: u64 = r.values.iter().map(|v| v.0).sum();
        assert_eq!(w, 4 + 5 + 6 + 7, "weights are round(examples / 10)");
        for (j, g) in got.iter().enumerate() {
            let want: f64 = r
                .values
                .iter()
                .map(|(wi, v)| *wi as f64 * v[j] as f64)
                .sum::<f64>()
                / w as f64;
            assert!((*g as f64 - want).abs() < 1e-4, "{j}: {g} vs {want}");
        }
    }

    #[test]
    fn everything_the_coordinator_holds_after_a_round_does_not_decode_one_update() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let r = round(3, 3, 2, &mut rng);
        let committee = r.info.validate().unwrap();
        let manifest = r.manifest();
        // The coordinator's whole view: every body, every record and sealed piece, and every
        // member's share of the sum.
        let mut shares = Vec::new();
        for (k, m) in committee.assign(&[0, 1, 2]).unwrap() {
            shares.push(
                ask(
                    &r,
                    &manifest,
                    m,
                    &[k],
                    &mut MemberPolicy::default(),
                    &mut rng,
                )
                .unwrap()
                .0,
            );
        }
        let target = &r.values[0].1;
        let recovered = |got: &[f32]| {
            got.iter()
                .zip(target)
                .filter(|(a, b)| (*a - *b).abs() < 0.01)
                .count()
        };
        // One participant's bodies with all the shares (which remove Σ_i w_i ⟨A, s_i⟩, not
        // ⟨A, s_0⟩ alone), and with weight 1 or its own weight: noise.
        for w in [1, r.values[0].0] {
            let got = decode(
                &with_shares(&r.bodies[0], w, &shares),
                &[],
                300,
                &r.info.codec,
            )
            .unwrap();
            assert!(
                recovered(&got) <= 3,
                "{} of 300 values of p0 recovered",
                recovered(&got)
            );
        }
        // The bodies alone, or the difference of two participants' bodies: noise.
        let got = decode(
            &with_shares(&bodies_apart(&r), 1, &[]),
            &[],
            300,
            &r.info.codec,
        )
        .unwrap();
        assert!(recovered(&got) <= 3);
        // Pieces sealed to members do not open for the coordinator (it has no member key).
        let outsider = MemberSecret::generate(&mut rng);
        let (sender, sp) = &r.sent[0];
        assert!(
            open(
                &outsider,
                &r.info.seal_context(sender, &sp.recipient, sp.piece),
                &sp.sealed
            )
            .is_err()
        );
    }

    #[test]
    fn statistics_of_one_site_do_not_decode_from_the_coordinators_view() {
        // Round 0 as the coordinator sees it: every site's statistics as digits of weight 1,
        // every body, record and sealed piece, and every member's share. Only the sum decodes.
        let codec = Codec::default();
        let digits = crate::exact::DigitCodec::for_statistics(&codec).unwrap();
        let stats = |i: usize| -> Vec<f64> {
            (0..40)
                .map(|j| (j * 7 + i * 3) as f64 * 1.25 + if j % 5 == 0 { 1e9 } else { 0.0 })
                .collect()
        };
        let values = |i: usize| digits.encode(&stats(i), &codec).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let r = round_with(3, 3, 2, &mut rng, &values, u64::MAX);
        let committee = r.info.validate().unwrap();
        let manifest = r.manifest();
        let mut shares = Vec::new();
        for (k, m) in committee.assign(&[0, 1, 2]).unwrap() {
            let (share, _) = ask(
                &r,
                &manifest,
                m,
                &[k],
                &mut MemberPolicy::default(),
                &mut rng,
            )
            .unwrap();
            shares.push(share);
        }
        let len = r.values[0].1.len();
        let own: Vec<i64> = values(0)
            .iter()
            .map(|v| (*v as f64 * (1u64 << codec.frac_bits) as f64) as i64)
            .collect();
        let matching = |got: &[i64]| got.iter().zip(&own).filter(|(a, b)| a == b).count();
        // Site 0's bodies with every share: noise, not its digits.
        let one = with_shares(&r.bodies[0], 1, &shares);
        let got = crate::glwe::decode_sums(&one, &[], len, &codec).unwrap();
        assert!(
            matching(&got) <= 2,
            "{} of {len} digits of site 0",
            matching(&got)
        );
        // Two sites' bodies apart: noise.
        let diff = with_shares(&bodies_apart(&r), 1, &[]);
        let got = crate::glwe::decode_sums(&diff, &[], len, &codec).unwrap();
        assert!(matching(&got) <= 2);
        // The sum with every share: the exact totals.
        let mut all = r.acc.clone();
        for s in &shares {
            all.add_share(s).unwrap();
        }
        let sums = digits
            .decode(&crate::glwe::decode_sums(&all, &[], len, &codec).unwrap())
            .unwrap();
        for (j, got) in sums.iter().enumerate() {
            assert_eq!(
                *got,
                (0..3).map(|i| stats(i)[j]).sum::<f64>(),
                "statistic {j}"
            );
        }
    }

    #[test]
    fn members_refuse_what_the_design_says_they_must() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let r = round(3, 3, 2, &mut rng);
        let all: Vec<(String, u64)> = r
            .records
            .iter()
            .map(|u| (u.participant.clone(), u.weight))
            .collect();
        let good = r.info.manifest(all.clone());
        let pieces0 = r.info.validate().unwrap().pieces_of(0);
        // Too few participants (T_min = 2).
        let one = r.info.manifest(all[..1].to_vec());
        let e = ask(
            &r,
            &one,
            0,
            &pieces0,
            &mut MemberPolicy::default(),
            &mut rng,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                CryptoError::Refused(Refusal::TooFewParticipants { got: 1, t_min: 2 })
            ),
            "{e}"
        );
        // A weight the participant did not sign.
        let mut heavy = all.clone();
        heavy[0].1 = 900;
        let e = ask(
            &r,
            &r.info.manifest(heavy),
            0,
            &pieces0,
            &mut MemberPolicy::default(),
            &mut rng,
        )
        .unwrap_err();
        assert!(
            matches!(e, CryptoError::Refused(Refusal::WeightMismatch { .. })),
            "{e}"
        );
        // A second, different manifest for the same seed.
        let mut policy = MemberPolicy::default();
        ask(&r, &good, 0, &pieces0, &mut policy, &mut rng).unwrap();
        ask(&r, &good, 0, &pieces0, &mut policy, &mut rng).expect("a retransmission is answered");
        let fewer = r.info.manifest(all[..2].to_vec());
        let e = ask(&r, &fewer, 0, &pieces0, &mut policy, &mut rng).unwrap_err();
        assert!(
            matches!(e, CryptoError::Refused(Refusal::DifferentManifest(_))),
            "{e}"
        );
        // A piece the member does not hold.
        let not_mine = (0..3).find(|k| !pieces0.contains(k)).unwrap();
        assert!(
            ask(
                &r,
                &good,
                0,
                &[not_mine],
                &mut MemberPolicy::default(),
                &mut rng
            )
            .is_err()
        );
    }

    #[test]
    fn a_repeated_seed_and_forged_or_moved_pieces_are_refused() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut r = round(3, 3, 2, &mut rng);
        // The participant refuses to encrypt twice under one seed.
        let mut seeds = SeedLog::default();
        let p = &r.parties[0];
        protect(&r.info, &p.id, &p.sign, &mut seeds, &[1.0], 10, &mut rng).unwrap();
        assert!(protect(&r.info, &p.id, &p.sign, &mut seeds, &[1.0], 10, &mut rng).is_err());
        let manifest = r.manifest();
        let k = r.info.validate().unwrap().pieces_of(0)[0];
        // A piece the coordinator sealed itself (to the member's public key) is not one the
        // participant signed.
        let forged = seal(
            &r.parties[0].seal.public(),
            &r.info.seal_context("p1", "p0", k as u32),
            &[1, 2, 3, 4],
            &mut rng,
        )
        .unwrap();
        for (s, sp) in r.sent.iter_mut() {
            if s == "p1" && sp.recipient == "p0" && sp.piece as usize == k {
                sp.sealed = forged.clone();
            }
        }
        let e = ask(
            &r,
            &manifest,
            0,
            &[k],
            &mut MemberPolicy::default(),
            &mut rng,
        )
        .unwrap_err();
        assert!(matches!(e, CryptoError::Seal(_)), "{e}");
        // Extra or missing pieces in an upload are refused before anything is stored.
        let committee = r.info.validate().unwrap();
        let mut pieces: Vec<SealedPiece> = r
            .sent
            .iter()
            .filter(|(s, _)| s == "p2")
            .map(|(_, sp)| sp.clone())
            .collect();
        pieces.pop();
        assert!(check_pieces(&r.info, &committee, &pieces).is_err());
    }

    #[test]
    fn committee_keys_must_be_bound_to_the_members_certificates() {
        use crate::pki::{Authority, Role, Validity, binding_message, sign_with_key};
        use x509_parser::prelude::*;
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let ca = Authority::generate(
            "federation",
            &Validity::days(std::time::SystemTime::now(), 1),
        )
        .unwrap();
        let parties: Vec<Party> = (0..3).map(|i| party(&format!("p{i}"), &mut rng)).collect();
        let mut info = info(&parties, 2, 2);
        for m in info.committee.iter_mut() {
            let cert = ca
                .issue(
                    &m.id,
                    Role::Participant,
                    &[],
                    &[],
                    &Validity::days(std::time::SystemTime::now(), 1),
                )
                .unwrap();
            let der = parse_x509_pem(cert.cert_pem.as_bytes()).unwrap().1.contents;
            let sig = sign_with_key(
                &cert.key_pem,
                &binding_message(&m.seal_key.0, &m.verify_key.0),
            )
            .unwrap();
            m.binding = Some(KeyBinding {
                certificate: der,
                signature: sig,
            });
        }
        info.check_bindings(ca.cert_pem(), SystemTime::now())
            .unwrap();
        // A coordinator that swaps a member's sealing key for its own is caught.
        let mut swapped = info.clone();
        swapped.committee[1].seal_key = MemberSecret::generate(&mut rng).public();
        let e = swapped
            .check_bindings(ca.cert_pem(), SystemTime::now())
            .unwrap_err();
        assert!(e.to_string().contains("p1"), "{e}");
        // So is one that presents p2's certificate for p1, or no binding at all.
        let mut moved = info.clone();
        moved.committee[1].binding = moved.committee[2].binding.clone();
        assert!(
            moved
                .check_bindings(ca.cert_pem(), SystemTime::now())
                .is_err()
        );
        let mut bare = info;
        bare.committee[0].binding = None;
        assert!(
            bare.check_bindings(ca.cert_pem(), SystemTime::now())
                .is_err()
        );
    }

    #[test]
    fn invalid_rounds_are_refused_with_the_reason() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let parties: Vec<Party> = (0..4).map(|i| party(&format!("p{i}"), &mut rng)).collect();
        let e = info(&parties, 2, 2).validate().unwrap_err();
        assert!(e.to_string().contains("strict majority"), "{e}");
        let mut big = info(&parties[..3], 2, 2);
        big.codec.max_total_weight = 1 << 20;
        let e = big.validate().unwrap_err();
        assert!(matches!(e, CryptoError::Capacity(_)), "{e}");
    }
}
