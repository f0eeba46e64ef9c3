//! Operating a coordinator, end to end with the real binary: a job driven through the Admin
//! API with `cohort admin`, Prometheus metrics scraped while it runs, and `kill -9` at
//! several points of a round followed by restarts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::*;

trait Kill9 {
    fn kill_9(self);
}

impl Kill9 for CoordinatorProc {
    /// `kill -9`.
    fn kill_9(mut self) {
        let pid = self.proc.child.id().to_string();
        let s = Command::new("kill").args(["-9", &pid]).status().unwrap();
        assert!(s.success());
        let _ = self.proc.child.wait();
    }
}

/// The row of a table whose first column is `key`, split on runs of spaces.
fn row(table: &str, key: &str) -> Option<Vec<String>> {
    table
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .find(|cells| cells.first().map(String::as_str) == Some(key))
}

/// Polls until `f` holds, or panics naming `what`.
fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < until, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `rounds_completed/rounds` of a job, from `cohort admin jobs`.
fn progress(dir: &Path, addr: &str, job: &str) -> (String, u64) {
    let t = admin(dir, addr, &["jobs"]);
    let r = row(&t, job).unwrap_or_else(|| panic!("no job {job} in {t}"));
    let done = r[2].split('/').next().unwrap().parse().unwrap();
    (r[1].clone(), done)
}

/// Parses the Prometheus/OpenMetrics text format strictly enough to catch a malformed
/// exposition: metadata lines, `name{labels} value` samples whose family was declared with a
/// TYPE, and the closing `# EOF`. Returns each sample's value by `name{labels}`.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "the exposition ends with # EOF"
    );
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in &lines[..lines.len() - 1] {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            assert!(
                matches!(kind, "HELP" | "TYPE" | "UNIT"),
                "bad metadata line {line:?}"
            );
            assert!(name_ok(name), "bad metric name in {line:?}");
            if kind == "TYPE" {
                let t = parts.next().unwrap_or("");
                assert!(
                    matches!(
                        t,
                        "counter"
                            | "gauge"
                            | "histogram"
                            | "summary"
                            | "info"
                            | "stateset"
                            | "unknown"
                            | "gaugehistogram"
                    ),
                    "bad type in {line:?}"
                );
                typed.insert(name.to_string(), t.to_string());
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "bad sample name in {line:?}");
        let labels = &series[name.len()..];
        if !labels.is_empty() {
            assert!(
                labels.starts_with('{') && labels.ends_with('}'),
                "bad labels in {line:?}"
            );
            for pair in labels[1..labels.len() - 1].split("\",") {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label in {line:?}"));
                assert!(
                    name_ok(k) && v.starts_with('"'),
                    "bad label {pair:?} in {line:?}"
                );
            }
        }
        assert!(
            typed.keys().any(|f| name.starts_with(f.as_str())),
            "sample {name} has no TYPE line before it"
        );
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        out.insert(series.to_string(), v);
    }
    out
}

#[test]
fn a_job_runs_start_to_finish_through_the_admin_api() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    provision(dir);
    let shares = write_shares(dir);
    let cfg = coordinator_config(
        dir,
        free_port(),
        r#""hospital-0", "hospital-1""#,
        "require_approval = true",
    );
    let coord = spawn_coordinator(&cfg);
    let addr = coord.addr.clone();
    let status = admin(dir, &addr, &["status"]);
    assert!(status.contains("active job   (none)"), "{status}");

    // A participant's certificate cannot call Admin.
    let as_participant = dir.join("participant-admin.toml");
    std::fs::write(
        &as_participant,
        format!(
            "coordinator = \"https://{addr}\"\n[tls]\nca = \"pki/participants/hospital-0/ca.pem\"\ncert = \"pki/participants/hospital-0/cert.pem\"\nkey = \"pki/participants/hospital-0/key.pem\"\nserver_name = \"coordinator\"\n"
        ),
    )
    .unwrap();
    let (ok, text) = admin_as(dir, &as_participant, &addr, &["jobs"]);
    assert!(!ok && text.contains("PermissionDenied"), "{text}");

    // A bad specification is refused, naming the key.
    std::fs::write(
        dir.join("bad.toml"),
        job_spec("bc", 4, 60.0).replace("rounds = 4", "runds = 4"),
    )
    .unwrap();
    let (ok, text) = admin_as(
        dir,
        &dir.join("pki/admins/ops/admin.toml"),
        &addr,
        &["jobs", "create", "bad.toml"],
    );
    assert!(
        !ok && text.contains("InvalidArgument") && text.contains("runds"),
        "{text}"
    );

    std::fs::write(dir.join("bc.toml"), job_spec("bc", 10, 60.0)).unwrap();
    let out = admin(dir, &addr, &["jobs", "create", "bc.toml"]);
    assert!(out.contains("job bc created"), "{out}");
    assert_eq!(progress(dir, &addr, "bc"), ("created".into(), 0));
    // An operator watches events from the start.
    let mut watch = Command::new(BIN)
        .arg("admin")
        .arg("--config")
        .arg(dir.join("pki/admins/ops/admin.toml"))
        .args(["--coordinator", &format!("https://{addr}"), "events"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let events_out = watch.stdout.take().unwrap();
    let events = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(events_out)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let watch = Proc {
        child: watch,
        name: "cohort admin events".into(),
    };
    std::thread::sleep(Duration::from_millis(500));
    admin(dir, &addr, &["jobs", "start", "bc"]);
    let mut parts: Vec<Proc> = (0..3)
        // Uploads held back 400 ms, so that rounds last long enough to pause between them;
        // the nodes stay for the next job.
        .map(|i| {
            spawn_participant_with(
                dir,
                &addr,
                i,
                &shares[i],
                "upload_delay_ms = 400",
                "stay_between_jobs = true",
            )
        })
        .collect();

    // hospital-2 is not in allowed_participants: it waits for an operator.
    wait_until(
        "hospital-2 waiting for approval",
        Duration::from_secs(30),
        || {
            row(&admin(dir, &addr, &["participants"]), "hospital-2")
                .is_some_and(|r| r[2] == "pending")
        },
    );
    assert_eq!(
        progress(dir, &addr, "bc").1,
        0,
        "no round without hospital-2"
    );
    // Paused before it can start: approving hospital-2 starts nothing until resumed.
    admin(dir, &addr, &["jobs", "pause", "bc"]);
    admin(
        dir,
        &addr,
        &[
            "participants",
            "approve",
            "hospital-2",
            "--reason",
            "contract signed",
        ],
    );
    wait_until("hospital-2 online", Duration::from_secs(30), || {
        row(&admin(dir, &addr, &["participants"]), "hospital-2").is_some_and(|r| r[3] == "online")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(admin(dir, &addr, &["jobs", "status", "bc"]).contains("phase: paused"));
    assert_eq!(progress(dir, &addr, "bc"), ("paused".into(), 0));
    admin(dir, &addr, &["jobs", "resume", "bc"]);

    // Pause after the first round: the round under way completes, no other starts.
    wait_until("round 1 completed", Duration::from_secs(60), || {
        progress(dir, &addr, "bc").1 >= 1
    });
    admin(dir, &addr, &["jobs", "pause", "bc"]);
    wait_until("the job paused", Duration::from_secs(60), || {
        admin(dir, &addr, &["jobs", "status", "bc"]).contains("phase: paused")
    });
    let (state, at_pause) = progress(dir, &addr, "bc");
    assert_eq!(state, "paused");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        progress(dir, &addr, "bc").1,
        at_pause,
        "no round runs while paused"
    );

    // Scraped while paused (counts are stable): valid exposition, counters match the rounds.
    let m = parse_metrics(&scrape(&coord.metrics));
    assert_eq!(
        m[r#"cohort_rounds_completed_total{job_id="bc"}"#],
        at_pause as f64
    );
    assert_eq!(m[r#"cohort_job_state{job_id="bc",state="paused"}"#], 1.0);
    assert_eq!(m["cohort_participants_connected"], 3.0);
    // Certificate lifetimes: the coordinator's, the CA's and every participant's that joined
    // (provisioned for 365 days; the CA for ten times as long).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    let days = |key: &str| (m[key] - now) / 86_400.0;
    let coordinator = days(
        r#"cohort_certificate_expiry_timestamp_seconds{identity="coordinator",role="coordinator"}"#,
    );
    assert!((364.0..=365.0).contains(&coordinator), "{coordinator}");
    let ca = days(r#"cohort_certificate_expiry_timestamp_seconds{identity="ca",role="ca"}"#);
    assert!((3649.0..=3650.0).contains(&ca), "{ca}");
    for h in ["hospital-0", "hospital-1", "hospital-2"] {
        let d = days(&format!(
            r#"cohort_certificate_expiry_timestamp_seconds{{identity="{h}",role="participant"}}"#
        ));
        assert!((364.0..=365.0).contains(&d), "{h}: {d}");
    }
    let status = admin(dir, &addr, &["status"]);
    assert!(
        status.contains("certificate  coordinator (coordinator)")
            && status.contains("certificate  hospital-1 (participant)"),
        "{status}"
    );
    assert!(m[r#"cohort_round_duration_seconds_count{job_id="bc"}"#] >= at_pause as f64);
    assert!(m[r#"cohort_received_bytes_total{kind="update"}"#] > 0.0);

    admin(dir, &addr, &["jobs", "resume", "bc"]);
    wait_until("the job finished", Duration::from_secs(120), || {
        progress(dir, &addr, "bc") == ("finished".into(), 10)
    });
    // The event stream saw the job from start to finish.
    std::thread::sleep(Duration::from_millis(500));
    drop(watch);
    let events = events.join().unwrap();
    let count = |kind: &str| {
        events
            .iter()
            .filter(|l| l.split_whitespace().nth(2) == Some(kind))
            .count()
    };
    assert_eq!(count("round_completed"), 10, "{events:#?}");
    assert!(count("round_started") >= 10, "{events:#?}");
    assert!(count("participant_joined") >= 3, "{events:#?}");
    for kind in ["job_paused", "job_resumed", "job_finished"] {
        assert!(count(kind) >= 1, "no {kind}: {events:#?}");
    }
    let history = admin(dir, &addr, &["jobs", "status", "bc"]);
    for r in 1..=10 {
        let cells = row(&history, &r.to_string()).unwrap_or_else(|| panic!("round {r}: {history}"));
        assert_eq!(cells[2], "3", "three participants in round {r}: {history}");
    }
    let text = scrape(&coord.metrics);
    let m = parse_metrics(&text);
    assert_eq!(m[r#"cohort_rounds_completed_total{job_id="bc"}"#], 10.0);
    alert_rules_name_exported_metrics(|name| !name.starts_with("cohort_inference_"), &text);
    assert_eq!(m[r#"cohort_job_state{job_id="bc",state="finished"}"#], 1.0);

    // Models: versions 0..=4, each the child of the one before; promote and roll back.
    let models = admin(dir, &addr, &["models", "list", "--job", "bc"]);
    let lineage: Vec<(String, String)> = models
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c.first() == Some(&"bc"))
        .map(|c| (c[1].to_string(), c[2].to_string()))
        .collect();
    let expected: Vec<(String, String)> = (0..=10u64)
        .map(|v| {
            let parent = if v == 0 {
                "-".into()
            } else {
                (v - 1).to_string()
            };
            (v.to_string(), parent)
        })
        .collect();
    assert_eq!(lineage, expected, "{models}");
    admin(dir, &addr, &["models", "promote", "bc", "3"]);
    admin(dir, &addr, &["models", "promote", "bc", "10"]);
    let out = admin(dir, &addr, &["models", "rollback"]);
    assert!(out.contains("serving bc v3"), "{out}");
    assert!(admin(dir, &addr, &["status"]).contains("serving      bc v3"));
    let (ok, text) = admin_as(
        dir,
        &dir.join("pki/admins/ops/admin.toml"),
        &addr,
        &["models", "promote", "bc", "11"],
    );
    assert!(!ok && text.contains("NotFound"), "{text}");

    // The same nodes, still running, take part in the next job.
    std::fs::write(dir.join("bc2.toml"), job_spec("bc2", 2, 60.0)).unwrap();
    admin(dir, &addr, &["jobs", "create", "bc2.toml"]);
    admin(dir, &addr, &["jobs", "start", "bc2"]);
    wait_until("the second job finished", Duration::from_secs(120), || {
        progress(dir, &addr, "bc2") == ("finished".into(), 2)
    });
    let second = admin(dir, &addr, &["jobs", "status", "bc2"]);
    assert_eq!(row(&second, "2").unwrap()[2], "3", "{second}");
    for p in parts.iter_mut() {
        assert!(p.child.try_wait().unwrap().is_none(), "{} exited", p.name);
    }

    // Every action is in the audit log, with who did it.
    let audit = admin(dir, &addr, &["audit"]);
    let actions: Vec<(String, String)> = audit
        .lines()
        .skip(2)
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            // SEQ, date and time of WHEN, WHO, ACTION, …
            (c[3].to_string(), c[4].to_string())
        })
        .collect();
    let expected = [
        "create_job",
        "start_job",
        "pause_job",
        "approve_participant",
        "resume_job",
        "pause_job",
        "resume_job",
        "promote",
        "promote",
        "rollback",
        "create_job",
        "start_job",
    ];
    assert_eq!(
        actions,
        expected
            .iter()
            .map(|a| ("ops".to_string(), a.to_string()))
            .collect::<Vec<_>>(),
        "{audit}"
    );
    drop(coord);
}

#[test]
fn the_coordinator_survives_kill_9_at_any_point_of_a_round() {
    // Two runs with different timing: uploads held back 300 ms (kills land well inside each
    // phase), then not at all (kills land wherever the phase boundaries fall).
    for upload_delay_ms in [300, 0] {
        eprintln!("=== crash run with uploads delayed {upload_delay_ms} ms");
        crash_run(upload_delay_ms);
    }
}

/// A 6-round job whose coordinator is killed with `kill -9` six times at points of its
/// rounds, and restarted each time; the job must complete with its state intact.
fn crash_run(upload_delay_ms: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    provision(dir);
    let shares = write_shares(dir);
    // Batch mode: the configuration's job, and the coordinator exits when it is finished.
    let job = job_section("crash", 6, 30.0);
    let cfg = coordinator_config(
        dir,
        free_port(),
        r#""hospital-0", "hospital-1", "hospital-2""#,
        &format!("[job]\n{job}"),
    );

    let mut coord = spawn_coordinator(&cfg);
    let mut parts: Vec<Proc> = (0..3)
        .map(|i| spawn_participant(dir, &coord.addr, i, &shares[i], upload_delay_ms))
        .collect();
    // Where each kill lands, in the order of a round; the last two repeat the first two.
    let points: [(&str, &[&str]); 6] = [
        ("before uploads", &["round started"]),
        ("during uploads", &["update accepted"]),
        ("during decryption", &["committee asked to decrypt"]),
        ("just after commit", &["model version committed"]),
        ("before uploads", &["round started"]),
        ("during decryption", &["committee asked to decrypt"]),
    ];
    let mut admin_actions = 0;
    for (i, (point, words)) in points.iter().enumerate() {
        coord.wait_log(words, Duration::from_secs(120));
        eprintln!("--- kill -9 {point} ({})", i + 1);
        coord.kill_9();
        coord = spawn_coordinator(&cfg);
        coord.wait_log(
            &["resuming the job after a restart"],
            Duration::from_secs(10),
        );
        if i == 2 {
            // An audited admin action between crashes is kept.
            admin(dir, &coord.addr, &["jobs", "pause", "crash"]);
            admin(dir, &coord.addr, &["jobs", "resume", "crash"]);
            admin_actions += 2;
        }
    }
    let s = coord.proc.wait_for_exit(Duration::from_secs(240));
    assert!(s.success(), "the coordinator exited with {s}");
    for p in parts.iter_mut() {
        let s = p.wait_for_exit(Duration::from_secs(30));
        assert!(s.success(), "{} exited with {s}", p.name);
    }

    // The durable state: every round once, versions contiguous and on disk, audit intact.
    let state = cohort_coordinator::State::open(&dir.join("state/coordinator.redb")).unwrap();
    let job = state.job("crash").unwrap().unwrap();
    assert_eq!(job.state, cohort_storage::state::JobState::Finished);
    assert_eq!((job.rounds_completed, job.restarts), (6, 6));
    let rounds: Vec<u64> = state
        .rounds("crash")
        .unwrap()
        .iter()
        .map(|r| r.summary.round)
        .collect();
    assert_eq!(rounds, (1..=6).collect::<Vec<_>>());
    let models = state.models(Some("crash")).unwrap();
    assert_eq!(
        models.iter().map(|m| m.version).collect::<Vec<_>>(),
        (0..=6).collect::<Vec<_>>()
    );
    let keys = std::sync::Arc::new(
        cohort_storage::load_key_dir(&dir.join("pki/coordinator/kek")).unwrap(),
    );
    let store = cohort_coordinator::ModelStore::open_encrypted(dir.join("models"), keys)
        .unwrap()
        .for_job("crash");
    for m in &models {
        assert_eq!(m.parent, m.version.checked_sub(1));
        // Each version's weights decrypt to what its committed manifest names.
        let params = store.read_params(m.version).unwrap();
        assert_eq!(params.len(), m.num_parameters);
    }
    let audit = state.audit(1000).unwrap();
    assert_eq!(
        audit.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=2 + admin_actions).collect::<Vec<_>>(),
        "{audit:?}"
    );
    assert_eq!(audit[0].action, "create_job");
    assert_eq!(audit[1].action, "start_job");
    assert_eq!(audit[2].action, "pause_job");
    assert_eq!(audit[2].who, "ops");
}

/// A virtual environment with grpcio, grpcio-tools, grpcio-health-checking and
/// grpcio-reflection from PyPI, kept between runs under the target directory.
fn python_with_grpc() -> PathBuf {
    python_venv(
        "python-grpc",
        &[
            "grpcio",
            "grpcio-tools",
            "grpcio-health-checking",
            "grpcio-reflection",
        ],
    )
}

#[test]
fn a_python_grpcio_client_reads_participants_and_job_status() {
    let python = python_with_grpc();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    provision(dir);
    let shares = write_shares(dir);
    let cfg = coordinator_config(
        dir,
        free_port(),
        r#""hospital-0", "hospital-1", "hospital-2""#,
        "",
    );
    let coord = spawn_coordinator(&cfg);
    let addr = coord.addr.clone();
    std::fs::write(dir.join("py.toml"), job_spec("py", 2, 60.0)).unwrap();
    admin(dir, &addr, &["jobs", "create", "py.toml"]);
    admin(dir, &addr, &["jobs", "start", "py"]);
    let mut parts: Vec<Proc> = (0..3)
        .map(|i| spawn_participant(dir, &addr, i, &shares[i], 0))
        .collect();
    wait_until("the job finished", Duration::from_secs(120), || {
        progress(dir, &addr, "py") == ("finished".into(), 2)
    });
    for p in parts.iter_mut() {
        p.wait_for_exit(Duration::from_secs(30));
    }

    // Stubs generated from the .proto files, as any team would.
    let stubs = dir.join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/proto");
    let out = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(proto.join("cohort/v1/admin.proto"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/admin_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&stubs)
        .arg(&addr)
        .arg(dir.join("pki/admins/ops"))
        .arg("py")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["health"], "SERVING", "{v}");
    for service in [
        "cohort.v1.Admin",
        "cohort.v1.Federation",
        "grpc.health.v1.Health",
    ] {
        assert!(
            v["services"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == service),
            "reflection lists {service}: {v}"
        );
    }
    let ids: Vec<&str> = v["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["hospital-0", "hospital-1", "hospital-2"], "{v}");
    assert!(
        v["participants"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "approved")
    );
    assert_eq!(v["job"]["state"], "finished", "{v}");
    assert_eq!(v["job"]["rounds_completed"], 2, "{v}");
    assert_eq!(
        v["job"]["rounds"][1]["participants"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "{v}"
    );
    assert_eq!(v["missing_job"], "NOT_FOUND", "{v}");
    drop(coord);
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("promtool (Debian package prometheus, which .ci/run installs): {e}")
            });
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// moto's S3 server (from PyPI) on a free port, with the bucket `cohort-models`: the
/// server, its endpoint and the venv's Python.
fn start_moto() -> (Proc, String, PathBuf) {
    // moto's S3 server, from PyPI, on a free port.
    let python = python_venv("python-moto", &["moto[server]"]);
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let moto = Proc {
        child: Command::new(python.with_file_name("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        name: "moto_server".into(),
    };
    wait_until("moto_server listening", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let out = Command::new(&python)
        .args([
            "-c",
            "import sys, boto3; boto3.client('s3', endpoint_url=sys.argv[1], \
             aws_access_key_id='test', aws_secret_access_key='test', \
             region_name='us-east-1').create_bucket(Bucket='cohort-models')",
            &endpoint,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (moto, endpoint, python)
}

#[test]
fn model_versions_go_to_an_s3_compatible_server() {
    let (mut moto, endpoint, _python) = start_moto();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    provision(dir);
    let shares = write_shares(dir);
    let job = job_section("s3", 2, 30.0);
    let cfg = coordinator_config(
        dir,
        free_port(),
        r#""hospital-0", "hospital-1", "hospital-2""#,
        &format!(
            "[model_store.s3]\nbucket = \"cohort-models\"\nprefix = \"federation-a\"\n\
             endpoint = \"{endpoint}\"\nallow_http = true\n[job]\n{job}"
        ),
    );
    let creds = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ];
    let mut coord = spawn_coordinator_env(&cfg, &creds);
    let mut parts: Vec<Proc> = (0..3)
        .map(|i| spawn_participant(dir, &coord.addr, i, &shares[i], 0))
        .collect();
    let s = coord.proc.wait_for_exit(Duration::from_secs(120));
    assert!(s.success(), "the coordinator exited with {s}");
    for p in parts.iter_mut() {
        p.wait_for_exit(Duration::from_secs(30));
    }
    assert!(
        !dir.join("models/objects").exists() && !dir.join("models/s3").exists(),
        "nothing written to model_dir"
    );

    // Read back from the bucket: every version, checked against its address and manifest.
    let s3 = cohort_storage::S3Config {
        bucket: "cohort-models".into(),
        prefix: "federation-a".into(),
        region: "us-east-1".into(),
        endpoint: Some(endpoint.clone()),
        allow_http: true,
    };
    let objects = std::sync::Arc::new(
        cohort_storage::S3Objects::with_credentials(&s3, "test", "test").unwrap(),
    );
    let kek = dir.join("pki/coordinator/kek");
    let open = || {
        cohort_coordinator::ModelStore::over(objects.clone())
            .with_keys(std::sync::Arc::new(
                cohort_storage::load_key_dir(&kek).unwrap(),
            ))
            .for_job("s3")
    };
    let store = open();
    assert_eq!(store.versions().unwrap(), vec![0, 1, 2]);
    let params: Vec<Vec<f32>> = (0..=2).map(|v| store.read_params(v).unwrap()).collect();
    use cohort_storage::Objects;
    let keys = objects.list("objects/sha256/").unwrap();
    assert_eq!(keys.len(), 3, "{keys:?}");
    for key in &keys {
        assert!(key.ends_with(".safetensors.enc"), "{key}");
        let stored = objects.get(key).unwrap();
        let raw = cohort_protocol::f32_bytes(&params[2]);
        assert!(
            raw.chunks_exact(8)
                .all(|w| !stored.windows(8).any(|d| d == w)),
            "{key} holds plaintext model bytes"
        );
    }
    assert!(
        store
            .weights_location(2)
            .unwrap()
            .starts_with("s3://cohort-models/federation-a/objects/sha256/")
    );

    // Rotating the key-encryption key re-wraps the objects in the bucket.
    let out = Command::new(BIN)
        .args(["rotate-keys", "--config"])
        .arg(&cfg)
        .envs(creds)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("3 model objects re-wrapped"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(kek.join("kek-1.kek")).unwrap();
    let after = open();
    for (v, p) in params.iter().enumerate() {
        assert_eq!(&after.read_params(v as u64).unwrap(), p);
    }

    // `cohort export` reads a version through the same configuration (bucket and keys).
    let exported = dir.join("exported");
    let out = Command::new(BIN)
        .args(["export", "s3", "--version", "2", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&exported)
        .envs(creds)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cohort export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let weights = std::fs::read(exported.join("model.safetensors")).unwrap();
    // The version's values, in a file of their size (header aside).
    assert!(
        weights.len() > 4 * params[2].len(),
        "{} bytes",
        weights.len()
    );
    let module = std::fs::read_to_string(exported.join("model.py")).unwrap();
    assert!(
        module.contains("nn.ModuleList") && module.contains("def load("),
        "{module}"
    );

    // Serving from the bucket: the coordinator again, in service mode, promotes; a `cohort
    // serve` replica reading the same bucket follows the serving pointer written there.
    let s3_section = format!(
        "[model_store.s3]\nbucket = \"cohort-models\"\nprefix = \"federation-a\"\n\
         endpoint = \"{endpoint}\"\nallow_http = true\n"
    );
    let cfg = coordinator_config(dir, free_port(), "", &s3_section);
    let coord = spawn_coordinator_env(&cfg, &creds);
    admin(dir, &coord.addr, &["models", "promote", "s3", "2"]);
    assert!(objects.exists("serving.json").unwrap());
    let (_serve, serve_addr, _) = spawn_serve(
        dir,
        &format!(
            "listen = \"127.0.0.1:0\"\nwatch_interval_ms = 100\n{s3_section}\n[inference]\n\
             device = \"cpu\"\n{sections}",
            sections = coordinator_sections(&dir.join("pki"))
        ),
        &creds,
    );
    let served = |want: &str| {
        wait_until(
            &format!("cohort serve serves {want}"),
            Duration::from_secs(20),
            || {
                let out = Command::new(BIN)
                    .arg("predict")
                    .arg("--config")
                    .arg(dir.join("pki/inference/app/client.toml"))
                    .args(["--server", &format!("https://{serve_addr}"), "--csv"])
                    .arg(&shares[0])
                    .args(["--label", "diagnosis", "--limit", "5"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).contains(&format!("serving s3 {want} "))
            },
        )
    };
    served("v2");
    admin(dir, &coord.addr, &["models", "promote", "s3", "1"]);
    served("v1");
    drop(coord);
    let _ = moto.child.kill();
}

/// The object store goes down in the middle of a job (every new connection refused, as a
/// stopped S3 server's would be): the completed round is held and said to be, nothing
/// committed is lost, and the job goes on by itself once the store is back.
#[test]
fn an_object_store_that_goes_down_mid_job_holds_the_round_until_it_returns() {
    use common::proxy::{Fault, FaultProxy};
    let (_moto, endpoint, _python) = start_moto();
    let proxy = FaultProxy::start(endpoint.trim_start_matches("http://"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    provision(dir);
    let shares = write_shares(dir);
    let job = job_section("s3down", 3, 30.0);
    let cfg = coordinator_config(
        dir,
        free_port(),
        r#""hospital-0", "hospital-1", "hospital-2""#,
        &format!(
            "[model_store.s3]\nbucket = \"cohort-models\"\nprefix = \"federation-b\"\n\
             endpoint = \"http://{}\"\nallow_http = true\n[job]\n{job}",
            proxy.addr
        ),
    );
    let creds = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ];
    let mut coord = spawn_coordinator_env(&cfg, &creds);
    // Each upload held back 1 s, so a round lasts long enough to act on.
    let mut parts: Vec<Proc> = (0..3)
        .map(|i| spawn_participant(dir, &coord.addr, i, &shares[i], 1000))
        .collect();
    let log = |words: &[&str]| wait_for_line(&coord.log, words, Duration::from_secs(60));
    log(&["round started", "round=2 "]);
    // The store goes down while round 2 trains: its commit is refused and held.
    proxy.set(Fault::Refuse);
    proxy.reset_all();
    log(&["could not be committed", "round=2"]);
    let m = parse_metrics(&scrape(&coord.metrics));
    assert_eq!(m[r#"cohort_commit_failing{job_id="s3down"}"#], 1.0);
    // Round 2 completed (its sum decrypted) and is held; round 3 does not start.
    assert_eq!(m[r#"cohort_rounds_completed_total{job_id="s3down"}"#], 2.0);
    std::thread::sleep(Duration::from_secs(3));
    let m = parse_metrics(&scrape(&coord.metrics));
    assert_eq!(m[r#"cohort_rounds_completed_total{job_id="s3down"}"#], 2.0);
    assert_eq!(m[r#"cohort_rounds_started_total{job_id="s3down"}"#], 2.0);
    assert!(m[r#"cohort_commit_failures_total{job_id="s3down"}"#] >= 1.0);
    // Back: the held round is committed and the job finishes.
    proxy.set(Fault::Pass);
    log(&["storage accepts commits again"]);
    let s = coord.proc.wait_for_exit(Duration::from_secs(120));
    assert!(s.success(), "the coordinator exited with {s}");
    for p in parts.iter_mut() {
        p.wait_for_exit(Duration::from_secs(30));
    }
    // Every version is in the bucket and opens.
    let s3 = cohort_storage::S3Config {
        bucket: "cohort-models".into(),
        prefix: "federation-b".into(),
        region: "us-east-1".into(),
        endpoint: Some(endpoint.clone()),
        allow_http: true,
    };
    let objects = std::sync::Arc::new(
        cohort_storage::S3Objects::with_credentials(&s3, "test", "test").unwrap(),
    );
    let store = cohort_coordinator::ModelStore::over(objects).with_keys(std::sync::Arc::new(
        cohort_storage::load_key_dir(&dir.join("pki/coordinator/kek")).unwrap(),
    ));
    for v in 1..=3 {
        let (manifest, params) = store.for_job("s3down").read_version(v).unwrap();
        assert_eq!(manifest.version, v);
        assert_eq!(params.len(), 62);
    }
}
