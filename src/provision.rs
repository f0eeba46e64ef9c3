//! `cohort provision`, `cohort renew` and `cohort revoke`: a federation's certificates and
//! ready-to-use configurations, written to one directory.
//!
//! ```text
//! DIR/ca/ca.pem, ca.key (0600), revoked.txt    the authority (keep ca.key offline)
//! DIR/crl.pem                                   the current revocation list
//! DIR/coordinator/{ca,cert,crl}.pem, key.pem    the coordinator's listener ([tls] snippet
//!                                               in tls.toml)
//! DIR/<role>s/<id>/{ca,cert}.pem, key.pem       one directory per identity, with its
//!                                               participant.toml (participants, custodians),
//!                                               admin.toml (admins) or client.toml
//!                                               (inference clients: `cohort predict`)
//! ```
//!
//! Every key is created with mode 0600 in the directory it belongs to and is never copied.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cohort_crypto::pki::{Authority, Role, Validity, serial_of};

#[derive(clap::Args, Debug, Clone)]
pub struct ProvisionArgs {
    /// Directory to create (must not exist yet, or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// The federation's name (in the CA certificate).
    #[arg(long, default_value = "cohort federation")]
    pub federation: String,
    /// Where participants reach the coordinator, e.g. `https://fl.example.org:7400`.
    #[arg(long, default_value = "https://127.0.0.1:7400")]
    pub coordinator_url: String,
    /// DNS names in the coordinator's certificate (besides "coordinator").
    #[arg(long, value_delimiter = ',', default_value = "localhost")]
    pub dns: Vec<String>,
    /// IP addresses in the coordinator's certificate.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub ip: Vec<IpAddr>,
    /// Participant identities (data holders).
    #[arg(long, value_delimiter = ',')]
    pub participants: Vec<String>,
    /// Key custodians (participant certificates, role = "custodian" configurations).
    #[arg(long, value_delimiter = ',')]
    pub custodians: Vec<String>,
    /// Operators (admin certificates).
    #[arg(long, value_delimiter = ',')]
    pub admins: Vec<String>,
    /// Applications calling the inference service.
    #[arg(long, value_delimiter = ',')]
    pub inference: Vec<String>,
    /// Validity of the issued certificates, in days (the CA gets ten times as long).
    #[arg(long, default_value_t = 365)]
    pub days: u64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RevokeArgs {
    /// A directory written by `cohort provision`.
    #[arg(long)]
    pub dir: PathBuf,
    /// Identities to revoke (their certificates under DIR).
    #[arg(required = true)]
    pub identities: Vec<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RenewArgs {
    /// A directory written by `cohort provision`.
    #[arg(long)]
    pub dir: PathBuf,
    /// Identities to renew (`coordinator`, or a participant's, custodian's, admin's or
    /// inference client's name under DIR).
    #[arg(required = true)]
    pub identities: Vec<String>,
    /// Validity of the new certificates, in days from now.
    #[arg(long, default_value_t = 365)]
    pub days: u64,
}

/// Writes `text` to `path`; keys with mode 0600, created new (never overwriting).
fn write(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = o
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Replaces the private key at `path` with `text`, atomically, mode 0600 (the temporary
/// file is created 0600 too, so the key is never readable by others).
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    write(&tmp, text, true)?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// Replaces `path` atomically (for the CRL, which listeners re-read).
fn replace(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn check_id(kind: &str, id: &str) -> anyhow::Result<()> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("{kind} {id:?}: use letters, digits, '-', '_' and '.' only");
    }
    Ok(())
}

/// Creates the federation's directory.
pub fn provision(a: &ProvisionArgs) -> anyhow::Result<()> {
    if a.out.exists()
        && std::fs::read_dir(&a.out)
            .with_context(|| format!("reading {}", a.out.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} exists and is not empty: provision into a new directory",
            a.out.display()
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (kind, ids) in [
        ("participant", &a.participants),
        ("custodian", &a.custodians),
        ("admin", &a.admins),
        ("inference client", &a.inference),
    ] {
        for id in ids {
            check_id(kind, id)?;
            if id == "coordinator" || !seen.insert(id.clone()) {
                bail!("identity {id:?} is used twice");
            }
        }
    }
    if a.participants.is_empty() {
        bail!("--participants: name at least one participant");
    }
    let ca_dir = a.out.join("ca");
    std::fs::create_dir_all(&ca_dir).with_context(|| format!("creating {}", ca_dir.display()))?;
    let ca = Authority::generate(
        &a.federation,
        &Validity::days(std::time::SystemTime::now(), a.days * 10),
    )?;
    write(&ca_dir.join("ca.pem"), ca.cert_pem(), false)?;
    write(&ca_dir.join("ca.key"), ca.key_pem(), true)?;
    write(&ca_dir.join("revoked.txt"), "", false)?;
    let crl = ca.crl(&[], 1, 30, std::time::SystemTime::now())?;
    write(&a.out.join("crl.pem"), &crl, false)?;
    let validity = Validity::days(std::time::SystemTime::now(), a.days);

    let coord = a.out.join("coordinator");
    std::fs::create_dir_all(&coord)?;
    let mut dns = vec!["coordinator".to_string()];
    dns.extend(a.dns.iter().cloned());
    let c = ca.issue("coordinator", Role::Coordinator, &dns, &a.ip, &validity)?;
    write(&coord.join("ca.pem"), ca.cert_pem(), false)?;
    write(&coord.join("cert.pem"), &c.cert_pem, false)?;
    write(&coord.join("key.pem"), &c.key_pem, true)?;
    write(&coord.join("crl.pem"), &crl, false)?;
    cohort_storage::add_key(&coord.join("kek")).map_err(anyhow::Error::msg)?;
    write(
        &coord.join("tls.toml"),
        "# Paste into coordinator.toml (paths relative to that file).\n[tls]\nca = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\ncrl = \"crl.pem\"   # replace it with the federation's newest CRL: it is re-read while running\n\n# Model versions encrypted at rest (AES-256-GCM; rotate with `cohort rotate-keys`).\n[at_rest]\nkey_dir = \"kek\"\n",
        false,
    )?;

    let groups: [(&str, Role, &Vec<String>); 4] = [
        ("participants", Role::Participant, &a.participants),
        ("custodians", Role::Participant, &a.custodians),
        ("admins", Role::Admin, &a.admins),
        ("inference", Role::Inference, &a.inference),
    ];
    for (dir, role, ids) in groups {
        for id in ids {
            let d = a.out.join(dir).join(id);
            std::fs::create_dir_all(&d)?;
            let issued = ca.issue(id, role, &[], &[], &validity)?;
            write(&d.join("ca.pem"), ca.cert_pem(), false)?;
            write(&d.join("cert.pem"), &issued.cert_pem, false)?;
            write(&d.join("key.pem"), &issued.key_pem, true)?;
            let tls = "[tls]\nca = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\nserver_name = \"coordinator\"\n";
            match dir {
                "participants" => write(
                    &d.join("participant.toml"),
                    &format!(
                        "# Participant {id}. Run: cohort participant --config participant.toml\n\
                         coordinator = \"{url}\"\nid = \"{id}\"\n\n{tls}\n\
                         # This site's data; it never leaves this machine.\n\
                         [data]\nformat = \"csv\"       # or \"idx\" (an MNIST-style directory)\n\
                         path = \"data.csv\"      # relative to this file\nlabel = \"last\"\n",
                        url = a.coordinator_url
                    ),
                    false,
                )?,
                "custodians" => write(
                    &d.join("participant.toml"),
                    &format!(
                        "# Key custodian {id} (no data). Run: cohort participant --config participant.toml\n\
                         coordinator = \"{url}\"\nid = \"{id}\"\nrole = \"custodian\"\n\n{tls}",
                        url = a.coordinator_url
                    ),
                    false,
                )?,
                "admins" => write(
                    &d.join("admin.toml"),
                    &format!(
                        "# Operator {id}. Run: cohort admin --config admin.toml status\ncoordinator = \"{url}\"\n\n{tls}",
                        url = a.coordinator_url
                    ),
                    false,
                )?,
                "inference" => write(
                    &d.join("client.toml"),
                    &format!(
                        "# Inference client {id}. Run: cohort predict --config client.toml --csv rows.csv\n\
                         # The coordinator's address serves predictions when it embeds the\n\
                         # Inference service; point this at `cohort serve` otherwise.\n\
                         server = \"{url}\"\n\n{tls}",
                        url = a.coordinator_url
                    ),
                    false,
                )?,
                _ => write(&d.join("tls.toml"), tls, false)?,
            }
        }
    }
    Ok(())
}

/// Renews identities provisioned under `dir`: a new key and a certificate from the same CA
/// for the same identity, role and names, valid for `days` from now, replacing `cert.pem`
/// and `key.pem` in the identity's directory (the key written with mode 0600). Returns each
/// identity's directory and the new certificate's expiry (Unix seconds).
pub fn renew(a: &RenewArgs) -> anyhow::Result<Vec<(PathBuf, i64)>> {
    let ca_dir = a.dir.join("ca");
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let ca = Authority::from_pem(&read(ca_dir.join("ca.pem"))?, &read(ca_dir.join("ca.key"))?)?;
    let validity = Validity::days(std::time::SystemTime::now(), a.days);
    let mut out = Vec::new();
    for id in &a.identities {
        let dir = if id == "coordinator" {
            a.dir.join("coordinator")
        } else {
            ["participants", "custodians", "admins", "inference"]
                .iter()
                .map(|g| a.dir.join(g).join(id))
                .find(|d| d.join("cert.pem").is_file())
                .with_context(|| format!("no certificate for {id:?} under {}", a.dir.display()))?
        };
        let old = cohort_crypto::pki::der_of(&read(dir.join("cert.pem"))?)?;
        let (identity, role) = cohort_crypto::pki::identity_of(&old)?;
        let (dns, ips) = cohort_crypto::pki::names_of(&old)?;
        let issued = ca.issue(&identity, role, &dns, &ips, &validity)?;
        write_private(&dir.join("key.pem"), &issued.key_pem)?;
        replace(&dir.join("cert.pem"), &issued.cert_pem)?;
        let not_after = cohort_crypto::pki::not_after_of_pem(&issued.cert_pem)?;
        out.push((dir, not_after));
    }
    Ok(out)
}

/// Revokes identities provisioned under `dir`: appends their serials to ca/revoked.txt and
/// writes a new CRL to DIR/crl.pem and DIR/coordinator/crl.pem (which the coordinator
/// re-reads without a restart).
pub fn revoke(a: &RevokeArgs) -> anyhow::Result<()> {
    let ca_dir = a.dir.join("ca");
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let ca = Authority::from_pem(&read(ca_dir.join("ca.pem"))?, &read(ca_dir.join("ca.key"))?)?;
    let revoked_path = ca_dir.join("revoked.txt");
    let mut lines: Vec<String> = read(revoked_path.clone())?
        .lines()
        .map(str::to_string)
        .collect();
    for id in &a.identities {
        let cert = ["participants", "custodians", "admins", "inference"]
            .iter()
            .map(|g| a.dir.join(g).join(id).join("cert.pem"))
            .find(|p| p.is_file())
            .with_context(|| format!("no certificate for {id:?} under {}", a.dir.display()))?;
        let serial = serial_of(&read(cert)?)?;
        let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
        if !lines.iter().any(|l| l.starts_with(&hex)) {
            lines.push(format!("{hex} {id}"));
        }
    }
    let serials = lines
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .map(|h| {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()
        .context("ca/revoked.txt is damaged")?;
    // CRL numbers must grow: the time in seconds does, across runs.
    let number = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    let crl = ca.crl(&serials, number, 30, std::time::SystemTime::now())?;
    replace(&revoked_path, &(lines.join("\n") + "\n"))?;
    replace(&a.dir.join("crl.pem"), &crl)?;
    let coord_crl = a.dir.join("coordinator").join("crl.pem");
    if coord_crl.parent().is_some_and(Path::is_dir) {
        replace(&coord_crl, &crl)?;
    }
    Ok(())
}
