//! What the load and soak benches share: the `cohort coordinator` process they start, its
//! resources as /proc shows them, an admin's mutual-TLS channel to it, and participants'
//! rows.

// Each bench uses part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cohort_model::ComputeSlots;
use cohort_model::Dataset;
use cohort_participant::{AgentOptions, LocalData, ParticipantConfig};
use cohort_protocol::pb::admin_client::AdminClient;
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand::seq::IndexedRandom;

const BIN: &str = env!("CARGO_BIN_EXE_cohort");

/// Issues certificates for `names` and an admin `ops` under `pki` (`cohort provision`).
pub fn provision(pki: &Path, names: &[String]) -> anyhow::Result<()> {
    let out = Command::new(BIN)
        .args(["provision", "--out"])
        .arg(pki)
        .args(["--participants", &names.join(","), "--admins", "ops"])
        .output()?;
    if !out.status.success() {
        bail!("cohort provision: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Starts `cohort coordinator --config <config>` (logging warnings and errors).
pub fn start_coordinator(config: &Path) -> anyhow::Result<Coordinator> {
    // COHORT_BENCH_WRAP runs the coordinator under a tool, e.g. "heaptrack -o /tmp/coordinator".
    let wrap = std::env::var("COHORT_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut command = match words.next() {
        Some(tool) => {
            let mut c = Command::new(tool);
            c.args(words).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    let child = command
        .args(["coordinator", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok(Coordinator(child))
}

/// The admin `ops`'s Admin API client, once the coordinator at `url` listens (30 s at most).
pub async fn admin_client(
    pki: &Path,
    url: &str,
) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    let admin_dir = pki.join("admins").join("ops");
    let read = |f: &str| std::fs::read_to_string(admin_dir.join(f));
    let tls = cohort_protocol::tls::client_config(
        &read("ca.pem")?,
        &read("cert.pem")?,
        &read("key.pem")?,
        "coordinator",
    );
    let started = Instant::now();
    loop {
        match tonic::transport::Endpoint::from_shared(url.to_string())?
            .tls_config(tls.clone())?
            .connect()
            .await
        {
            Ok(c) => return Ok(AdminClient::new(c)),
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => bail!("the coordinator did not listen: {e}"),
        }
    }
}

/// The coordinator process, killed when dropped.
pub struct Coordinator(pub std::process::Child);

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fields of `/proc/PID/status` in kB, in the order asked.
fn status_kb<const N: usize>(pid: u32, names: [&str; N]) -> Option<[u64; N]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    };
    let mut out = [0; N];
    for (o, name) in out.iter_mut().zip(names) {
        *o = field(name)?;
    }
    Some(out)
}

/// Resident memory (kB) of a process, now and at its peak.
pub fn rss_kb(pid: u32) -> Option<(u64, u64)> {
    status_kb(pid, ["VmRSS:", "VmHWM:"]).map(|[now, peak]| (now, peak))
}

/// A process's resident memory (kB) split into anonymous pages (heap, stacks: what the program
/// allocated) and file pages (its executable and libraries as far as they were touched, which
/// grows as new code paths run).
pub fn rss_parts_kb(pid: u32) -> Option<(u64, u64)> {
    status_kb(pid, ["RssAnon:", "RssFile:"]).map(|[anon, file]| (anon, file))
}

/// CPU seconds (user + system) a process has used (`/proc/PID/stat`, in clock ticks of
/// 1/100 s).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(14) + ticks(15)) / 100.0
}

/// Open file descriptors of a process, and how many are sockets.
pub fn fds(pid: u32) -> (usize, usize) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let mut all = 0;
    let mut sockets = 0;
    for e in dir.flatten() {
        all += 1;
        if std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")) {
            sockets += 1;
        }
    }
    (all, sockets)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

pub fn coordinator_config(dir: &Path, pki: &Path, port: u16, names: &[String]) -> String {
    coordinator_config_with(dir, pki, port, names, "")
}

/// [`coordinator_config`] with `extra` TOML keys and sections appended.
pub fn coordinator_config_with(
    dir: &Path,
    pki: &Path,
    port: u16,
    names: &[String],
    extra: &str,
) -> String {
    let c = pki.join("coordinator");
    let p = |f: &str| c.join(f).display().to_string();
    format!(
        r#"listen = "127.0.0.1:{port}"
model_dir = "{models}"
state_file = "{state}"
allowed_participants = {allowed:?}

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
crl = "{crl}"

[at_rest]
key_dir = "{kek}"
{extra}"#,
        models = dir.join("models").display(),
        state = dir.join("state.redb").display(),
        allowed = names,
        ca = p("ca.pem"),
        cert = p("cert.pem"),
        key = p("key.pem"),
        crl = p("crl.pem"),
        kek = p("kek"),
    )
}

/// `rows` rows of the table for participant `i`, drawn with replacement (seeded).
pub fn site_data(table: &Dataset, rows: usize, i: usize) -> anyhow::Result<LocalData> {
    let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
    let all: Vec<usize> = (0..table.len()).collect();
    let pick: Vec<usize> = (0..rows + 4)
        .map(|_| *all.choose(&mut rng).unwrap())
        .collect();
    Ok(LocalData::prepare(
        table.subset(&pick),
        0.2,
        true,
        i as u64,
    )?)
}

/// Participant `name`'s options from its provisioned `participant.toml`, dialling `url`,
/// training on `compute`.
pub fn agent_options(
    pki: &Path,
    name: &str,
    url: &str,
    compute: &Arc<ComputeSlots>,
) -> anyhow::Result<AgentOptions> {
    let path = pki.join("participants").join(name).join("participant.toml");
    let pc = ParticipantConfig::load(&path).map_err(anyhow::Error::msg)?;
    let mut opts = pc.options();
    opts.coordinator = url.to_string();
    opts.tls = Some(
        pc.tls
            .as_ref()
            .context("no [tls]")?
            .node()
            .map_err(anyhow::Error::msg)?,
    );
    opts.compute = Some(compute.clone());
    Ok(opts)
}

/// A job of secure rounds of logistic regression on the breast-cancer table, as both benches
/// create it over the Admin API. `timeout_secs` is the round's and the liveness deadline;
/// evaluation and decryption get half of it.
pub fn secure_job_spec(
    id: &str,
    rounds: u64,
    min_participants: usize,
    per_round: usize,
    min_updates: usize,
    committee: usize,
    timeout_secs: u64,
) -> String {
    format!(
        r#"id = "{id}"
rounds = {rounds}
min_participants = {min_participants}
clients_per_round = {per_round}
min_updates = {min_updates}
round_timeout_secs = {timeout_secs}
eval_timeout_secs = {half}
liveness_timeout_secs = {timeout_secs}
evaluate = false
seed = 7
strategy = "fedavg"

[model]
kind = "logistic"
inputs = 30
classes = 2

[train]
epochs = 1
batch_size = 16
learning_rate = 0.1
optimizer = "sgd"
seed = 1

[secure_aggregation]
committee_size = {committee}
t_min = 2
decrypt_timeout_secs = {half}
"#,
        half = timeout_secs / 2,
    )
}
