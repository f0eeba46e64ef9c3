//! cohort's cryptography for secure aggregation: threshold GLWE on tfhe-rs `core_crypto`
//! (see `docs/secure-aggregation.md` and `docs/ARCHITECTURE.md`).
//!
//! - [`codec`]: fixed-point encoding of updates and the capacity check that refuses
//!   configurations that could overflow.
//! - [`sharing`]: replicated t-of-n secret sharing over Z/2^64 and the assignment of pieces
//!   to responding committee members.
//! - [`policy`]: the committee's refusals (T_min, one manifest per seed, declared weights)
//!   and the participant's refusal of a repeated seed.
//! - [`seal`]: key pieces sealed to committee members (X25519, HKDF-SHA256,
//!   ChaCha20-Poly1305) with the round's context bound as associated data.
//! - [`sign`]: Ed25519 signatures over uploads (binding the declared weight), manifests and
//!   decryption shares, each with its own domain tag.
//! - [`aggregation`]: one round as each party runs it: [`aggregation::protect`] (participant),
//!   [`aggregation::UploadRecord`] (coordinator), [`aggregation::answer`] (committee member).
//! - [`dp`]: distributed differential privacy: discrete Gaussian noise added to each encoded
//!   update before encryption.
//! - [`glwe`]: per-round keys, seeded encryption (bodies only), the coordinator's weighted
//!   accumulator, decryption shares with smudging noise, decoding.
//!
//! - [`pki`]: the federation's certificate authority, certificates with one identity and one
//!   role each, and revocation lists (rcgen); PEM in, PEM out.
//!
//! Like `model`, this crate has no I/O and no async; randomness is an argument everywhere
//! except key generation in [`pki`], which uses the operating system's generator.

pub mod aggregation;
pub mod atrest;
pub mod codec;
pub mod dp;
pub mod exact;
#[cfg(feature = "he")]
mod fft;
#[cfg(feature = "he")]
pub mod glwe;
pub mod params;
pub mod pki;
pub mod policy;
pub mod seal;
pub mod sharing;
pub mod sign;

pub use codec::{Codec, NoiseBudget};
pub use exact::DigitCodec;
#[cfg(feature = "he")]
pub use glwe::{Accumulator, RoundKey, decode, decode_sums, decryption_share, encrypt};
pub use params::{GlweParams, RoundSeed};
pub use policy::{Manifest, MemberPolicy, Refusal, SeedLog};
pub use seal::{MemberPublic, MemberSecret, Opener, SealContext, Sealed, Sealer};
pub use sharing::{Committee, Piece};
pub use sign::{Kind, Signer25519, VerifyKey};

/// Errors of the secure-aggregation primitives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("configuration could overflow: {0}")]
    Capacity(String),
    #[error("committee: {0}")]
    Committee(String),
    #[error("signature: {0}")]
    Signature(String),
    #[error("sealed piece: {0}")]
    Seal(String),
    #[error("at-rest encryption: {0}")]
    AtRest(String),
    #[error("certificates: {0}")]
    Pki(String),
    #[error("refused: {0}")]
    Refused(#[from] policy::Refusal),
    #[error("length mismatch: expected {expected} values, got {got}")]
    Length { expected: usize, got: usize },
}
