//! Sealing key pieces to committee members: X25519 with a fresh ephemeral key per message,
//! HKDF-SHA256, ChaCha20-Poly1305. The associated data binds the job, round, attempt, round
//! seed, sender, recipient and piece index, so a sealed piece opens only in the context it
//! was made for; moving it to another round, member or piece makes the tag fail.
//!
//! The coordinator relays sealed pieces but cannot open them: it holds no member's secret.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand::Rng;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::CryptoError;
use crate::params::RoundSeed;

/// A committee member's long-term X25519 secret (bound to its certificate identity once
/// mutual TLS exists).
pub struct MemberSecret(StaticSecret);

impl std::fmt::Debug for MemberSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemberSecret(..)")
    }
}

/// A committee member's X25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberPublic(pub [u8; 32]);

fn random_secret(rng: &mut impl Rng) -> StaticSecret {
    let mut bytes = [0u8; 32];
    rng.fill_bytes(&mut bytes);
    StaticSecret::from(bytes)
}

impl MemberSecret {
    pub fn generate(rng: &mut impl Rng) -> Self {
        MemberSecret(random_secret(rng))
    }

    pub fn public(&self) -> MemberPublic {
        MemberPublic(PublicKey::from(&self.0).to_bytes())
    }
}

/// Where a sealed piece belongs. Every field goes into the associated data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealContext {
    pub job: String,
    pub round: u64,
    pub attempt: u32,
    pub seed: RoundSeed,
    /// The participant whose key the piece is of.
    pub sender: String,
    /// The committee member it is for.
    pub recipient: String,
    /// Which piece of the replicated sharing.
    pub piece: u32,
}

impl SealContext {
    fn aad(&self) -> Vec<u8> {
        let mut out = b"cohort.v1/sealed-piece".to_vec();
        for field in [
            self.job.as_bytes(),
            self.sender.as_bytes(),
            self.recipient.as_bytes(),
        ] {
            out.extend_from_slice(&(field.len() as u64).to_le_bytes());
            out.extend_from_slice(field);
        }
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&self.attempt.to_le_bytes());
        out.extend_from_slice(&self.seed.0.to_le_bytes());
        out.extend_from_slice(&self.piece.to_le_bytes());
        out
    }
}

/// A piece sealed to one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The sender's ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// ChaCha20-Poly1305 ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

fn cipher(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> ChaCha20Poly1305 {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut key = [0u8; 32];
    hk.expand(b"cohort.v1 piece seal", &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    ChaCha20Poly1305::new(Key::from_slice(&key))
}

/// The nonce: every message has its own ephemeral key, hence its own AEAD key, so a fixed
/// nonce never repeats under one key.
fn nonce() -> Nonce {
    Nonce::default()
}

/// Seals `piece` to `recipient` in `ctx`.
pub fn seal(
    recipient: &MemberPublic,
    ctx: &SealContext,
    piece: &[u64],
    rng: &mut impl Rng,
) -> Result<Sealed, CryptoError> {
    let eph = random_secret(rng);
    let eph_pub = PublicKey::from(&eph).to_bytes();
    let shared = eph.diffie_hellman(&PublicKey::from(recipient.0));
    if !shared.was_contributory() {
        return Err(CryptoError::Seal(
            "recipient public key is a low-order point".into(),
        ));
    }
    let mut msg = Vec::with_capacity(piece.len() * 8);
    for v in piece {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    let ciphertext = cipher(shared.as_bytes(), &eph_pub, &recipient.0)
        .encrypt(
            &nonce(),
            Payload {
                msg: &msg,
                aad: &ctx.aad(),
            },
        )
        .map_err(|_| CryptoError::Seal("encryption failed".into()))?;
    Ok(Sealed {
        ephemeral: eph_pub,
        ciphertext,
    })
}

/// Opens a piece sealed to `me` in `ctx`. Fails, revealing nothing, if the piece was altered
/// or was made for another context (round, seed, sender, member or piece index).
pub fn open(
    me: &MemberSecret,
    ctx: &SealContext,
    sealed: &Sealed,
) -> Result<Vec<u64>, CryptoError> {
    let shared = me.0.diffie_hellman(&PublicKey::from(sealed.ephemeral));
    if !shared.was_contributory() {
        return Err(CryptoError::Seal(
            "ephemeral key is a low-order point".into(),
        ));
    }
    let msg = cipher(shared.as_bytes(), &sealed.ephemeral, &me.public().0)
        .decrypt(
            &nonce(),
            Payload {
                msg: &sealed.ciphertext,
                aad: &ctx.aad(),
            },
        )
        .map_err(|_| {
            CryptoError::Seal(format!(
                "piece {} from {:?} for round {} does not open: altered, or sealed for another context",
                ctx.piece, ctx.sender, ctx.round
            ))
        })?;
    if !msg.len().is_multiple_of(8) {
        return Err(CryptoError::Seal(
            "opened piece is not whole u64 values".into(),
        ));
    }
    Ok(msg
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::ChaCha8Rng;

    fn ctx() -> SealContext {
        SealContext {
            job: "job".into(),
            round: 3,
            attempt: 1,
            seed: RoundSeed(99),
            sender: "hospital-a".into(),
            recipient: "custodian-1".into(),
            piece: 4,
        }
    }

    #[test]
    fn sealed_piece_opens_in_its_context_only() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let member = MemberSecret::generate(&mut rng);
        let piece: Vec<u64> = (0..64).map(|i| i * 0x0123_4567_89ab_cdef).collect();
        let sealed = seal(&member.public(), &ctx(), &piece, &mut rng).unwrap();
        assert_eq!(sealed.ciphertext.len(), 64 * 8 + 16);
        assert_eq!(open(&member, &ctx(), &sealed).unwrap(), piece);

        // A piece for the wrong round, seed, sender, recipient or index does not open.
        let variants: [fn(&mut SealContext); 7] = [
            |c| c.round = 4,
            |c| c.attempt = 2,
            |c| c.seed = RoundSeed(100),
            |c| c.sender = "hospital-b".into(),
            |c| c.recipient = "custodian-2".into(),
            |c| c.piece = 5,
            |c| c.job = "other".into(),
        ];
        for change in variants {
            let mut c = ctx();
            change(&mut c);
            let e = open(&member, &c, &sealed).unwrap_err();
            assert!(e.to_string().contains("does not open"), "{e}");
        }
    }

    #[test]
    fn tampered_or_misdirected_pieces_fail() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let member = MemberSecret::generate(&mut rng);
        let other = MemberSecret::generate(&mut rng);
        let sealed = seal(&member.public(), &ctx(), &[1, 2, 3], &mut rng).unwrap();
        let mut tampered = sealed.clone();
        tampered.ciphertext[5] ^= 0x40;
        assert!(open(&member, &ctx(), &tampered).is_err());
        let mut swapped = sealed.clone();
        swapped.ephemeral = other.public().0;
        assert!(open(&member, &ctx(), &swapped).is_err());
        assert!(
            open(&other, &ctx(), &sealed).is_err(),
            "only the recipient opens it"
        );
    }

    #[test]
    fn low_order_keys_are_refused() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let e = seal(&MemberPublic([0; 32]), &ctx(), &[1], &mut rng).unwrap_err();
        assert!(e.to_string().contains("low-order"), "{e}");
    }
}
