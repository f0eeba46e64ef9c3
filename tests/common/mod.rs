//! Helpers shared by the end-to-end tests: the binary, child processes that die with the
//! test, data shares and a provisioned federation.
#![allow(dead_code)]

pub mod proxy;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cohort");

/// Kills the child when dropped, so a failing test leaves no process behind.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn wait_for_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let until = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < until,
                "{} did not exit within {limit:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Writes three disjoint shares of the bundled table (row i goes to share i % 3).
pub fn write_shares(dir: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/breast_cancer.csv"),
    )
    .unwrap();
    split_three(dir, &table, "hospital")
}

/// Three disjoint shares of a CSV `table` (row i to share i % 3, each with the header),
/// written as `dir/{name}-{i}.csv`.
pub fn split_three(dir: &Path, table: &str, name: &str) -> Vec<PathBuf> {
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    let mut shares = vec![format!("{header}\n"); 3];
    for (i, row) in lines.enumerate() {
        shares[i % 3] += &format!("{row}\n");
    }
    shares
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = dir.join(format!("{name}-{i}.csv"));
            std::fs::write(&p, s).unwrap();
            p
        })
        .collect()
}

/// The environment variable that holds the passphrase of the encrypted TLS keys.
pub const KEY_PASSPHRASE_ENV: &str = "COHORT_TEST_KEY_PASSPHRASE";
pub const KEY_PASSPHRASE: &str = "correct horse battery staple";

/// `cohort provision` for the three hospitals, an operator and an inference client.
pub fn provision(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    let out = Command::new(BIN)
        .args(["provision", "--out"])
        .arg(&pki)
        .args([
            "--participants",
            "hospital-0,hospital-1,hospital-2",
            "--admins",
            "ops",
            "--inference",
            "app",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The coordinator's and hospital-1's TLS keys are encrypted at rest with a passphrase
    // (`cohort protect-key`); the processes get it from KEY_PASSPHRASE_ENV.
    for key in ["coordinator/key.pem", "participants/hospital-1/key.pem"] {
        let plain = std::fs::read_to_string(pki.join(key)).unwrap();
        let out = Command::new(BIN)
            .args([
                "protect-key",
                "--passphrase-env",
                KEY_PASSPHRASE_ENV,
                "--key",
            ])
            .arg(pki.join(key))
            .env(KEY_PASSPHRASE_ENV, KEY_PASSPHRASE)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let enc = std::fs::read_to_string(pki.join(key)).unwrap();
        assert!(
            enc.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
            "{enc}"
        );
        let body = |pem: &str| {
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>()
        };
        assert!(
            !enc.contains(&body(&plain)[..40]),
            "{key} still holds the plaintext key"
        );
    }
    // Keys are readable by their owner only.
    #[cfg(unix)]
    for key in [
        "ca/ca.key",
        "coordinator/key.pem",
        "participants/hospital-0/key.pem",
        "participants/hospital-1/key.pem",
        "admins/ops/key.pem",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(pki.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key} has mode {mode:o}");
    }
    pki
}

/// Starts participant `hospital-{i}` of the federation provisioned in `dir/pki`, on `share`.
pub fn spawn_participant(
    dir: &Path,
    addr: &str,
    i: usize,
    share: &Path,
    upload_delay_ms: u64,
) -> Proc {
    let faults = format!("upload_delay_ms = {upload_delay_ms}");
    spawn_participant_with(dir, addr, i, share, &faults, "")
}

/// [`spawn_participant`] with the lines of its `[faults]` section and extra top-level
/// configuration keys.
pub fn spawn_participant_with(
    dir: &Path,
    addr: &str,
    i: usize,
    share: &Path,
    faults: &str,
    extra: &str,
) -> Proc {
    let cfg = format!(
        r#"
coordinator = "https://{addr}"
id = "hospital-{i}"
poll_wait_ms = 2000
{extra}
[tls]
ca = "{pki}/participants/hospital-{i}/ca.pem"
cert = "{pki}/participants/hospital-{i}/cert.pem"
key = "{pki}/participants/hospital-{i}/key.pem"
key_passphrase_env = "{KEY_PASSPHRASE_ENV}"
[data]
format = "csv"
path = "{path}"
label = "diagnosis"
test_fraction = 0.2
seed = {i}
[faults]
{faults}
"#,
        path = share.display(),
        pki = dir.join("pki").display()
    );
    spawn_participant_config(dir, i, &cfg)
}

/// Writes `cfg` as participant `i`'s configuration in `dir` and starts `cohort participant`
/// on it.
pub fn spawn_participant_config(dir: &Path, i: usize, cfg: &str) -> Proc {
    let p = dir.join(format!("participant-{i}.toml"));
    std::fs::write(&p, cfg).unwrap();
    let child = Command::new(BIN)
        .args(["participant", "--config"])
        .arg(&p)
        .env(KEY_PASSPHRASE_ENV, KEY_PASSPHRASE)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Proc {
        child,
        name: format!("participant {i}"),
    }
}

/// An Inference client of `addr` holding the certificate of `who` (a directory of `dir/pki`).
pub async fn inference_client(
    dir: &Path,
    who: &str,
    addr: &str,
) -> cohort_protocol::pb::inference_client::InferenceClient<tonic::transport::Channel> {
    let d = dir.join("pki").join(who);
    let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    let tls = cohort_protocol::tls::client_config(
        &read("ca.pem"),
        &read("cert.pem"),
        &read("key.pem"),
        "coordinator",
    );
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    cohort_protocol::pb::inference_client::InferenceClient::new(ch)
}

/// A coordinator process, its address, its metrics address (if any) and its log lines.
pub struct CoordinatorProc {
    pub proc: Proc,
    pub addr: String,
    pub metrics: String,
    /// Log lines (stderr), as they come.
    pub log: mpsc::Receiver<String>,
}

/// Starts `cohort coordinator --config cfg` and waits until it listens.
pub fn spawn_coordinator(cfg: &Path) -> CoordinatorProc {
    spawn_coordinator_env(cfg, &[])
}

/// [`spawn_coordinator`] with extra environment variables.
pub fn spawn_coordinator_env(cfg: &Path, env: &[(&str, &str)]) -> CoordinatorProc {
    let mut child = Command::new(BIN)
        .args(["coordinator", "--config"])
        .arg(cfg)
        .envs(env.iter().copied())
        .env(KEY_PASSPHRASE_ENV, KEY_PASSPHRASE)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (tx, log) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("[coordinator] {line}");
            let _ = tx.send(line);
        }
    });
    let proc = Proc {
        child,
        name: "coordinator".into(),
    };
    let (mut addr, mut metrics) = (String::new(), String::new());
    while addr.is_empty() {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the coordinator exited before listening"
        );
        if let Some(a) = line.trim().strip_prefix("listening on ") {
            addr = a.to_string();
        } else if let Some(m) = line.trim().strip_prefix("metrics on http://") {
            metrics = m.trim_end_matches("/metrics").to_string();
        }
    }
    std::thread::spawn(move || for _ in out.lines() {});
    CoordinatorProc {
        proc,
        addr,
        metrics,
        log,
    }
}

impl CoordinatorProc {
    /// Waits for a log line containing every one of `words`.
    pub fn wait_log(&self, words: &[&str], limit: Duration) -> String {
        wait_for_line(&self.log, words, limit)
    }
}

/// A coordinator's log lines, kept apart from its process.
pub struct CoordinatorLog(pub mpsc::Receiver<String>);

impl CoordinatorLog {
    /// Waits for a log line containing every one of `words`.
    pub fn wait_for(&self, words: &[&str], limit: Duration) -> String {
        wait_for_line(&self.0, words, limit)
    }
}

pub fn wait_for_line(log: &mpsc::Receiver<String>, words: &[&str], limit: Duration) -> String {
    let until = Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match log.recv_timeout(left) {
            Ok(line) if words.iter().all(|w| line.contains(w)) => return line,
            Ok(_) => {}
            Err(_) => panic!("no coordinator log line with {words:?} within {limit:?}"),
        }
    }
}

/// A job specification, as `cohort admin jobs create` sends it.
pub fn job_spec(id: &str, rounds: u64, round_timeout: f64) -> String {
    format!(
        r#"
id = "{id}"
dataset = "breast-cancer"
rounds = {rounds}
min_participants = 3
min_updates = 3
round_timeout_secs = {round_timeout}
eval_timeout_secs = 10
liveness_timeout_secs = 5
seed = 7
strategy = "fedadam"
server_lr = 0.05

[model]
kind = "logistic"
inputs = 30
classes = 2

[train]
epochs = 2
batch_size = 16
learning_rate = 0.1
optimizer = "sgd"
seed = 1

[secure_aggregation]
committee_size = 3
t_min = 2
decrypt_timeout_secs = 10
"#
    )
}

/// [`job_spec`] as the body of coordinator.toml's `[job]` (batch mode).
pub fn job_section(id: &str, rounds: u64, round_timeout: f64) -> String {
    job_spec(id, rounds, round_timeout)
        .replace("[model]", "[job.model]")
        .replace("[train]", "[job.train]")
        .replace("[secure_aggregation]", "[job.secure_aggregation]")
}

/// A free loopback port (so a restarted coordinator listens where participants dial).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `[tls]` and `[at_rest]` sections of a server holding the coordinator's certificate (its
/// key encrypted with [`KEY_PASSPHRASE`]) and key-encryption keys, from `pki`.
pub fn coordinator_sections(pki: &Path) -> String {
    format!(
        r#"
[tls]
ca = "{pki}/coordinator/ca.pem"
cert = "{pki}/coordinator/cert.pem"
key = "{pki}/coordinator/key.pem"
key_passphrase_env = "{KEY_PASSPHRASE_ENV}"
crl = "{pki}/coordinator/crl.pem"

[at_rest]
key_dir = "{pki}/coordinator/kek"
"#,
        pki = pki.display()
    )
}

pub fn coordinator_config(dir: &Path, port: u16, allowed: &str, extra: &str) -> PathBuf {
    let pki = dir.join("pki");
    let cfg = format!(
        r#"
listen = "127.0.0.1:{port}"
model_dir = "{models}"
state_file = "{state}"
metrics_listen = "127.0.0.1:0"
allowed_participants = [{allowed}]
{extra}
{sections}"#,
        models = dir.join("models").display(),
        state = dir.join("state/coordinator.redb").display(),
        sections = coordinator_sections(&pki)
    );
    let p = dir.join("coordinator.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

/// Runs `cohort admin` as the operator `ops` (or with `config`), returning success and
/// stdout, with stderr appended on failure.
pub fn admin_as(dir: &Path, config: &Path, addr: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("admin")
        .arg("--config")
        .arg(config)
        .args(["--coordinator", &format!("https://{addr}")])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        text += &String::from_utf8_lossy(&out.stderr);
    }
    (out.status.success(), text)
}

pub fn admin(dir: &Path, addr: &str, args: &[&str]) -> String {
    let (ok, text) = admin_as(dir, &dir.join("pki/admins/ops/admin.toml"), addr, args);
    assert!(ok, "cohort admin {args:?} failed: {text}");
    text
}

/// A virtual environment `name` with `packages` from PyPI, kept under the target directory.
pub fn python_venv(name: &str, packages: &[&str]) -> PathBuf {
    // Tests of one binary run on threads: one creates the environment, the others wait.
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = CREATING.lock().unwrap_or_else(|e| e.into_inner());
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let python = venv.join("bin/python");
    // Named after what is installed, so that a change reinstalls.
    let ready = venv.join(format!(
        "ready-{}",
        packages.join("-").replace(['[', ']'], "_")
    ));
    if !ready.exists() {
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            assert!(
                out.status.success(),
                "{cmd:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages));
        std::fs::write(&ready, b"").unwrap();
    }
    python
}

/// Every `cohort_…` series the alerting rules query that `include` selects is one this
/// exposition (a /metrics scrape) exports. The coordinator's rules are checked against a
/// coordinator, the inference rules against `cohort serve`.
pub fn alert_rules_name_exported_metrics(include: impl Fn(&str) -> bool, exposition: &str) {
    let families: Vec<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml"),
    )
    .unwrap();
    let mut checked = 0;
    for token in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !token.starts_with("cohort_") || !include(token) {
            continue;
        }
        let known = families.iter().any(|f| {
            token == *f
                || ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .any(|suffix| token.strip_suffix(suffix) == Some(f))
        });
        assert!(
            known,
            "alerts.yml queries {token}, which /metrics does not export"
        );
        checked += 1;
    }
    assert!(
        checked >= 4,
        "only {checked} metric names found in alerts.yml"
    );
}

/// Runs `cmd`, which must succeed; its stdout (stdout and stderr in the panic message if not).
pub fn succeed(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Starts `cohort serve` and waits until it listens; returns it with its gRPC and metrics
/// addresses.
pub fn spawn_serve(dir: &Path, cfg: &str, env: &[(&str, &str)]) -> (Proc, String, String) {
    let p = dir.join("serve.toml");
    std::fs::write(&p, cfg).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&p)
        .envs(env.iter().copied())
        .env(KEY_PASSPHRASE_ENV, KEY_PASSPHRASE)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut addr, mut metrics) = (String::new(), String::new());
    while addr.is_empty() {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "cohort serve exited");
        if let Some(a) = line.trim().strip_prefix("listening on ") {
            addr = a.to_string();
        } else if let Some(m) = line.trim().strip_prefix("metrics on http://") {
            metrics = m.trim_end_matches("/metrics").to_string();
        }
    }
    std::thread::spawn(move || for _ in out.lines() {});
    let proc = Proc {
        child,
        name: "cohort serve".into(),
    };
    (proc, addr, metrics)
}

/// The bundled breast-cancer table made messy: ~10% of the cells missing (`NA` or empty), a
/// text category that depends on the label (with a category the first participants never
/// see in training), and a yes/no column.
pub fn messy_table(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/breast_cancer.csv"),
    )
    .unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let (features, label) = header.split_at(header.len() - 1);
    let mut out = format!("{},grade,smoker,{}\n", features.join(","), label[0]);
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        let (x, y) = f.split_at(f.len() - 1);
        let cells: Vec<String> = x
            .iter()
            .enumerate()
            .map(|(j, v)| match (i * 31 + j * 17) % 20 {
                0 => "NA".to_string(),
                1 => String::new(),
                _ => v.to_string(),
            })
            .collect();
        let grade = match (y[0], i % 3) {
            (_, _) if i % 29 == 0 => "",
            ("1", 0) => "I",
            ("1", _) => "II",
            (_, 0) => "III",
            _ => "IV",
        };
        let smoker = if i % 2 == 0 { "yes" } else { "no" };
        out += &format!("{},{grade},{smoker},{}\n", cells.join(","), y[0]);
    }
    let path = dir.join("messy.csv");
    std::fs::write(&path, out).unwrap();
    path
}

/// GET /metrics over plain HTTP/1.1.
pub fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    body.to_string()
}
