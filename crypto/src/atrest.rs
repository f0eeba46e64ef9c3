//! Encryption at rest: envelope encryption with AES-256-GCM (ring).
//!
//! Each artifact gets its own random data key (DEK). The DEK encrypts the artifact; a
//! key-encryption key (KEK), named by an id, wraps the DEK. The file holds only the wrapped
//! DEK, so rotating the KEK re-wraps a few dozen bytes per artifact ([`rewrap`]) and never
//! re-encrypts the artifact itself. The artifact's name is bound as associated data, so an
//! encrypted file renamed to stand for another one does not open.
//!
//! ```text
//! "COHORT-ENC1" | u16 len | kek id | 12-byte nonce | wrapped DEK (32 + 16 tag)
//!               | 12-byte nonce | ciphertext + 16-byte tag
//! ```
//!
//! A [`KeyProvider`] holds the KEKs: [`KeyFileProvider`] (files in a directory, mode 0600) is
//! the default; a PKCS#11 provider is the planned alternative.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::CryptoError;

const MAGIC: &[u8] = b"COHORT-ENC1";
const TAG: usize = 16;

fn err(m: impl Into<String>) -> CryptoError {
    CryptoError::AtRest(m.into())
}

/// Holds key-encryption keys and wraps or unwraps data keys with them.
pub trait KeyProvider: Send + Sync + std::fmt::Debug {
    /// The id of the KEK new artifacts are wrapped with.
    fn current_id(&self) -> String;
    /// Wraps `dek` under KEK `id`; the result is `nonce || ciphertext || tag`.
    fn wrap(&self, id: &str, dek: &[u8; 32]) -> Result<Vec<u8>, CryptoError>;
    /// Unwraps a DEK wrapped under KEK `id`.
    fn unwrap(&self, id: &str, wrapped: &[u8]) -> Result<[u8; 32], CryptoError>;
}

fn random<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| err("the system random generator failed"))?;
    Ok(b)
}

fn seal_with(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| err("bad key"))?);
    let nonce: [u8; NONCE_LEN] = random()?;
    let mut buf = plain.to_vec();
    k.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .map_err(|_| err("encryption failed"))?;
    Ok([nonce.as_slice(), &buf].concat())
}

fn open_with(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < NONCE_LEN + TAG {
        return Err(err("ciphertext too short"));
    }
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| err("bad key"))?);
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let mut buf = body.to_vec();
    let plain = k
        .open_in_place(
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| err("bad nonce"))?,
            Aad::from(aad),
            &mut buf,
        )
        .map_err(|_| err("does not decrypt: wrong key, wrong name, or altered"))?;
    Ok(plain.to_vec())
}

/// The parsed header of an encrypted artifact.
struct Header<'a> {
    kek_id: &'a str,
    wrapped: &'a [u8],
    body: &'a [u8],
}

const WRAPPED_LEN: usize = NONCE_LEN + 32 + TAG;

fn parse(bytes: &[u8]) -> Result<Header<'_>, CryptoError> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| err("not an encrypted cohort artifact"))?;
    if rest.len() < 2 {
        return Err(err("truncated header"));
    }
    let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
    let rest = &rest[2..];
    if rest.len() < n + WRAPPED_LEN {
        return Err(err("truncated header"));
    }
    let kek_id = std::str::from_utf8(&rest[..n]).map_err(|_| err("key id is not UTF-8"))?;
    Ok(Header {
        kek_id,
        wrapped: &rest[n..n + WRAPPED_LEN],
        body: &rest[n + WRAPPED_LEN..],
    })
}

fn assemble(kek_id: &str, wrapped: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + kek_id.len() + wrapped.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(kek_id.len() as u16).to_le_bytes());
    out.extend_from_slice(kek_id.as_bytes());
    out.extend_from_slice(wrapped);
    out.extend_from_slice(body);
    out
}

/// Encrypts `plain` (the artifact called `name`) under a fresh data key wrapped by the
/// provider's current KEK.
pub fn encrypt(keys: &dyn KeyProvider, name: &str, plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let dek: [u8; 32] = random()?;
    let id = keys.current_id();
    let wrapped = keys.wrap(&id, &dek)?;
    let body = seal_with(&dek, name.as_bytes(), plain)?;
    Ok(assemble(&id, &wrapped, &body))
}

/// Decrypts an artifact written by [`encrypt`] under the name `name`.
pub fn decrypt(keys: &dyn KeyProvider, name: &str, bytes: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let h = parse(bytes)?;
    let dek = keys.unwrap(h.kek_id, h.wrapped)?;
    open_with(&dek, name.as_bytes(), h.body)
}

/// Re-wraps an artifact's data key under the provider's current KEK, leaving the encrypted
/// artifact itself untouched. Returns `None` when it already uses the current KEK.
pub fn rewrap(keys: &dyn KeyProvider, bytes: &[u8]) -> Result<Option<Vec<u8>>, CryptoError> {
    let h = parse(bytes)?;
    let current = keys.current_id();
    if h.kek_id == current {
        return Ok(None);
    }
    let dek = keys.unwrap(h.kek_id, h.wrapped)?;
    let wrapped = keys.wrap(&current, &dek)?;
    Ok(Some(assemble(&current, &wrapped, h.body)))
}

/// Whether `bytes` is an encrypted artifact, and under which KEK.
pub fn kek_of(bytes: &[u8]) -> Option<String> {
    parse(bytes).ok().map(|h| h.kek_id.to_string())
}

/// KEKs in memory, by id: what a key file holds. Build with [`KeyFileProvider::from_keys`]
/// (the file format and I/O live with the caller).
pub struct KeyFileProvider {
    keys: Vec<(String, [u8; 32])>,
    current: String,
}

impl std::fmt::Debug for KeyFileProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFileProvider")
            .field("current", &self.current)
            .field("ids", &self.keys.iter().map(|k| &k.0).collect::<Vec<_>>())
            .finish()
    }
}

impl KeyFileProvider {
    /// `keys` by id; `current` wraps new data keys.
    pub fn from_keys(keys: Vec<(String, [u8; 32])>, current: &str) -> Result<Self, CryptoError> {
        if !keys.iter().any(|k| k.0 == current) {
            return Err(err(format!(
                "current key {current:?} is not among the keys"
            )));
        }
        Ok(KeyFileProvider {
            keys,
            current: current.to_string(),
        })
    }

    /// A new random KEK (for a key file).
    pub fn new_key() -> Result<[u8; 32], CryptoError> {
        random()
    }

    fn key(&self, id: &str) -> Result<&[u8; 32], CryptoError> {
        self.keys
            .iter()
            .find(|k| k.0 == id)
            .map(|k| &k.1)
            .ok_or_else(|| err(format!("no key-encryption key {id:?}")))
    }
}

impl KeyProvider for KeyFileProvider {
    fn current_id(&self) -> String {
        self.current.clone()
    }

    fn wrap(&self, id: &str, dek: &[u8; 32]) -> Result<Vec<u8>, CryptoError> {
        seal_with(self.key(id)?, id.as_bytes(), dek)
    }

    fn unwrap(&self, id: &str, wrapped: &[u8]) -> Result<[u8; 32], CryptoError> {
        open_with(self.key(id)?, id.as_bytes(), wrapped)?
            .try_into()
            .map_err(|_| err("wrapped data key has the wrong length"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypts_hides_and_survives_rotation() {
        let k1 = KeyFileProvider::new_key().unwrap();
        let keys = KeyFileProvider::from_keys(vec![("kek-1".into(), k1)], "kek-1").unwrap();
        let plain: Vec<u8> = (0..4096u32)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        let enc = encrypt(&keys, "v00001.safetensors", &plain).unwrap();
        assert!(
            !enc.windows(16).any(|w| plain.windows(16).any(|p| p == w)),
            "no 16-byte run of the plaintext appears in the file"
        );
        assert_eq!(decrypt(&keys, "v00001.safetensors", &enc).unwrap(), plain);
        // Renamed, altered or under another key: refused.
        assert!(decrypt(&keys, "v00002.safetensors", &enc).is_err());
        let mut bad = enc.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(decrypt(&keys, "v00001.safetensors", &bad).is_err());
        // Rotation: a new KEK becomes current, the old one stays to unwrap; re-wrapping
        // changes only the header, and the artifact still decrypts (also after the old KEK
        // is dropped).
        let k2 = KeyFileProvider::new_key().unwrap();
        let rotated =
            KeyFileProvider::from_keys(vec![("kek-1".into(), k1), ("kek-2".into(), k2)], "kek-2")
                .unwrap();
        let re = rewrap(&rotated, &enc).unwrap().expect("re-wrapped");
        assert_eq!(kek_of(&re).as_deref(), Some("kek-2"));
        assert_eq!(
            &re[re.len() - (plain.len() + NONCE_LEN + TAG)..],
            &enc[enc.len() - (plain.len() + NONCE_LEN + TAG)..],
            "the encrypted artifact itself is untouched"
        );
        let only_new = KeyFileProvider::from_keys(vec![("kek-2".into(), k2)], "kek-2").unwrap();
        assert_eq!(
            decrypt(&only_new, "v00001.safetensors", &re).unwrap(),
            plain
        );
        assert!(decrypt(&only_new, "v00001.safetensors", &enc).is_err());
        assert!(rewrap(&only_new, &re).unwrap().is_none());
    }
}
