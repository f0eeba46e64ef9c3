//! A federation's public-key infrastructure: its certificate authority, the certificates it
//! issues (one identity and one role each), and its certificate revocation list. PEM in, PEM
//! out; writing files (with mode 0600 for keys) is the caller's job.
//!
//! An identity is the certificate's subject common name. Its role is a URI subject
//! alternative name `urn:cohort:role:<role>`, so any X.509 tool shows both, and a
//! certificate without a role is never accepted.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::CryptoError;

/// What a certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The coordinator's listeners (server certificate).
    Coordinator,
    /// A data holder or key custodian: the Federation service only.
    Participant,
    /// An operator: the Admin service only.
    Admin,
    /// An application calling the inference service.
    Inference,
}

const ROLE_PREFIX: &str = "urn:cohort:role:";

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Participant => "participant",
            Role::Admin => "admin",
            Role::Inference => "inference",
        }
    }

    fn uri(self) -> String {
        format!("{ROLE_PREFIX}{}", self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = CryptoError;
    fn from_str(s: &str) -> Result<Self, CryptoError> {
        Ok(match s {
            "coordinator" => Role::Coordinator,
            "participant" => Role::Participant,
            "admin" => Role::Admin,
            "inference" => Role::Inference,
            other => {
                return Err(CryptoError::Pki(format!(
                    "unknown role {other:?} (coordinator, participant, admin or inference)"
                )));
            }
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn pki(e: impl std::fmt::Display) -> CryptoError {
    CryptoError::Pki(e.to_string())
}

fn when(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's serial number (what a CRL names).
    pub serial: Vec<u8>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("serial", &hex_bytes(&self.serial))
            .finish_non_exhaustive()
    }
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What to put in a certificate besides identity and role.
#[derive(Debug, Clone)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From `now` (less five minutes of clock skew) for `days`. The caller reads the clock.
    pub fn days(now: SystemTime, days: u64) -> Self {
        Validity {
            not_before: now - Duration::from_secs(300),
            not_after: now + Duration::from_secs(days * 86_400),
        }
    }
}

/// The federation's certificate authority.
pub struct Authority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authority(..)")
    }
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and without a leading zero byte
    SerialNumber::from_slice(&b)
}

impl Authority {
    /// A new self-signed CA named `name`.
    pub fn generate(name: &str, validity: &Validity) -> Result<Self, CryptoError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "cohort federation");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = when(validity.not_before);
        params.not_after = when(validity.not_after);
        params.serial_number = Some(random_serial());
        params.key_identifier_method = KeyIdMethod::Sha256;
        let key = KeyPair::generate().map_err(pki)?;
        let cert = params.self_signed(&key).map_err(pki)?;
        let key_pem = key.serialize_pem();
        Ok(Authority {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and key (as [`Self::cert_pem`] and [`Self::key_pem`] wrote).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CryptoError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| pki(format!("CA key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| pki(format!("CA certificate: {e}")))?;
        Ok(Authority {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A certificate for `identity` in `role`. Coordinators get server authentication for
    /// `dns` names and `ips`; everyone else gets client authentication.
    pub fn issue(
        &self,
        identity: &str,
        role: Role,
        dns: &[String],
        ips: &[IpAddr],
        validity: &Validity,
    ) -> Result<Issued, CryptoError> {
        if identity.is_empty() || identity.len() > 64 || identity.contains(['/', '\\', '\0']) {
            return Err(CryptoError::Pki(format!(
                "identity {identity:?} must be 1 to 64 characters without slashes"
            )));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, identity);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "cohort federation");
        let mut sans = vec![SanType::URI(role.uri().try_into().map_err(pki)?)];
        for d in dns {
            sans.push(SanType::DnsName(d.clone().try_into().map_err(pki)?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if role == Role::Coordinator {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.not_before = when(validity.not_before);
        params.not_after = when(validity.not_after);
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(pki)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(pki)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: serial.to_bytes(),
        })
    }

    /// A CRL naming `revoked` serial numbers, issued at `now` and valid for `days`; `number`
    /// must grow with each new CRL. The caller reads the clock.
    pub fn crl(
        &self,
        revoked: &[Vec<u8>],
        number: u64,
        days: u64,
        now: SystemTime,
    ) -> Result<String, CryptoError> {
        let params = CertificateRevocationListParams {
            this_update: when(now - Duration::from_secs(300)),
            next_update: when(now + Duration::from_secs(days.max(1) * 86_400)),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: when(now - Duration::from_secs(60)),
                    reason_code: Some(RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .and_then(|c| c.pem())
            .map_err(pki)
    }
}

/// When a certificate (DER) stops being valid: its notAfter, in seconds since the Unix epoch.
pub fn not_after_of(cert_der: &[u8]) -> Result<i64, CryptoError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| pki(format!("certificate does not parse: {e}")))?;
    Ok(cert.validity().not_after.timestamp())
}

/// [`not_after_of`] for the first certificate of a PEM text.
pub fn not_after_of_pem(cert_pem: &str) -> Result<i64, CryptoError> {
    not_after_of(&der_of(cert_pem)?)
}

/// The DNS names and IP addresses a certificate is for (its subject alternative names).
pub fn names_of(cert_der: &[u8]) -> Result<(Vec<String>, Vec<std::net::IpAddr>), CryptoError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| pki(format!("certificate does not parse: {e}")))?;
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    if let Some(sans) = cert
        .subject_alternative_name()
        .map_err(|e| pki(format!("subject alternative names: {e}")))?
    {
        for n in &sans.value.general_names {
            match n {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).expect("4"))),
                    16 => ips.push(std::net::IpAddr::from(
                        <[u8; 16]>::try_from(*b).expect("16"),
                    )),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok((dns, ips))
}

/// A date and time in seconds since the Unix epoch as `2026-12-02 07:15:00 UTC`.
pub fn utc(unix_seconds: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp(unix_seconds).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// When a certificate with this notAfter has expired at `now` (both in Unix seconds; the
/// caller reads the clock): `Some` of the date, as [`utc`] writes it; `None` while it is valid.
pub fn expired_at(not_after: i64, now: i64) -> Option<String> {
    (now > not_after).then(|| utc(not_after))
}

/// The identity and role a (chain-verified) certificate carries.
pub fn identity_of(cert_der: &[u8]) -> Result<(String, Role), CryptoError> {
    identity_and_expiry(cert_der).map(|(id, role, _)| (id, role))
}

/// [`identity_of`] and [`not_after_of`] from one parse (what every call's check needs).
pub fn identity_and_expiry(cert_der: &[u8]) -> Result<(String, Role, i64), CryptoError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| pki(format!("certificate does not parse: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .ok_or_else(|| pki("certificate has no common name"))?
        .to_string();
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| pki(format!("subject alternative names: {e}")))?
        .ok_or_else(|| pki("certificate names no role"))?;
    let mut roles = sans.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => u.strip_prefix(ROLE_PREFIX),
        _ => None,
    });
    let role = roles
        .next()
        .ok_or_else(|| pki("certificate names no role"))?
        .parse()?;
    if roles.next().is_some() {
        return Err(pki("certificate names more than one role"));
    }
    Ok((cn, role, cert.validity().not_after.timestamp()))
}

/// The serial number of a PEM certificate (to revoke it).
pub fn serial_of(cert_pem: &str) -> Result<Vec<u8>, CryptoError> {
    use x509_parser::prelude::*;
    let (_, pem) = parse_x509_pem(cert_pem.as_bytes()).map_err(|e| pki(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| pki(e.to_string()))?;
    Ok(cert.raw_serial().to_vec())
}

/// The DER bytes of a PEM certificate (what a TLS peer presents).
pub fn der_of(cert_pem: &str) -> Result<Vec<u8>, CryptoError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| pki(format!("not a PEM certificate: {e}")))?;
    Ok(pem.contents)
}

/// What a participant signs with its certificate's key to bind its secure-aggregation keys
/// (X25519 sealing key, Ed25519 signing key) to its identity, so that nobody relaying them (the
/// coordinator) can substitute its own.
pub fn binding_message(seal_key: &[u8; 32], verify_key: &[u8; 32]) -> Vec<u8> {
    [b"cohort.v1/key-binding".as_slice(), seal_key, verify_key].concat()
}

/// Signs `msg` with a certificate's private key (PEM, as `cohort provision` writes it).
pub fn sign_with_key(key_pem: &str, msg: &[u8]) -> Result<Vec<u8>, CryptoError> {
    use rcgen::SigningKey;
    KeyPair::from_pem(key_pem)
        .and_then(|k| k.sign(msg))
        .map_err(|e| pki(format!("signing with the certificate key: {e}")))
}

/// Checks that `cert_der` was issued by the CA of `ca_pem`, is valid at `now`, names
/// `identity` as a participant, and that its key signed `msg` with `signature`.
pub fn verify_binding(
    ca_pem: &str,
    cert_der: &[u8],
    identity: &str,
    msg: &[u8],
    signature: &[u8],
    now: SystemTime,
) -> Result<(), CryptoError> {
    use x509_parser::prelude::*;
    let (_, ca_pem) = parse_x509_pem(ca_pem.as_bytes()).map_err(|e| pki(format!("CA: {e}")))?;
    let ca = ca_pem.parse_x509().map_err(|e| pki(format!("CA: {e}")))?;
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| pki(format!("{identity:?}'s certificate: {e}")))?;
    cert.verify_signature(Some(ca.public_key())).map_err(|_| {
        pki(format!(
            "{identity:?}'s certificate is not from this federation's CA"
        ))
    })?;
    let at = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .and_then(|d| ASN1Time::from_timestamp(d.as_secs() as i64).ok())
        .ok_or_else(|| pki("the time given is not a valid certificate time"))?;
    if !cert.validity().is_valid_at(at) {
        return Err(pki(format!(
            "{identity:?}'s certificate is expired or not yet valid"
        )));
    }
    let (id, role) = identity_of(cert_der)?;
    if id != identity || role != Role::Participant {
        return Err(pki(format!(
            "the certificate presented for {identity:?} is {id:?}'s ({role})"
        )));
    }
    let key = &cert.public_key().subject_public_key.data;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(msg, signature)
        .map_err(|_| {
            pki(format!(
                "{identity:?}'s keys are not signed by its certificate's key"
            ))
        })
}

/// The serial number of a DER certificate.
pub fn serial_of_der(cert_der: &[u8]) -> Result<Vec<u8>, CryptoError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| pki(e.to_string()))?;
    Ok(cert.raw_serial().to_vec())
}

/// The serial numbers a PEM CRL revokes (the CRL's signature is checked by the TLS
/// verifier that loads it, not here).
pub fn revoked_serials(crl_pem: &str) -> Result<Vec<Vec<u8>>, CryptoError> {
    use x509_parser::prelude::*;
    let mut out = Vec::new();
    for pem in Pem::iter_from_buffer(crl_pem.as_bytes()) {
        let pem = pem.map_err(|e| pki(format!("CRL: {e}")))?;
        let (_, crl) = parse_x509_crl(&pem.contents).map_err(|e| pki(format!("CRL: {e}")))?;
        out.extend(
            crl.iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec()),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        use x509_parser::prelude::*;
        parse_x509_pem(pem.as_bytes()).unwrap().1.contents
    }

    #[test]
    fn issued_certificates_carry_identity_and_role_and_reload() {
        let ca = Authority::generate(
            "test federation",
            &Validity::days(std::time::SystemTime::now(), 10),
        )
        .unwrap();
        let p = ca
            .issue(
                "hospital-a",
                Role::Participant,
                &[],
                &[],
                &Validity::days(std::time::SystemTime::now(), 1),
            )
            .unwrap();
        assert_eq!(
            identity_of(&der(&p.cert_pem)).unwrap(),
            ("hospital-a".to_string(), Role::Participant)
        );
        assert_eq!(serial_of(&p.cert_pem).unwrap(), p.serial);
        // notAfter is the validity's end, to the second.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let left = not_after_of_pem(&p.cert_pem).unwrap() - now;
        assert!((86_398..=86_400).contains(&left), "{left}");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_796_198_400), "2026-12-02 08:00:00 UTC");
        assert_eq!(utc(951_782_400 + 3_661), "2000-02-29 01:01:01 UTC");
        let c = ca
            .issue(
                "coordinator",
                Role::Coordinator,
                &["localhost".into()],
                &["127.0.0.1".parse().unwrap()],
                &Validity::days(std::time::SystemTime::now(), 1),
            )
            .unwrap();
        assert_eq!(identity_of(&der(&c.cert_pem)).unwrap().1, Role::Coordinator);
        // A reloaded authority issues certificates too, and CRLs.
        let again = Authority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let a = again
            .issue(
                "ops",
                Role::Admin,
                &[],
                &[],
                &Validity::days(std::time::SystemTime::now(), 1),
            )
            .unwrap();
        assert_eq!(identity_of(&der(&a.cert_pem)).unwrap().1, Role::Admin);
        let crl = again
            .crl(std::slice::from_ref(&p.serial), 2, 7, SystemTime::now())
            .unwrap();
        assert!(crl.contains("BEGIN X509 CRL"));
        assert_eq!(revoked_serials(&crl).unwrap(), vec![p.serial.clone()]);
        assert_eq!(serial_of_der(&der(&p.cert_pem)).unwrap(), p.serial);
        assert!(
            ca.issue(
                "a/b",
                Role::Participant,
                &[],
                &[],
                &Validity::days(std::time::SystemTime::now(), 1)
            )
            .is_err()
        );
        assert!("auditor".parse::<Role>().is_err());
        // Key bindings: signed by the certificate's key, checked against the CA and identity.
        let msg = binding_message(&[1; 32], &[2; 32]);
        let sig = sign_with_key(&p.key_pem, &msg).unwrap();
        let cert = der(&p.cert_pem);
        verify_binding(
            ca.cert_pem(),
            &cert,
            "hospital-a",
            &msg,
            &sig,
            SystemTime::now(),
        )
        .unwrap();
        let other_keys = binding_message(&[3; 32], &[2; 32]);
        assert!(
            verify_binding(
                ca.cert_pem(),
                &cert,
                "hospital-a",
                &other_keys,
                &sig,
                SystemTime::now()
            )
            .is_err()
        );
        assert!(
            verify_binding(
                ca.cert_pem(),
                &cert,
                "hospital-b",
                &msg,
                &sig,
                SystemTime::now()
            )
            .is_err()
        );
        let stranger = Authority::generate(
            "elsewhere",
            &Validity::days(std::time::SystemTime::now(), 1),
        )
        .unwrap();
        assert!(
            verify_binding(
                stranger.cert_pem(),
                &cert,
                "hospital-a",
                &msg,
                &sig,
                SystemTime::now()
            )
            .is_err()
        );
        let admin_sig = sign_with_key(&a.key_pem, &msg).unwrap();
        assert!(
            verify_binding(
                ca.cert_pem(),
                &der(&a.cert_pem),
                "ops",
                &msg,
                &admin_sig,
                SystemTime::now()
            )
            .is_err()
        );
    }
}
