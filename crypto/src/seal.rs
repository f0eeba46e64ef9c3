//! Sealing key pieces to committee members: X25519 with a fresh ephemeral key per upload
//! (one agreement per recipient), HKDF-SHA256 to a key per piece, ChaCha20-Poly1305. The
//! piece's whole context (job, round, attempt, round seed, sender, recipient, piece index)
//! is both the associated data and part of the key derivation, so a sealed piece opens only
//! in the context it was made for (moving it to another round, member or piece makes the tag
//! fail), and no two pieces are ever sealed under one key, which the fixed nonce needs.
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

/// The AEAD key of one piece: HKDF-SHA256 of the agreement, salted with both public keys,
/// its info naming the piece's whole context (`aad`).
fn cipher(
    shared: &[u8; 32],
    ephemeral: &[u8; 32],
    recipient: &[u8; 32],
    aad: &[u8],
) -> ChaCha20Poly1305 {
    use sha2::Digest;
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let context: [u8; 32] = Sha256::digest(aad).into();
    let mut key = [0u8; 32];
    hk.expand_multi_info(&[b"cohort.v1 piece seal/", &context], &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    ChaCha20Poly1305::new(Key::from_slice(&key))
}

/// The nonce: every piece has its own AEAD key (its context is in the derivation), so a
/// fixed nonce never repeats under one key.
fn nonce() -> Nonce {
    Nonce::default()
}

/// One sender's sealing of one upload's pieces: a single ephemeral key and one X25519
/// agreement per recipient, however many pieces each gets.
pub struct Sealer {
    eph: StaticSecret,
    eph_pub: [u8; 32],
    /// Agreements made so far: (recipient, shared secret).
    shared: Vec<([u8; 32], [u8; 32])>,
}

impl Sealer {
    pub fn new(rng: &mut impl Rng) -> Self {
        let eph = random_secret(rng);
        let eph_pub = PublicKey::from(&eph).to_bytes();
        Sealer {
            eph,
            eph_pub,
            shared: Vec::new(),
        }
    }

    /// Seals `piece` to `recipient` in `ctx`.
    pub fn seal(
        &mut self,
        recipient: &MemberPublic,
        ctx: &SealContext,
        piece: &[u64],
    ) -> Result<Sealed, CryptoError> {
        let shared = match self.shared.iter().find(|(r, _)| *r == recipient.0) {
            Some((_, s)) => *s,
            None => {
                let shared = self.eph.diffie_hellman(&PublicKey::from(recipient.0));
                if !shared.was_contributory() {
                    return Err(CryptoError::Seal(
                        "recipient public key is a low-order point".into(),
                    ));
                }
                self.shared.push((recipient.0, *shared.as_bytes()));
                *shared.as_bytes()
            }
        };
        let mut msg = Vec::with_capacity(piece.len() * 8);
        for v in piece {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        let aad = ctx.aad();
        let ciphertext = cipher(&shared, &self.eph_pub, &recipient.0, &aad)
            .encrypt(
                &nonce(),
                Payload {
                    msg: &msg,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Seal("encryption failed".into()))?;
        Ok(Sealed {
            ephemeral: self.eph_pub,
            ciphertext,
        })
    }
}

/// Seals `piece` to `recipient` in `ctx` under a fresh ephemeral key.
pub fn seal(
    recipient: &MemberPublic,
    ctx: &SealContext,
    piece: &[u64],
    rng: &mut impl Rng,
) -> Result<Sealed, CryptoError> {
    Sealer::new(rng).seal(recipient, ctx, piece)
}

/// A member's opening of many pieces: one X25519 agreement per sender's ephemeral key.
pub struct Opener<'a> {
    me: &'a MemberSecret,
    my_public: [u8; 32],
    shared: std::collections::HashMap<[u8; 32], [u8; 32]>,
}

impl<'a> Opener<'a> {
    pub fn new(me: &'a MemberSecret) -> Self {
        Opener {
            me,
            my_public: me.public().0,
            shared: std::collections::HashMap::new(),
        }
    }

    /// Opens a piece sealed to this member in `ctx` (see [`open`]).
    pub fn open(&mut self, ctx: &SealContext, sealed: &Sealed) -> Result<Vec<u64>, CryptoError> {
        let shared = match self.shared.get(&sealed.ephemeral) {
            Some(s) => *s,
            None => {
                let shared = self.me.0.diffie_hellman(&PublicKey::from(sealed.ephemeral));
                if !shared.was_contributory() {
                    return Err(CryptoError::Seal(
                        "ephemeral key is a low-order point".into(),
                    ));
                }
                self.shared.insert(sealed.ephemeral, *shared.as_bytes());
                *shared.as_bytes()
            }
        };
        let aad = ctx.aad();
        let msg = cipher(&shared, &sealed.ephemeral, &self.my_public, &aad)
            .decrypt(
                &nonce(),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
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
}

/// Opens a piece sealed to `me` in `ctx`. Fails, revealing nothing, if the piece was altered
/// or was made for another context (round, seed, sender, member or piece index).
pub fn open(
    me: &MemberSecret,
    ctx: &SealContext,
    sealed: &Sealed,
) -> Result<Vec<u64>, CryptoError> {
    Opener::new(me).open(ctx, sealed)
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
    fn one_upload_seals_many_pieces_under_one_ephemeral_key_but_never_one_aead_key() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (a, b) = (
            MemberSecret::generate(&mut rng),
            MemberSecret::generate(&mut rng),
        );
        let mut sealer = Sealer::new(&mut rng);
        let piece = [7u64; 8];
        let mut sealed = Vec::new();
        for (who, k) in [(&a, 0), (&a, 1), (&b, 0)] {
            let mut c = ctx();
            c.piece = k;
            c.recipient = if std::ptr::eq(who, &a) { "a" } else { "b" }.into();
            sealed.push((
                who,
                c.clone(),
                sealer.seal(&who.public(), &c, &piece).unwrap(),
            ));
        }
        assert!(
            sealed
                .windows(2)
                .all(|w| w[0].2.ephemeral == w[1].2.ephemeral)
        );
        // The same plaintext sealed twice to one member: different ciphertexts (keys).
        assert_ne!(sealed[0].2.ciphertext, sealed[1].2.ciphertext);
        let mut opener = Opener::new(&a);
        for (who, c, s) in &sealed {
            if std::ptr::eq(*who, &a) {
                assert_eq!(opener.open(c, s).unwrap(), piece);
            } else {
                assert!(opener.open(c, s).is_err(), "not a's piece");
                assert_eq!(open(&b, c, s).unwrap(), piece);
            }
        }
        // Piece 0's ciphertext under piece 1's context does not open.
        let mut moved = sealed[0].2.clone();
        moved.ciphertext = sealed[1].2.ciphertext.clone();
        assert!(opener.open(&sealed[0].1, &moved).is_err());
    }

    #[test]
    fn low_order_keys_are_refused() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let e = seal(&MemberPublic([0; 32]), &ctx(), &[1], &mut rng).unwrap_err();
        assert!(e.to_string().contains("low-order"), "{e}");
    }
}
