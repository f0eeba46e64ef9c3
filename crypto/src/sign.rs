//! Ed25519 signatures over the messages of secure aggregation: a participant signs its
//! upload (so its declared weight cannot be changed by the coordinator), the coordinator signs
//! manifests, committee members sign decryption shares. Every signed message starts with a
//! domain tag naming its kind, so a signature on one kind never verifies as another.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::CryptoError;
use crate::params::RoundSeed;
use crate::policy::Manifest;

/// What a signature covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Upload,
    Manifest,
    Share,
}

impl Kind {
    fn tag(self) -> &'static [u8] {
        match self {
            Kind::Upload => b"cohort.v1/sig/upload",
            Kind::Manifest => b"cohort.v1/sig/manifest",
            Kind::Share => b"cohort.v1/sig/share",
        }
    }
}

/// A party's signing key (bound to its certificate identity once mutual TLS exists).
pub struct Signer25519(SigningKey);

impl std::fmt::Debug for Signer25519 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer25519(..)")
    }
}

/// A party's public verification key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyKey(pub [u8; 32]);

impl Signer25519 {
    pub fn generate(rng: &mut impl Rng) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Signer25519(SigningKey::from_bytes(&seed))
    }

    pub fn verify_key(&self) -> VerifyKey {
        VerifyKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `digest` (a SHA-256 of the message's canonical encoding) as `kind`.
    pub fn sign(&self, kind: Kind, digest: &[u8; 32]) -> [u8; 64] {
        self.0
            .sign(&[kind.tag(), digest.as_slice()].concat())
            .to_bytes()
    }
}

/// Checks a signature made by [`Signer25519::sign`].
pub fn verify(
    key: &VerifyKey,
    kind: Kind,
    digest: &[u8; 32],
    signature: &[u8; 64],
) -> Result<(), CryptoError> {
    let vk = VerifyingKey::from_bytes(&key.0)
        .map_err(|_| CryptoError::Signature("not a valid Ed25519 public key".into()))?;
    vk.verify_strict(
        &[kind.tag(), digest.as_slice()].concat(),
        &Signature::from_bytes(signature),
    )
    .map_err(|_| CryptoError::Signature(format!("{kind:?} signature does not verify")))
}

/// Digest of an upload: its context, the participant's declared weight and the SHA-256 of
/// its ciphertext bodies and sealed pieces (as sent).
pub fn upload_digest(
    job: &str,
    round: u64,
    seed: RoundSeed,
    participant: &str,
    weight: u64,
    payload_sha256: &[u8; 32],
) -> [u8; 32] {
    let mut h = Sha256::new();
    for f in [job.as_bytes(), participant.as_bytes()] {
        h.update((f.len() as u64).to_le_bytes());
        h.update(f);
    }
    h.update(round.to_le_bytes());
    h.update(seed.0.to_le_bytes());
    h.update(weight.to_le_bytes());
    h.update(payload_sha256);
    h.finalize().into()
}

/// SHA-256 of a share's little-endian bytes (the share stream's own digest, so a receiver
/// computes it while the share arrives).
pub fn share_sha256(share: &[u64]) -> [u8; 32] {
    let mut h = Sha256::new();
    for v in share {
        h.update(v.to_le_bytes());
    }
    h.finalize().into()
}

/// Checks that `manifest` is the one a decryption task names: its digest is `named`, it has
/// `participants` entries, and `signature` is the coordinator's (`coordinator`) over it. A
/// committee member checks this before it answers.
pub fn verify_manifest(
    manifest: &Manifest,
    named: &[u8; 32],
    participants: usize,
    coordinator: &VerifyKey,
    signature: &[u8; 64],
) -> Result<(), CryptoError> {
    let digest = manifest.digest();
    if digest != *named || manifest.entries.len() != participants {
        return Err(CryptoError::Signature(
            "the records sent are not the manifest the task names".into(),
        ));
    }
    verify(coordinator, Kind::Manifest, &digest, signature)
        .map_err(|e| CryptoError::Signature(format!("manifest: {e}")))
}

/// Digest of a decryption share: the manifest it answers, the member, and [`share_sha256`].
pub fn share_digest(manifest: &Manifest, member: &str, share_sha256: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"cohort.v1/share");
    h.update(manifest.digest());
    h.update((member.len() as u64).to_le_bytes());
    h.update(member.as_bytes());
    h.update(share_sha256);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::ChaCha8Rng;

    #[test]
    fn upload_signature_binds_the_declared_weight() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let p = Signer25519::generate(&mut rng);
        let payload = [7u8; 32];
        let d = upload_digest("j", 2, RoundSeed(5), "hospital-a", 120, &payload);
        let sig = p.sign(Kind::Upload, &d);
        verify(&p.verify_key(), Kind::Upload, &d, &sig).unwrap();
        // The coordinator cannot claim another weight, round or payload for it.
        for other in [
            upload_digest("j", 2, RoundSeed(5), "hospital-a", 1 << 20, &payload),
            upload_digest("j", 3, RoundSeed(5), "hospital-a", 120, &payload),
            upload_digest("j", 2, RoundSeed(5), "hospital-a", 120, &[8u8; 32]),
            upload_digest("j", 2, RoundSeed(5), "hospital-b", 120, &payload),
        ] {
            assert!(verify(&p.verify_key(), Kind::Upload, &other, &sig).is_err());
        }
        // Nor pass it off as a signature of another kind, or under another key.
        assert!(verify(&p.verify_key(), Kind::Share, &d, &sig).is_err());
        let q = Signer25519::generate(&mut rng);
        assert!(verify(&q.verify_key(), Kind::Upload, &d, &sig).is_err());
    }

    #[test]
    fn manifest_and_share_signatures() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let coord = Signer25519::generate(&mut rng);
        let member = Signer25519::generate(&mut rng);
        let m = Manifest {
            job: "j".into(),
            round: 1,
            attempt: 1,
            seed: RoundSeed(3),
            entries: vec![("a".into(), 1), ("b".into(), 2)],
        };
        let ms = coord.sign(Kind::Manifest, &m.digest());
        verify(&coord.verify_key(), Kind::Manifest, &m.digest(), &ms).unwrap();
        let share = vec![1u64, 2, 3];
        let d = share_digest(&m, "custodian-1", &share_sha256(&share));
        let ss = member.sign(Kind::Share, &d);
        verify(&member.verify_key(), Kind::Share, &d, &ss).unwrap();
        let altered = share_digest(&m, "custodian-1", &share_sha256(&[1, 2, 4]));
        assert!(verify(&member.verify_key(), Kind::Share, &altered, &ss).is_err());
        let mut sig = ss;
        sig[0] ^= 1;
        assert!(verify(&member.verify_key(), Kind::Share, &d, &sig).is_err());
    }
}
