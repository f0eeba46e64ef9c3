//! Text and files a node reads: the `[tls]` section of a configuration, a certificate's
//! identity and role, a CRL, an encrypted artifact's envelope, and a passphrase-encrypted
//! private key.
#![no_main]

use cohort_crypto::atrest::{self, KeyFileProvider};
use cohort_crypto::pki;
use cohort_protocol::tls::TlsFiles;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = toml::from_str::<TlsFiles>(text);
        let _ = pki::revoked_serials(text);
        let _ = pki::serial_of(text);
        // An encrypted key nobody made with this passphrase must not open.
        let _ = cohort_protocol::tls::encrypt_key_pem(text, "pass", &[1; 16], &[2; 16]);
        if cohort_protocol::tls::decrypt_key_pem(text, "pass").is_ok() {
            panic!("a key nobody encrypted with this passphrase decrypted");
        }
    }
    let _ = pki::identity_of(data);
    let keys = KeyFileProvider::from_keys(vec![("kek-1".into(), [7; 32])], "kek-1").unwrap();
    let _ = atrest::kek_of(data);
    if atrest::decrypt(&keys, "v00001.safetensors", data).is_ok() {
        panic!("an envelope nobody made with this key decrypted");
    }
});
