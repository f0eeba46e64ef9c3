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
}

/// TLS material that cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

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

    /// The listener's configuration, reading every file now (call again to reload the CRL).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let crl = self.crl.as_deref().map(read).transpose()?;
        server_config(
            &read(&self.ca)?,
            &read(&self.cert)?,
            &read(&self.key)?,
            crl.as_deref(),
        )
    }

    /// A client node's material, read now.
    pub fn node(&self) -> Result<NodeTls, TlsError> {
        Ok(NodeTls {
            ca_pem: read(&self.ca)?,
            cert_pem: read(&self.cert)?,
            key_pem: read(&self.key)?,
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
