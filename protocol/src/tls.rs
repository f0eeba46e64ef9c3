//! Mutual TLS for every cohort listener and client: TLS 1.3 only on the server, client
//! certificates required and verified against the federation CA and its CRL, rustls with
//! the ring provider (the only one in the build).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;

/// A node's TLS material: the federation CA, its own certificate and key, and (on listeners)
/// the CRL. Paths in configuration files are relative to the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate revocation list (listeners; re-read while running).
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// The coordinator's name in its certificate (clients; default "coordinator").
    #[serde(default)]
    pub server_name: Option<String>,
    /// When `key` is encrypted (`cohort protect-key`): the environment variable holding its
    /// passphrase (never the passphrase itself).
    #[serde(default)]
    pub key_passphrase_env: Option<String>,
}

const ENCRYPTED_LABEL: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----";

/// Encrypts a PKCS#8 private key (PEM) with `passphrase`: PBES2 with scrypt (log₂N = 15,
/// r = 8, p = 1) and AES-256-CBC, the standard "ENCRYPTED PRIVATE KEY" form that OpenSSL
/// also reads. `salt` and `iv` must be fresh random bytes.
pub fn encrypt_key_pem(
    pem: &str,
    passphrase: &str,
    salt: &[u8; 16],
    iv: &[u8; 16],
) -> Result<String, TlsError> {
    use pkcs8::der::{Decode, pem::LineEnding};
    if passphrase.is_empty() {
        return Err(TlsError("the passphrase is empty".into()));
    }
    let (label, doc) = pkcs8::SecretDocument::from_pem(pem)
        .map_err(|e| TlsError(format!("not a PEM private key: {e}")))?;
    if label != "PRIVATE KEY" {
        return Err(TlsError(format!(
            "expected a PKCS#8 \"PRIVATE KEY\", found {label:?}"
        )));
    }
    let info = pkcs8::PrivateKeyInfo::from_der(doc.as_bytes())
        .map_err(|e| TlsError(format!("not a PKCS#8 private key: {e}")))?;
    let params = pkcs8::pkcs5::pbes2::Parameters::scrypt_aes256cbc(Default::default(), salt, iv)
        .map_err(|e| TlsError(e.to_string()))?;
    let enc = info
        .encrypt_with_params(params, passphrase)
        .map_err(|e| TlsError(format!("encrypting the key: {e}")))?;
    enc.to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
        .map(|p| p.to_string())
        .map_err(|e| TlsError(e.to_string()))
}

/// Decrypts what [`encrypt_key_pem`] wrote.
pub fn decrypt_key_pem(pem: &str, passphrase: &str) -> Result<String, TlsError> {
    use pkcs8::der::pem::LineEnding;
    let (label, doc) =
        pkcs8::Document::from_pem(pem).map_err(|e| TlsError(format!("not a PEM key: {e}")))?;
    if label != "ENCRYPTED PRIVATE KEY" {
        return Err(TlsError(format!(
            "expected an \"ENCRYPTED PRIVATE KEY\", found {label:?}"
        )));
    }
    let info = pkcs8::EncryptedPrivateKeyInfo::try_from(doc.as_bytes())
        .map_err(|e| TlsError(format!("not an encrypted PKCS#8 key: {e}")))?;
    let plain = info
        .decrypt(passphrase)
        .map_err(|_| TlsError("wrong passphrase, or the key is damaged".into()))?;
    plain
        .to_pem("PRIVATE KEY", LineEnding::LF)
        .map(|p| p.to_string())
        .map_err(|e| TlsError(e.to_string()))
}

/// TLS material that cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

/// Seconds since the Unix epoch, now (0 if the clock is before it): the `now` of certificate
/// expiry checks.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError(format!("{}: {e}", path.display())))
}

impl TlsFiles {
    /// Makes relative paths relative to `dir` (the configuration file's directory).
    pub fn relative_to(mut self, dir: &Path) -> Self {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        if let Some(c) = self.crl.as_mut()
            && c.is_relative()
        {
            *c = dir.join(&*c);
        }
        self
    }

    /// The private key as plaintext PKCS#8 PEM, in memory only: decrypted with the
    /// passphrase from `key_passphrase_env` when the file is encrypted.
    pub fn key_pem(&self) -> Result<String, TlsError> {
        let pem = read(&self.key)?;
        if !pem.contains(ENCRYPTED_LABEL) {
            return Ok(pem);
        }
        let var = self.key_passphrase_env.as_deref().ok_or_else(|| {
            TlsError(format!(
                "{}: the key is encrypted; name the environment variable that holds its \
                 passphrase with key_passphrase_env",
                self.key.display()
            ))
        })?;
        let pass = std::env::var(var).map_err(|_| {
            TlsError(format!(
                "{}: the key's passphrase variable {var} is not set",
                self.key.display()
            ))
        })?;
        decrypt_key_pem(&pem, &pass)
            .map_err(|e| TlsError(format!("{}: {}", self.key.display(), e.0)))
    }

    /// The listener's configuration, reading every file now (call again to reload the CRL).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let crl = self.crl.as_deref().map(read).transpose()?;
        server_config(
            &read(&self.ca)?,
            &read(&self.cert)?,
            &self.key_pem()?,
            crl.as_deref(),
        )
    }

    /// A client node's material, read now.
    pub fn node(&self) -> Result<NodeTls, TlsError> {
        Ok(NodeTls {
            ca_pem: read(&self.ca)?,
            cert_pem: read(&self.cert)?,
            key_pem: self.key_pem()?,
            server_name: self
                .server_name
                .clone()
                .unwrap_or_else(|| "coordinator".into()),
        })
    }
}

/// A client node's TLS material in memory: it connects with it, signs its secure-aggregation
/// keys with the certificate's key, and checks others' key bindings against the CA.
#[derive(Clone)]
pub struct NodeTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub server_name: String,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// The client side for tonic channels.
    pub fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        client_config(
            &self.ca_pem,
            &self.cert_pem,
            &self.key_pem,
            &self.server_name,
        )
    }
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{what}: no certificate in the file")));
    }
    Ok(certs)
}

/// A TLS 1.3-only server configuration that requires a client certificate issued by `ca_pem`
/// and not revoked by `crl_pem`.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    crl_pem: Option<&str>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        roots
            .add(c)
            .map_err(|e| TlsError(format!("CA certificate: {e}")))?;
    }
    let crls: Vec<CertificateRevocationListDer<'static>> = match crl_pem {
        Some(p) => CertificateRevocationListDer::pem_slice_iter(p.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError(format!("CRL: {e}")))?,
        None => Vec::new(),
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|e| TlsError(format!("client verifier: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError(format!("private key: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem, "certificate")?, key)
        .map_err(|e| TlsError(format!("certificate and key: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client configuration presenting `cert_pem` and trusting only `ca_pem`.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    server_name: &str,
) -> tonic::transport::ClientTlsConfig {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem))
        .domain_name(server_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_crypto::pki::{Authority, Role, Validity};

    #[test]
    fn an_encrypted_key_opens_only_with_its_passphrase_and_still_serves() {
        let v = Validity::days(std::time::SystemTime::now(), 1);
        let ca = Authority::generate("test CA", &v).unwrap();
        let node = ca
            .issue(
                "coordinator",
                Role::Coordinator,
                &["coordinator".into()],
                &[],
                &v,
            )
            .unwrap();
        let enc = encrypt_key_pem(&node.key_pem, "s3cret", &[7; 16], &[9; 16]).unwrap();
        assert!(enc.starts_with(ENCRYPTED_LABEL), "{enc}");
        let body: String = node
            .key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        assert!(!enc.contains(&body[..32]), "the plaintext key is visible");
        assert_eq!(
            decrypt_key_pem(&enc, "s3cret").unwrap().trim(),
            node.key_pem.trim()
        );
        let e = decrypt_key_pem(&enc, "wrong").unwrap_err().0;
        assert!(e.contains("wrong passphrase"), "{e}");
        assert!(encrypt_key_pem(&node.key_pem, "", &[7; 16], &[9; 16]).is_err());
        assert!(decrypt_key_pem(&node.key_pem, "s3cret").is_err());

        // From files: an encrypted key without its variable is refused, naming what is missing.
        let dir = std::env::temp_dir().join(format!("cohort-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), &node.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &enc).unwrap();
        let mut files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            crl: None,
            server_name: None,
            key_passphrase_env: None,
        };
        let e = files.server_config().unwrap_err().0;
        assert!(e.contains("key_passphrase_env"), "{e}");
        files.key_passphrase_env = Some("COHORT_TLS_TEST_UNSET_VARIABLE".into());
        let e = files.server_config().unwrap_err().0;
        assert!(e.contains("COHORT_TLS_TEST_UNSET_VARIABLE"), "{e}");
        // A plaintext key needs no passphrase.
        std::fs::write(dir.join("key.pem"), &node.key_pem).unwrap();
        assert!(files.server_config().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
