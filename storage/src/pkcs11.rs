//! Key-encryption keys in a PKCS#11 token (an HSM, or SoftHSM2 in tests): AES-256 keys that
//! never leave the token, found by label; data keys are wrapped and unwrapped with AES-GCM
//! inside the token.

use std::path::Path;
use std::sync::Mutex;

use cohort_crypto::CryptoError;
use cohort_crypto::atrest::KeyProvider;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

fn err(e: impl std::fmt::Display) -> CryptoError {
    CryptoError::AtRest(format!("PKCS#11: {e}"))
}

const IV: usize = 12;

/// KEKs held by a PKCS#11 token.
pub struct Pkcs11Provider {
    session: Mutex<Session>,
    current: String,
    // Keeps the library loaded for the session's lifetime.
    _ctx: Pkcs11,
}

impl std::fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Provider")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Provider {
    /// Opens the token labelled `token` through the PKCS#11 `module`, logs in with the user
    /// `pin`; `current` is the label of the key that wraps new data keys.
    pub fn open(module: &Path, token: &str, pin: &str, current: &str) -> Result<Self, CryptoError> {
        let ctx = Pkcs11::new(module).map_err(|e| err(format!("{}: {e}", module.display())))?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(err)?;
        let slot = ctx
            .get_slots_with_initialized_token()
            .map_err(err)?
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .map(|t| t.label().trim() == token)
                    .unwrap_or(false)
            })
            .ok_or_else(|| err(format!("no initialised token labelled {token:?}")))?;
        let session = ctx.open_rw_session(slot).map_err(err)?;
        session
            .login(UserType::User, Some(&AuthPin::new(pin.into())))
            .map_err(|e| err(format!("login to {token:?}: {e}")))?;
        Ok(Pkcs11Provider {
            session: Mutex::new(session),
            current: current.to_string(),
            _ctx: ctx,
        })
    }

    /// Generates a new AES-256 KEK labelled `id` inside the token (not extractable).
    pub fn generate(&self, id: &str) -> Result<(), CryptoError> {
        let s = self.session.lock().expect("PKCS#11 session lock");
        if !find(&s, id)?.is_empty() {
            return Err(err(format!("a key labelled {id:?} already exists")));
        }
        s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Label(id.as_bytes().to_vec()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
            ],
        )
        .map_err(err)?;
        Ok(())
    }

    /// Makes `id` the key that wraps new data keys.
    pub fn set_current(&mut self, id: &str) {
        self.current = id.to_string();
    }

    fn key(&self, s: &Session, id: &str) -> Result<ObjectHandle, CryptoError> {
        find(s, id)?
            .into_iter()
            .next()
            .ok_or_else(|| err(format!("no key labelled {id:?} in the token")))
    }
}

fn find(s: &Session, id: &str) -> Result<Vec<ObjectHandle>, CryptoError> {
    s.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(id.as_bytes().to_vec()),
    ])
    .map_err(err)
}

impl KeyProvider for Pkcs11Provider {
    fn current_id(&self) -> String {
        self.current.clone()
    }

    fn wrap(&self, id: &str, dek: &[u8; 32]) -> Result<Vec<u8>, CryptoError> {
        let s = self.session.lock().expect("PKCS#11 session lock");
        let key = self.key(&s, id)?;
        let iv: [u8; IV] = s
            .generate_random_vec(IV as u32)
            .map_err(err)?
            .try_into()
            .map_err(|_| err("random IV"))?;
        let mut iv_param = iv;
        let ct = s
            .encrypt(
                &Mechanism::AesGcm(
                    GcmParams::new(&mut iv_param, id.as_bytes(), 128.into()).map_err(err)?,
                ),
                key,
                dek,
            )
            .map_err(err)?;
        Ok([iv.as_slice(), &ct].concat())
    }

    fn unwrap(&self, id: &str, wrapped: &[u8]) -> Result<[u8; 32], CryptoError> {
        if wrapped.len() < IV + 16 {
            return Err(err("wrapped key too short"));
        }
        let s = self.session.lock().expect("PKCS#11 session lock");
        let key = self.key(&s, id)?;
        let mut iv: [u8; IV] = wrapped[..IV].try_into().expect("12 bytes");
        let plain = s
            .decrypt(
                &Mechanism::AesGcm(
                    GcmParams::new(&mut iv, id.as_bytes(), 128.into()).map_err(err)?,
                ),
                key,
                &wrapped[IV..],
            )
            .map_err(|e| err(format!("unwrapping with {id:?}: {e}")))?;
        plain
            .try_into()
            .map_err(|_| err("wrapped data key has the wrong length"))
    }
}

#[cfg(test)]
mod tests {
    //! Against SoftHSM2 (`apt-get install softhsm2`; `.ci/run` installs it). The test makes
    //! its own token in a temporary directory.

    use super::*;
    use cohort_crypto::atrest;

    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

    #[test]
    fn softhsm2_keys_wrap_rotate_and_decrypt() {
        assert!(
            Path::new(MODULE).exists(),
            "SoftHSM2 is not installed ({MODULE}): apt-get install softhsm2 (.ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\n",
                tokens.display()
            ),
        )
        .unwrap();
        // SAFETY: set before any thread of this test binary loads SoftHSM2; no other test
        // reads this variable.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
        let out = std::process::Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                "cohort-test",
                "--pin",
                "1234",
                "--so-pin",
                "5678",
            ])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let mut hsm =
            Pkcs11Provider::open(Path::new(MODULE), "cohort-test", "1234", "kek-1").unwrap();
        hsm.generate("kek-1").unwrap();
        assert!(hsm.generate("kek-1").is_err(), "labels are unique");
        let plain: Vec<u8> = (0..1000u32)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        let enc = atrest::encrypt(&hsm, "v00001.safetensors", &plain).unwrap();
        assert_eq!(
            atrest::decrypt(&hsm, "v00001.safetensors", &enc).unwrap(),
            plain
        );
        assert!(atrest::decrypt(&hsm, "v00002.safetensors", &enc).is_err());
        // Rotation inside the token.
        hsm.generate("kek-2").unwrap();
        hsm.set_current("kek-2");
        let re = atrest::rewrap(&hsm, &enc).unwrap().expect("re-wrapped");
        assert_eq!(atrest::kek_of(&re).as_deref(), Some("kek-2"));
        assert_eq!(
            atrest::decrypt(&hsm, "v00001.safetensors", &re).unwrap(),
            plain
        );
        // A wrong PIN is refused.
        drop(hsm);
        assert!(Pkcs11Provider::open(Path::new(MODULE), "cohort-test", "0000", "kek-1").is_err());
    }
}
