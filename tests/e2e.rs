//! End-to-end: the real `cohort` binary as one coordinator process and participant processes
//! on loopback, on real data (the bundled breast-cancer table, split three ways).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::*;

struct Federation {
    dir: tempfile::TempDir,
    coordinator: Proc,
    addr: String,
    /// The coordinator's log lines, as they come.
    log: CoordinatorLog,
}

fn start_coordinator(rounds: u64, round_timeout: f64, min_updates: usize) -> Federation {
    start_coordinator_in(
        tempfile::tempdir().unwrap(),
        rounds,
        round_timeout,
        min_updates,
    )
}

fn start_coordinator_in(
    dir: tempfile::TempDir,
    rounds: u64,
    round_timeout: f64,
    min_updates: usize,
) -> Federation {
    start_coordinator_with(dir, rounds, round_timeout, min_updates, "")
}

/// [`start_coordinator_in`] with more of the job's sections (`[job.…]`) in `job_extra`.
fn start_coordinator_with(
    dir: tempfile::TempDir,
    rounds: u64,
    round_timeout: f64,
    min_updates: usize,
    job_extra: &str,
) -> Federation {
    let pki = provision(dir.path());
    let cfg = format!(
        r#"
listen = "127.0.0.1:0"
model_dir = "{models}"
state_file = "{state}"
allowed_participants = ["hospital-0", "hospital-1", "hospital-2"]

{sections}
[job]
id = "breast-cancer"
rounds = {rounds}
min_participants = 3
min_updates = {min_updates}
round_timeout_secs = {round_timeout}
eval_timeout_secs = 5
liveness_timeout_secs = 3
seed = 7

[job.model]
kind = "logistic"
inputs = 30
classes = 2

[job.train]
epochs = 3
batch_size = 16
learning_rate = 0.1
optimizer = "sgd"
seed = 1
{job_extra}
"#,
        models = dir.path().join("models").display(),
        state = dir.path().join("state").join("state.redb").display(),
        sections = coordinator_sections(&pki)
    );
    let cfg_path = dir.path().join("coordinator.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let c = spawn_coordinator(&cfg_path);
    Federation {
        dir,
        coordinator: c.proc,
        addr: c.addr,
        log: CoordinatorLog(c.log),
    }
}

impl Federation {
    fn participant(&self, i: usize, share: &Path, upload_delay_ms: u64) -> Proc {
        spawn_participant(self.dir.path(), &self.addr, i, share, upload_delay_ms)
    }

    /// Waits for a coordinator log line containing every one of `words`.
    fn wait_log(&self, words: &[&str], limit: Duration) -> String {
        self.log.wait_for(words, limit)
    }

    fn manifest(&self, version: u64) -> serde_json::Value {
        let p = self
            .dir
            .path()
            .join(format!("models/breast-cancer/v{version:05}.json"));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).unwrap()
    }
}

#[test]
fn coordinator_and_three_participant_processes_complete_three_rounds() {
    let mut fed = start_coordinator(3, 60.0, 3);
    let shares = write_shares(fed.dir.path());
    let mut parts: Vec<Proc> = (0..3).map(|i| fed.participant(i, &shares[i], 0)).collect();
    let status = fed.coordinator.wait_for_exit(Duration::from_secs(120));
    assert!(status.success(), "coordinator exited with {status}");
    for p in parts.iter_mut() {
        let s = p.wait_for_exit(Duration::from_secs(30));
        assert!(s.success(), "{} exited with {s}", p.name);
    }
    // Every version is on disk, encrypted at rest; it decrypts with the coordinator's keys
    // (also after a key rotation) to exactly the weights the manifest names.
    for v in 0..=3 {
        let object = fed.manifest(v)["weights_file"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(object.starts_with("objects/sha256/") && object.ends_with(".safetensors.enc"));
        let p = fed.dir.path().join("models").join(object);
        let bytes = std::fs::read(&p).unwrap();
        assert!(
            bytes.starts_with(b"COHORT-ENC1"),
            "{} is not encrypted",
            p.display()
        );
    }
    let kek = fed.dir.path().join("pki/coordinator/kek");
    let out = Command::new(BIN)
        .args(["rotate-keys", "--key-dir"])
        .arg(&kek)
        .arg("--model-dir")
        .arg(fed.dir.path().join("models"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("4 model objects re-wrapped"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::remove_file(kek.join("kek-1.kek")).unwrap();
    let store = cohort_coordinator::ModelStore::open_encrypted(
        fed.dir.path().join("models"),
        std::sync::Arc::new(cohort_storage::load_key_dir(&kek).unwrap()),
    )
    .unwrap()
    .for_job("breast-cancer");
    for v in 0..=3 {
        use sha2::Digest;
        let plain = store.read_weights(v).unwrap();
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&plain)),
            fed.manifest(v)["sha256"].as_str().unwrap()
        );
    }
    // Every round was securely aggregated (the default): the committee decrypted the sum.
    for round in 1..=3 {
        fed.wait_log(
            &["committee asked to decrypt", &format!("round={round}")],
            Duration::from_secs(1),
        );
    }
    let m3 = fed.manifest(3);
    assert_eq!(m3["round"], 3);
    assert_eq!(m3["parent"], 2);
    assert_eq!(m3["participants"].as_array().unwrap().len(), 3);
    let acc = m3["eval"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "held-out accuracy after 3 rounds: {acc}");
    let n = m3["eval"]["num_examples"].as_u64().unwrap();
    assert!(
        (100..=130).contains(&n),
        "evaluated on {n} held-out rows (about 20% of 569)"
    );
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` where mounting is not permitted (not root): the caller says it was skipped.
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An ext4 file system in an image file, loop-mounted at a directory for one test with
/// `errors=remount-ro`: on an error the kernel turns it read-only under its open files, as it
/// does a failing disk's. Unmounted when dropped.
struct Ext4 {
    image: PathBuf,
    at: PathBuf,
}

impl Ext4 {
    const OPTIONS: &str = "loop,errors=remount-ro";

    /// `None` where it cannot be made or mounted (not root, no loop devices).
    fn mount(at: &Path, megabytes: u64) -> Option<Ext4> {
        std::fs::create_dir_all(at).unwrap();
        let image = at.with_extension("img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(megabytes << 20)
            .unwrap();
        let run = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        let ok = run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))
            && run(Command::new("mount")
                .args(["-o", Self::OPTIONS])
                .arg(&image)
                .arg(at));
        ok.then(|| Ext4 {
            image,
            at: at.to_path_buf(),
        })
    }

    /// The kernel's reaction to a disk error (ext4's own test trigger): the file system
    /// turns read-only, and every write on it fails with EROFS until it is repaired.
    fn fail(&self) {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let at = self.at.to_str().unwrap();
        let device = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(1) == Some(&at))
            .and_then(|f| f[0].strip_prefix("/dev/").map(str::to_string))
            .unwrap_or_else(|| panic!("{at} is not mounted:\n{mounts}"));
        std::fs::write(
            format!("/sys/fs/ext4/{device}/trigger_fs_error"),
            "cohort test: disk error\n",
        )
        .unwrap();
    }

    /// What an operator does with a disk that turned read-only: unmount it (lazily: the
    /// coordinator still has its file open), check and repair it, mount it again.
    fn repair(&self) {
        let ok = |c: &mut Command| c.status().unwrap().code();
        assert_eq!(ok(Command::new("umount").arg("-l").arg(&self.at)), Some(0));
        // 0: clean, 1: errors corrected.
        let fsck = ok(Command::new("e2fsck").args(["-f", "-y"]).arg(&self.image));
        assert!(matches!(fsck, Some(0 | 1)), "e2fsck exited with {fsck:?}");
        assert_eq!(
            ok(Command::new("mount")
                .args(["-o", Self::OPTIONS])
                .arg(&self.image)
                .arg(&self.at)),
            Some(0)
        );
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// Fills the file system holding `dir` until a write fails with "no space left".
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let block = vec![0u8; 4096];
    loop {
        match f.write_all(&block).and_then(|_| f.sync_all()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => return p, // ENOSPC
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
}

/// The model registry's disk fills up after round 1: round 2 completes but cannot be
/// committed, so the job holds it (round 3 does not start, no version 2 exists), says why
/// and retries; once space is freed, round 2 is committed and the job finishes normally.
#[test]
fn a_full_disk_holds_the_job_at_its_round_until_storage_works_again() {
    a_full_disk_holds_the_job("models");
}

/// The same when the disk of the state database fills up: the registry takes version 2, the
/// state cannot commit it, and the job holds the round. The database refuses every later
/// write on the handle that failed, so this passes only because the coordinator opens the
/// file again once a try fails.
#[test]
fn a_full_state_disk_holds_the_job_at_its_round_until_storage_works_again() {
    a_full_disk_holds_the_job("state");
}

/// `fs`'s disk (a small tmpfs) filled after round 1, emptied again once the job holds.
fn a_full_disk_holds_the_job(fs: &str) {
    storage_fault_holds_the_job(
        fs,
        "No space left",
        |at| Tmpfs::mount(at, "2m"),
        |m| fill(&m.0),
        |_, filler| std::fs::remove_file(filler).unwrap(),
    );
}

/// The same when the registry's file system turns read-only (remounted) after round 1.
#[test]
fn a_read_only_registry_holds_the_job_at_its_round_until_it_is_writable_again() {
    let remount = |models: &Path, mode: &str| {
        let s = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(models)
            .status()
            .unwrap();
        assert!(s.success(), "remount {mode}");
    };
    storage_fault_holds_the_job(
        "models",
        "Read-only file system",
        |at| Tmpfs::mount(at, "2m"),
        |m| remount(&m.0, "ro"),
        |m, ()| remount(&m.0, "rw"),
    );
}

/// The same when the state database's disk fails under its open file and the kernel turns
/// it read-only (a file system cannot be remounted read-only by hand while a file on it is
/// open for writing). The operator repairs it and mounts it again at the same place: the
/// coordinator opens the file on the repaired disk and goes on, having lost nothing. While
/// the disk is away it does not create an empty database in its place.
#[test]
fn a_state_disk_turned_read_only_holds_the_job_until_it_is_repaired_and_mounted_again() {
    storage_fault_holds_the_job(
        "state",
        "Read-only file system",
        |at| Ext4::mount(at, 16),
        Ext4::fail,
        |disk, ()| disk.repair(),
    );
}

/// Round 1 is committed; then `break_it` breaks the file system mounted by `mount` for the
/// registry (`fs` = "models") or the state database ("state"), and round 2 completes but
/// cannot be committed, failing with `error`: the job holds it (no round 3, no version 2)
/// and retries; once `mend` has repaired it, round 2 is committed and the job finishes with
/// versions 1 to 3 in a line.
fn storage_fault_holds_the_job<M, T>(
    fs: &str,
    error: &str,
    mount: impl FnOnce(&Path) -> Option<M>,
    break_it: impl FnOnce(&M) -> T,
    mend: impl FnOnce(&M, T),
) {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = mount(&dir.path().join(fs)) else {
        eprintln!(
            "SKIPPED: cannot mount the file system here (needs root, and loop devices for \
             ext4); CI has both"
        );
        return;
    };
    let mut fed = start_coordinator_in(dir, 3, 60.0, 3);
    let shares = write_shares(fed.dir.path());
    // Uploads wait 1.5 s, so there is time to break storage between rounds 1 and 2.
    let mut parts: Vec<Proc> = (0..3)
        .map(|i| fed.participant(i, &shares[i], 1500))
        .collect();
    fed.wait_log(
        &["round=1", "model version committed"],
        Duration::from_secs(60),
    );
    let broken = break_it(&disk);
    let failed = fed.wait_log(
        &["round=2", "could not be committed"],
        Duration::from_secs(60),
    );
    assert!(failed.contains(error), "{failed}");
    // Held: no round 3, no version 2, while the coordinator keeps retrying.
    std::thread::sleep(Duration::from_secs(3));
    let log: Vec<String> = fed.log.0.try_iter().collect();
    let log = log.join("\n");
    assert!(
        !log.contains("round=3"),
        "a round started on an unstored version:\n{log}"
    );
    assert!(
        log.contains("committing the round failed"),
        "no retry:\n{log}"
    );
    // The registry writes a version before the state commits it: with the state's disk
    // broken, the file may be there, but the state does not name it.
    let v2 = fed.dir.path().join("models/breast-cancer/v00002.json");
    assert_eq!(v2.exists(), fs == "state");
    mend(&disk, broken);
    fed.wait_log(
        &["round=2", "storage accepts commits again"],
        Duration::from_secs(60),
    );
    let status = fed.coordinator.wait_for_exit(Duration::from_secs(120));
    assert!(status.success(), "coordinator exited with {status}");
    for p in parts.iter_mut() {
        let s = p.wait_for_exit(Duration::from_secs(30));
        assert!(s.success(), "{} exited with {s}", p.name);
    }
    for v in 1..=3 {
        let m = fed.manifest(v);
        assert_eq!(m["round"], v, "{m}");
        assert_eq!(m["parent"], v - 1, "{m}");
    }
}

#[test]
fn a_participant_killed_mid_round_is_left_out_at_the_deadline() {
    // One round, deadline 8 s; hospital-2 trains, then holds its upload back (a slow link)
    // and is killed while it waits.
    let mut fed = start_coordinator(1, 8.0, 2);
    let shares = write_shares(fed.dir.path());
    let _a = fed.participant(0, &shares[0], 0);
    let _b = fed.participant(1, &shares[1], 0);
    let mut slow = fed.participant(2, &shares[2], 60_000);
    let started = fed.wait_log(&["round started", "round=1"], Duration::from_secs(60));
    assert!(started.contains("hospital-2"), "{started}");
    let t0 = Instant::now();
    // Both quick participants' updates arrive; the round stays open for the third.
    fed.wait_log(&["update accepted"], Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    slow.child.kill().unwrap();
    slow.child.wait().unwrap();
    let dropped = fed.wait_log(&["stragglers left out"], Duration::from_secs(30));
    assert!(dropped.contains("hospital-2"), "{dropped}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(5),
        "the round closed after {waited:?}, before its deadline"
    );
    let status = fed.coordinator.wait_for_exit(Duration::from_secs(60));
    assert!(status.success(), "coordinator exited with {status}");
    let m1 = fed.manifest(1);
    let who: Vec<&str> = m1["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(who, vec!["hospital-0", "hospital-1"]);
}

/// A participant behind a faulty network (a fault-injecting proxy on loopback): slowed with
/// jitter, then throttled, it still makes every round; reset mid-stream, it reconnects; cut off
/// for a whole round (its connections half-open), it is left out at the deadline and the
/// round completes without it; healed, it rejoins and trains again. No round counts an update twice or anyone's examples wrongly.
#[test]
fn a_participant_behind_a_faulty_network_is_slowed_reset_or_left_out_never_double_counted() {
    use common::proxy::{Fault, FaultProxy};
    let fed = start_coordinator(5, 12.0, 2);
    let shares = write_shares(fed.dir.path());
    let proxy = FaultProxy::start(&fed.addr);
    // Round 1: 120 ± 80 ms on every chunk each way.
    proxy.set(Fault::Delay {
        ms: 120,
        jitter_ms: 80,
    });
    // Every participant holds each upload back (1.5 s; hospital-2 1 s), so that a fault
    // switched on as a round starts acts on that round's upload.
    let _a = fed.participant(0, &shares[0], 1500);
    let _b = fed.participant(1, &shares[1], 1500);
    let _c = spawn_participant(fed.dir.path(), &proxy.addr, 2, &shares[2], 1000);
    let round_started = |r: u64| {
        fed.wait_log(
            &["round started", &format!("round={r} ")],
            Duration::from_secs(60),
        )
    };
    round_started(1);
    // Round 2: 64 KB/s each way.
    round_started(2);
    proxy.set(Fault::Throttle {
        bytes_per_second: 64 * 1024,
    });
    // Round 3: every connection of hospital-2 reset mid-stream; it reconnects (its channel
    // on the next call, or a rejoin when a call was cut).
    round_started(3);
    proxy.set(Fault::Pass);
    let before = proxy.accepted();
    proxy.reset_all();
    let t3 = Instant::now();
    while proxy.accepted() == before {
        assert!(
            t3.elapsed() < Duration::from_secs(30),
            "it never reconnected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Round 4: cut off for the whole round: left out at the deadline, the round completes.
    round_started(4);
    proxy.set(Fault::Partition);
    let t4 = Instant::now();
    let dropped = fed.wait_log(&["stragglers left out", "round=4"], Duration::from_secs(30));
    assert!(dropped.contains("hospital-2"), "{dropped}");
    assert!(
        t4.elapsed() < Duration::from_secs(25),
        "round 4 took {:?} with a 12 s deadline",
        t4.elapsed()
    );
    // Healed: its call left waiting on the half-open connection fails when keepalive pings
    // go unanswered, it rejoins, and round 5 (which needs all three online) has it again.
    proxy.set(Fault::Pass);
    fed.wait_log(
        &["participant joined", "hospital-2", "rejoined=true"],
        Duration::from_secs(60),
    );
    fed.wait_log(&["job finished"], Duration::from_secs(60));
    let who = |m: &serde_json::Value| -> Vec<String> {
        m["participants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let [m1, m2, m3, m4, m5] = [1, 2, 3, 4, 5].map(|v| fed.manifest(v));
    let all = ["hospital-0", "hospital-1", "hospital-2"];
    assert_eq!(who(&m1), all, "a slow, jittery link still makes the round");
    assert_eq!(who(&m2), all, "a throttled link still makes the round");
    assert_eq!(who(&m4), ["hospital-0", "hospital-1"]);
    assert_eq!(who(&m5), all, "back after the partition healed");
    // Every round: each participant once, and the examples are those of who took part
    // (all three: round 1's total; without hospital-2: round 4's). Round 3 has hospital-2
    // or not: reset after encrypting under the round's keys, it refuses to encrypt again
    // under them and is left out at the deadline.
    let total = |m: &serde_json::Value| m["total_examples"].as_u64().unwrap();
    let (three, two) = (total(&m1), total(&m4));
    assert!(two < three && two > 0, "{three} {two}");
    for m in [&m1, &m2, &m3, &m4, &m5] {
        let ids = who(m);
        let mut unique = ids.clone();
        unique.dedup();
        assert_eq!(unique, ids, "{m}");
        let want = if ids.len() == 3 { three } else { two };
        assert_eq!(total(m), want, "{m}");
    }
}

/// A committee member cut off while it decrypts: its link is partitioned after the
/// coordinator asked it for its share (it waits 1.5 s before fetching its input). At the
/// decryption deadline its pieces go to the members that answered, and the round completes
/// with its update still in the sum (its share was not needed) and the model right. Healed,
/// it rejoins and takes part in the next round.
#[test]
fn a_committee_member_cut_off_while_decrypting_is_replaced_and_its_update_still_counts() {
    use common::proxy::{Fault, FaultProxy};
    let fed = start_coordinator_with(
        tempfile::tempdir().unwrap(),
        2,
        12.0,
        2,
        "[job.secure_aggregation]\ndecrypt_timeout_secs = 4",
    );
    let shares = write_shares(fed.dir.path());
    let proxy = FaultProxy::start(&fed.addr);
    let _a = fed.participant(0, &shares[0], 0);
    let _b = fed.participant(1, &shares[1], 0);
    let _c = common::spawn_participant_with(
        fed.dir.path(),
        &proxy.addr,
        2,
        &shares[2],
        "answer_delay_ms = 1500",
        "",
    );
    let asked = fed.wait_log(
        &["committee asked to decrypt", "round=1 "],
        Duration::from_secs(60),
    );
    assert!(asked.contains("hospital-2"), "{asked}");
    proxy.set(Fault::Partition);
    let cut = Instant::now();
    let committed = fed.wait_log(
        &["model version committed", "round=1"],
        Duration::from_secs(30),
    );
    let held = cut.elapsed();
    assert!(
        held >= Duration::from_secs(2),
        "round 1 was decrypted {held:?} after the cut, before the 4 s deadline: \
         did hospital-2 answer through a partition?\n{committed}"
    );
    proxy.set(Fault::Pass);
    fed.wait_log(&["job finished"], Duration::from_secs(90));
    let all = ["hospital-0", "hospital-1", "hospital-2"];
    for v in [1, 2] {
        let m = fed.manifest(v);
        let who: Vec<&str> = m["participants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(who, all, "{m}");
        // A sum decrypted wrongly (a share missing or counted twice) is noise, not a model.
        let acc = m["eval"]["accuracy"].as_f64().unwrap();
        assert!(acc > 0.9, "version {v}: held-out accuracy {acc}");
    }
    assert_eq!(
        fed.manifest(1)["total_examples"],
        fed.manifest(2)["total_examples"]
    );
}

#[test]
fn bad_config_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("coordinator.toml");
    std::fs::write(
        &p,
        "listen = \"127.0.0.1:0\"\nmodel_dir = \"m\"\n[job]\nid = \"x\"\nrounds = 0\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["coordinator", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("coordinator.toml"), "{err}");
    assert!(
        err.contains("missing field") || err.contains("rounds"),
        "{err}"
    );

    let data = dir.path().join("bad.csv");
    std::fs::write(&data, "a,b,diagnosis\n1,2,0\n3,oops,1\n").unwrap();
    let pc = dir.path().join("participant.toml");
    std::fs::write(
        &pc,
        format!(
            "coordinator = \"http://127.0.0.1:1\"\nid = \"h\"\n[data]\nformat = \"csv\"\npath = \"{}\"\nlabel = \"diagnosis\"\n",
            data.display()
        ),
    )
    .unwrap();
    // Without TLS a node refuses to start unless told it is a development run...
    let out = Command::new(BIN)
        .args(["participant", "--config"])
        .arg(&pc)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[tls]") && err.contains("--insecure-dev"),
        "{err}"
    );
    // ...and then names the bad data file and line.
    let out = Command::new(BIN)
        .args(["participant", "--insecure-dev", "--config"])
        .arg(&pc)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("INSECURE"), "the warning must be loud: {err}");
    assert!(
        err.contains("bad.csv:3") && err.contains("\"oops\""),
        "{err}"
    );
}

#[test]
fn a_restarted_participant_rejoins_and_trains_again() {
    // hospital-2's uploads are held back 1.5 s, so the kill lands inside round 2.
    let mut fed = start_coordinator(3, 30.0, 3);
    let shares = write_shares(fed.dir.path());
    let _a = fed.participant(0, &shares[0], 0);
    let _b = fed.participant(1, &shares[1], 0);
    let mut c = fed.participant(2, &shares[2], 1500);
    fed.wait_log(&["round complete", "round=1"], Duration::from_secs(60));
    fed.wait_log(&["round started", "round=2"], Duration::from_secs(30));
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    let _c2 = fed.participant(2, &shares[2], 0);
    fed.wait_log(
        &["participant joined", "hospital-2", "rejoined=true"],
        Duration::from_secs(30),
    );
    let status = fed.coordinator.wait_for_exit(Duration::from_secs(90));
    assert!(status.success(), "coordinator exited with {status}");
    for v in [2, 3] {
        let m = fed.manifest(v);
        let who = m["participants"].as_array().unwrap();
        assert!(
            who.iter().any(|p| p == "hospital-2"),
            "version {v}: {who:?}"
        );
        assert_eq!(who.len(), 3, "version {v}: {who:?}");
    }
}

fn simulate(dir: &Path, name: &str, extra: &[&str]) -> (String, serde_json::Value) {
    let report = dir.join(format!("{name}.json"));
    let out = Command::new(BIN)
        .args(["simulate", "--out"])
        .arg(dir.join(name))
        .arg("--report")
        .arg(&report)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (stdout, r)
}

#[test]
fn default_simulation_is_secure_and_matches_plaintext_and_the_centralised_model() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, r) = simulate(dir.path(), "secure", &[]);
    assert!(
        stdout.contains("held-out accuracy") && stdout.contains("centralised model"),
        "{stdout}"
    );
    assert!(
        stdout.contains("secure aggregation: on (threshold-glwe"),
        "the default run must say it is secure: {stdout}"
    );
    assert_eq!(r["rounds"].as_array().unwrap().len(), 10);
    assert_eq!(r["participants"], 3);
    assert_eq!(r["secure_aggregation"]["scheme"], "threshold-glwe");
    let fed = r["federated_accuracy"].as_f64().unwrap();
    let central = r["centralised_accuracy"].as_f64().unwrap();
    assert!(fed >= 0.95, "federated accuracy {fed}");
    assert!(
        (central - fed).abs() <= 0.015,
        "federated {fed} vs centralised {central}"
    );
    assert!(Path::new(r["model_path"].as_str().unwrap()).is_file());

    // The same run in plaintext reaches the same accuracy, round by round (within 0.1 point).
    let (stdout, p) = simulate(dir.path(), "plaintext", &["--plaintext", "--no-baseline"]);
    assert!(stdout.contains("secure aggregation: OFF"), "{stdout}");
    assert_eq!(p["secure_aggregation"], false);
    for (s, q) in r["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .zip(p["rounds"].as_array().unwrap())
    {
        let (a, b) = (
            s["eval_accuracy"].as_f64().unwrap(),
            q["eval_accuracy"].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 0.001,
            "round {}: secure {a} vs plaintext {b}",
            s["round"]
        );
    }
}

#[test]
fn dedicated_custodians_decrypt_and_the_result_is_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, r) = simulate(
        dir.path(),
        "custodians",
        &["--custodians", "3", "--no-baseline"],
    );
    assert!(
        stdout.contains("2-of-3 custodian committee"),
        "the run must say who decrypts: {stdout}"
    );
    assert_eq!(
        r["secure_aggregation"]["custodians"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(r["rounds"].as_array().unwrap().len(), 10);
    let fed = r["federated_accuracy"].as_f64().unwrap();
    assert!(fed >= 0.95, "federated accuracy {fed}");
}

/// Writes an MNIST-style IDX directory of 28×28 images: class k is a bright 6×6 square at
/// one of ten places, on seeded noise, so a CNN can learn it in a round or two.
fn write_idx_images(dir: &Path, train: usize, test: usize) {
    fn idx(path: PathBuf, dims: &[u32], data: &[u8]) {
        let mut out = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            out.extend(d.to_be_bytes());
        }
        out.extend_from_slice(data);
        std::fs::write(path, out).unwrap();
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    std::fs::create_dir_all(dir).unwrap();
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let (mut pixels, mut labels) = (Vec::with_capacity(n * 784), Vec::with_capacity(n));
        for _ in 0..n {
            let class = (next() % 10) as usize;
            let (top, left) = (2 + (class / 5) * 12, 1 + (class % 5) * 5);
            for r in 0..28 {
                for c in 0..28 {
                    let inside = (top..top + 6).contains(&r) && (left..left + 6).contains(&c);
                    let noise = (next() % 64) as u8;
                    pixels.push(if inside { 191 + noise } else { noise });
                }
            }
            labels.push(class as u8);
        }
        idx(
            dir.join(format!("{prefix}-images-idx3-ubyte")),
            &[n as u32, 28, 28],
            &pixels,
        );
        idx(
            dir.join(format!("{prefix}-labels-idx1-ubyte")),
            &[n as u32],
            &labels,
        );
    }
}

/// The README's Fashion-MNIST command, shortened (three rounds of five local epochs on a small
/// generated IDX set of the same shape): it runs to its very end, including the served model answering every site's
/// held-out images, which need several requests per site at 784 values an image.
#[test]
fn an_image_simulation_runs_to_the_end_and_serves_every_held_out_image() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    write_idx_images(&data, 3000, 6000);
    let shares = dir.path().join("shares.json");
    let (stdout, r) = simulate(
        dir.path(),
        "images",
        &[
            "--export-partition",
            shares.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--participants",
            "10",
            "--partition",
            "dirichlet:0.5",
            "--rounds",
            "3",
            "--epochs",
            "5",
            "--batch-size",
            "32",
            "--lr",
            "0.05",
        ],
    );
    assert_eq!(r["model"]["kind"], "cnn", "{r}");
    assert_eq!(r["rounds"].as_array().unwrap().len(), 3);
    // Every site's share of the 6,000 test images (600 each, two requests) was served.
    assert_eq!(r["served_rows"], 6000, "{stdout}");
    let (fed, served) = (
        r["federated_accuracy"].as_f64().unwrap(),
        r["served_accuracy"].as_f64().unwrap(),
    );
    assert!(fed > 0.5, "federated accuracy {fed} after three rounds");
    assert!(
        (fed - served).abs() < 1e-9,
        "served {served} vs federated {fed}"
    );
    let central = r["centralised_accuracy"].as_f64().unwrap();
    assert!(central > 0.5, "centralised accuracy {central}");
    // The exported shares: ten participants, every training and test image exactly once.
    let shares: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&shares).unwrap()).unwrap();
    for (part, n) in [("train", 3000), ("test", 6000)] {
        let lists = shares[part].as_array().unwrap();
        assert_eq!(lists.len(), 10);
        let mut rows: Vec<u64> = lists
            .iter()
            .flat_map(|l| l.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
            .collect();
        rows.sort_unstable();
        assert_eq!(rows, (0..n).collect::<Vec<u64>>(), "{part} shares");
    }
}

/// docs/models.md's command, shortened (two rounds of one local epoch on a small generated
/// IDX set of Fashion-MNIST's shape): the declared LeNet-5 of `examples/models/lenet5.toml`,
/// with the momentum and weight decay NIID-Bench uses, trains, and the served model gives
/// the federated accuracy.
#[test]
fn the_declared_lenet_of_the_docs_trains_and_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    write_idx_images(&data, 1200, 600);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models/lenet5.toml");
    let (stdout, r) = simulate(
        dir.path(),
        "lenet",
        &[
            "--dataset",
            data.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--participants",
            "4",
            "--partition",
            "dirichlet:0.5",
            "--rounds",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--lr",
            "0.01",
            "--momentum",
            "0.9",
            "--weight-decay",
            "0.00001",
            "--strategy",
            "scaffold",
        ],
    );
    assert_eq!(r["model"]["kind"], "layers", "{r}");
    assert_eq!(r["model"]["channels"], 1, "{r}");
    assert_eq!(r["model"]["layers"].as_array().unwrap().len(), 11, "{r}");
    assert_eq!(r["rounds"].as_array().unwrap().len(), 2, "{stdout}");
    let (fed, served) = (
        r["federated_accuracy"].as_f64().unwrap(),
        r["served_accuracy"].as_f64().unwrap(),
    );
    assert!(
        (fed - served).abs() < 1e-9,
        "served {served} vs federated {fed}"
    );
}

mod tls {
    //! The coordinator's mutual TLS, against a real coordinator process: who gets in, who
    //! does not, and revocation without a restart.

    use super::*;
    use cohort_crypto::pki::{Authority, Role, Validity};
    use cohort_protocol::pb;
    use cohort_protocol::pb::federation_client::FederationClient;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    fn read(p: PathBuf) -> String {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// Joins as `id` presenting `cert`/`key` (or no certificate); the error, if any.
    async fn join(
        addr: &str,
        ca: &str,
        cert: Option<(&str, &str)>,
        id: &str,
    ) -> Result<(), tonic::Status> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("coordinator");
        if let Some((c, k)) = cert {
            tls = tls.identity(Identity::from_pem(c, k));
        }
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        FederationClient::new(channel)
            .join(join_request(id))
            .await
            .map(|_| ())
    }

    /// A join as `id` with placeholder keys.
    fn join_request(id: &str) -> pb::JoinRequest {
        pb::JoinRequest {
            participant_id: id.into(),
            num_examples: 1,
            client_version: "test".into(),
            keys: Some(pb::SecureKeys {
                seal_key: vec![9; 32],
                verify_key: vec![9; 32],
                binding: Vec::new(),
            }),
        }
    }

    /// A connection presenting `cert`/`key`, and the session it joined as `id` on it.
    async fn open_session(
        addr: &str,
        ca: &str,
        cert: &str,
        key: &str,
        id: &str,
    ) -> (FederationClient<tonic::transport::Channel>, String) {
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("coordinator")
                    .identity(Identity::from_pem(cert, key)),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = FederationClient::new(channel);
        let session = client
            .join(join_request(id))
            .await
            .unwrap()
            .into_inner()
            .session_id;
        (client, session)
    }

    /// A TLS 1.2-only client: the handshake itself must fail.
    async fn tls12_handshake(addr: &str, ca: &str, cert: &str, key: &str) -> Result<(), String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
            .unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(ServerName::try_from("coordinator").unwrap(), tcp)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_current_federation_participants_get_in() {
        // One round that cannot start (nobody trains), so the coordinator stays up.
        let fed = start_coordinator(1, 60.0, 3);
        let pki = fed.dir.path().join("pki");
        let ca_pem = read(pki.join("ca/ca.pem"));
        let part = |id: &str, f: &str| read(pki.join("participants").join(id).join(f));
        let (c0, k0) = (
            part("hospital-0", "cert.pem"),
            part("hospital-0", "key.pem"),
        );
        let addr = fed.addr.clone();

        // A participant of the federation gets in.
        join(&addr, &ca_pem, Some((&c0, &k0)), "hospital-0")
            .await
            .unwrap();
        // ...but only as itself.
        let e = join(&addr, &ca_pem, Some((&c0, &k0)), "hospital-1")
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // An operator's certificate cannot act as a participant.
        let (ca_, ka) = (
            read(pki.join("admins/ops/cert.pem")),
            read(pki.join("admins/ops/key.pem")),
        );
        let e = join(&addr, &ca_pem, Some((&ca_, &ka)), "ops")
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // No client certificate.
        assert!(join(&addr, &ca_pem, None, "hospital-0").await.is_err());
        // A certificate from another CA.
        let other = Authority::generate(
            "elsewhere",
            &Validity::days(std::time::SystemTime::now(), 1),
        )
        .unwrap();
        let o = other
            .issue(
                "hospital-0",
                Role::Participant,
                &[],
                &[],
                &Validity::days(std::time::SystemTime::now(), 1),
            )
            .unwrap();
        assert!(
            join(
                &addr,
                &ca_pem,
                Some((&o.cert_pem, &o.key_pem)),
                "hospital-0"
            )
            .await
            .is_err()
        );
        // An expired certificate from the right CA.
        let ca = Authority::from_pem(&ca_pem, &read(pki.join("ca/ca.key"))).unwrap();
        let now = std::time::SystemTime::now();
        let old = ca
            .issue(
                "hospital-0",
                Role::Participant,
                &[],
                &[],
                &Validity {
                    not_before: now - Duration::from_secs(7200),
                    not_after: now - Duration::from_secs(3600),
                },
            )
            .unwrap();
        assert!(
            join(
                &addr,
                &ca_pem,
                Some((&old.cert_pem, &old.key_pem)),
                "hospital-0"
            )
            .await
            .is_err()
        );
        // TLS 1.2 is refused even with a good certificate.
        let e = tls12_handshake(&addr, &ca_pem, &c0, &k0).await.unwrap_err();
        assert!(!e.is_empty());

        // Revocation takes effect without a restart, and closes open connections.
        let (c2, k2) = (
            part("hospital-2", "cert.pem"),
            part("hospital-2", "key.pem"),
        );
        let (mut open, session) = open_session(&addr, &ca_pem, &c2, &k2, "hospital-2").await;
        let out = Command::new(BIN)
            .args(["revoke", "--dir"])
            .arg(&pki)
            .arg("hospital-2")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        fed.wait_log(&["revocation list reloaded"], Duration::from_secs(10));
        fed.wait_log(
            &["certificate revoked: closing its connection", "hospital-2"],
            Duration::from_secs(2),
        );
        let e = open
            .heartbeat(pb::HeartbeatRequest {
                session_id: session,
            })
            .await;
        assert!(
            e.is_err(),
            "the revoked participant's open connection must be closed"
        );
        assert!(
            join(&addr, &ca_pem, Some((&c2, &k2)), "hospital-2")
                .await
                .is_err(),
            "a revoked participant must be refused"
        );
        join(&addr, &ca_pem, Some((&c0, &k0)), "hospital-0")
            .await
            .expect("others still get in");
        // Every refused handshake is logged.
        fed.wait_log(&["TLS handshake refused"], Duration::from_secs(1));
    }

    /// A certificate that expires while its connection stays open is refused at the next
    /// call, naming when it expired; a node whose own certificate has expired stops before
    /// dialling, saying so, instead of retrying a handshake that cannot succeed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_certificate_that_expires_mid_job_is_refused_by_name() {
        let fed = start_coordinator(1, 60.0, 3);
        let pki = fed.dir.path().join("pki");
        let ca_pem = read(pki.join("ca/ca.pem"));
        let ca = Authority::from_pem(&ca_pem, &read(pki.join("ca/ca.key"))).unwrap();
        let now = std::time::SystemTime::now();
        // Valid for the next three seconds (notAfter has whole seconds).
        let short = ca
            .issue(
                "hospital-1",
                Role::Participant,
                &[],
                &[],
                &Validity {
                    not_before: now - Duration::from_secs(300),
                    not_after: now + Duration::from_secs(3),
                },
            )
            .unwrap();
        let not_after = cohort_crypto::pki::not_after_of_pem(&short.cert_pem).unwrap();
        let (mut open, session) = open_session(
            &fed.addr,
            &ca_pem,
            &short.cert_pem,
            &short.key_pem,
            "hospital-1",
        )
        .await;
        let beat = || pb::HeartbeatRequest {
            session_id: session.clone(),
        };
        open.heartbeat(beat()).await.unwrap();
        // Past notAfter, on the same connection.
        let wait = not_after + 1
            - std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
        tokio::time::sleep(Duration::from_secs(wait.max(0) as u64 + 1)).await;
        let e = open.heartbeat(beat()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let at = cohort_crypto::pki::utc(not_after);
        assert_eq!(
            e.message(),
            format!(
                "the certificate of \"hospital-1\" expired at {at}: ask the federation's \
                 operator for a new one"
            )
        );
        fed.wait_log(
            &["refused: certificate expired", "hospital-1"],
            Duration::from_secs(2),
        );

        // A node started with that certificate stops at once, naming the expiry.
        let started = std::time::Instant::now();
        let opts = cohort_participant::AgentOptions {
            id: "hospital-1".into(),
            coordinator: format!("https://{}", fed.addr),
            device: cohort_model::ComputeDevice::Cpu,
            poll_wait: Duration::from_millis(500),
            reconnect_for: Duration::from_secs(30),
            faults: Default::default(),
            tls: Some(cohort_protocol::tls::NodeTls {
                ca_pem: ca_pem.clone(),
                cert_pem: short.cert_pem.clone(),
                key_pem: short.key_pem.clone(),
                server_name: "coordinator".into(),
            }),
            stay_between_jobs: false,
            compute: None,
            min_noise_multiplier: None,
            state_dir: None,
        };
        let data = cohort_participant::LocalData::prepare(
            cohort_model::Dataset::new(
                vec![0.0; 30 * 10],
                vec![0, 1, 0, 1, 0, 1, 0, 1, 0, 1],
                cohort_model::FeatureShape::Flat(30),
                2,
            )
            .unwrap(),
            0.2,
            false,
            1,
        )
        .unwrap();
        let e = cohort_participant::run(opts, std::sync::Arc::new(data))
            .await
            .unwrap_err();
        assert!(e.to_string().contains(&format!("expired at {at}")), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "it retried");

        // `cohort renew` issues a new key and certificate for the same identity and role,
        // and the renewed node gets in.
        let old_key = read(pki.join("participants/hospital-1/key.pem"));
        let out = Command::new(BIN)
            .args(["renew", "--dir"])
            .arg(&pki)
            .args(["hospital-1", "coordinator", "--days", "30"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("valid until"),
            "{out:?}"
        );
        let (c1, k1) = (
            read(pki.join("participants/hospital-1/cert.pem")),
            read(pki.join("participants/hospital-1/key.pem")),
        );
        assert_ne!(k1, old_key);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let days = (cohort_crypto::pki::not_after_of_pem(&c1).unwrap() - now) as f64 / 86_400.0;
        assert!((29.9..=30.0).contains(&days), "{days}");
        let der = cohort_crypto::pki::der_of(&c1).unwrap();
        assert_eq!(
            cohort_crypto::pki::identity_of(&der).unwrap(),
            ("hospital-1".to_string(), Role::Participant)
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(pki.join("participants/hospital-1/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        join(&fed.addr, &ca_pem, Some((&c1, &k1)), "hospital-1")
            .await
            .unwrap();
        // The coordinator's keeps its names.
        let coord = cohort_crypto::pki::der_of(&read(pki.join("coordinator/cert.pem"))).unwrap();
        let (dns, ips) = cohort_crypto::pki::names_of(&coord).unwrap();
        assert!(dns.contains(&"coordinator".to_string()), "{dns:?}");
        assert!(ips.contains(&"127.0.0.1".parse().unwrap()), "{ips:?}");
        let e = Command::new(BIN)
            .args(["renew", "--dir"])
            .arg(&pki)
            .arg("nobody")
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&e.stderr).contains("no certificate for \"nobody\""),
            "{e:?}"
        );
    }
}
