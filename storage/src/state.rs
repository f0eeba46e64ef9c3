//! The coordinator's durable state: participants, jobs, completed rounds, model versions,
//! the version served for inference, and the audit log of admin actions.
//!
//! Two layers. A [`Backend`] (`crate::backend`) is a transactional key-value store of a few
//! named tables: every [`Backend::commit`] applies all of its writes or none, so with
//! [`RedbBackend`] a `kill -9` at any instant leaves either the state before a commit or the
//! state after it. [`State`] is the typed layer the coordinator uses; records are JSON, so an operator can read them with any tool.
//!
//! What a commit groups together is what must never be seen apart: a completed round, its
//! model version and the job's progress; an admin action and its audit entry.

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::records::{ModelManifest, ModelRef, RoundSummary};

pub use crate::backend::{Backend, MemoryBackend, RedbBackend, StateError, Table, Write};

// ----- records -----

/// Whether a participant may take part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Approval {
    Approved,
    /// Seen, waiting for an operator (when approval is required).
    Pending,
    /// Removed by an operator; refused until approved again.
    Removed,
}

impl Approval {
    pub fn as_str(self) -> &'static str {
        match self {
            Approval::Approved => "approved",
            Approval::Pending => "pending",
            Approval::Removed => "removed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParticipantRecord {
    pub id: String,
    pub approval: Approval,
    /// "participant" or "custodian".
    pub role: String,
    pub first_seen_unix_ms: u64,
    pub last_seen_unix_ms: u64,
    pub num_examples: u64,
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Created,
    Running,
    Paused,
    Finished,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Created => "created",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Finished => "finished",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Running or paused: the job holds the coordinator.
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Running | JobState::Paused)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// The specification it was created from (TOML, the keys of `[job]`).
    pub spec_toml: String,
    pub state: JobState,
    pub rounds: u64,
    pub rounds_completed: u64,
    pub strategy: String,
    /// The model's kind and shape, for display.
    pub model: String,
    pub dataset: String,
    pub secure: bool,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub created_by: String,
    /// Times the coordinator restarted while the job was active.
    pub restarts: u32,
}

/// Round 0 of a job with tables, as recorded: the federation's summed statistics (the
/// pipeline is fitted from them again on resume) and how many sites they cover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatisticsRecord {
    pub job_id: String,
    pub stats: cohort_model::tabular::TableStats,
    pub sites: usize,
    pub completed_unix_ms: u64,
}

/// A completed round as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub job_id: String,
    pub summary: RoundSummary,
    pub completed_unix_ms: u64,
}

/// One admin action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub unix_ms: u64,
    /// The caller's certificate identity; "config" for the configuration file, "dev" on a
    /// plaintext development listener.
    pub who: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

pub(crate) fn round_key(job: &str, round: u64) -> String {
    format!("{job}\u{0}{round:020}")
}

/// Where `job`'s keys start in the rounds and models tables.
pub(crate) fn job_prefix(job: &str) -> String {
    format!("{job}\u{0}")
}

/// A model version's entry in [`Table::WeightRefs`], under its weights object's prefix.
pub(crate) fn weight_ref_key(weights: &str, job: &str, version: u64) -> String {
    format!("{weights}\u{0}{}", round_key(job, version))
}

pub(crate) fn seq_key(seq: u64) -> String {
    format!("{seq:020}")
}

pub(crate) const SERVING: &str = "serving";

pub(crate) fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("state records serialise")
}

pub(crate) fn parse<T: for<'de> Deserialize<'de>>(
    table: Table,
    key: &str,
    bytes: &[u8],
) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        table: table.name(),
        key: key.replace('\u{0}', "/"),
        message: e.to_string(),
    })
}

/// The typed state. Cheap to clone; every method is one commit or one read.
#[derive(Debug, Clone)]
pub struct State {
    pub(crate) backend: Arc<dyn Backend>,
    /// Serialises read-modify-write sequences (audit numbering, the serving history).
    writer: Arc<Mutex<()>>,
    /// Audit entries kept (0: all); see [`State::keep_audit`].
    audit_keep: Arc<std::sync::atomic::AtomicU64>,
}

impl State {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        State {
            backend,
            writer: Arc::new(Mutex::new(())),
            audit_keep: Arc::default(),
        }
    }

    /// State in memory only (tests, simulations).
    pub fn in_memory() -> Self {
        State::new(Arc::new(MemoryBackend::default()))
    }

    /// Shrinks the database file to what it holds (see [`Backend::compact`]).
    pub fn compact(&self) -> Result<Option<(u64, u64)>, StateError> {
        self.backend.compact()
    }

    /// State in the redb database at `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let state = State::new(Arc::new(RedbBackend::open(path)?));
        state.index_weights()?;
        Ok(state)
    }

    fn all<T: for<'de> Deserialize<'de>>(&self, table: Table) -> Result<Vec<T>, StateError> {
        self.backend
            .scan(table)?
            .iter()
            .map(|(k, v)| parse(table, k, v))
            .collect()
    }

    pub fn participants(&self) -> Result<Vec<ParticipantRecord>, StateError> {
        self.all(Table::Participants)
    }

    pub fn participant(&self, id: &str) -> Result<Option<ParticipantRecord>, StateError> {
        self.one(Table::Participants, id)
    }

    fn one<T: for<'de> Deserialize<'de>>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, StateError> {
        self.backend
            .get(table, key)?
            .map(|v| parse(table, key, &v))
            .transpose()
    }

    pub fn put_participant(&self, p: &ParticipantRecord) -> Result<(), StateError> {
        self.backend
            .commit(&[Write::Put(Table::Participants, p.id.clone(), json(p))])
    }

    pub fn jobs(&self) -> Result<Vec<JobRecord>, StateError> {
        let mut jobs: Vec<JobRecord> = self.all(Table::Jobs)?;
        jobs.sort_by_key(|j| (j.created_unix_ms, j.id.clone()));
        Ok(jobs)
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, StateError> {
        self.one(Table::Jobs, id)
    }

    /// Completed rounds of `job`, oldest first.
    pub fn rounds(&self, job: &str) -> Result<Vec<RoundRecord>, StateError> {
        let mut r: Vec<RoundRecord> = self
            .backend
            .scan_prefix(Table::Rounds, &job_prefix(job))?
            .iter()
            .map(|(k, v)| parse(Table::Rounds, k, v))
            .collect::<Result<_, _>>()?;
        r.sort_by_key(|r| r.summary.round);
        Ok(r)
    }

    /// Model versions of `job` (every job's when `None`), by job and version.
    pub fn models(&self, job: Option<&str>) -> Result<Vec<ModelManifest>, StateError> {
        let mut m: Vec<ModelManifest> = match job {
            Some(j) => self
                .backend
                .scan_prefix(Table::Models, &job_prefix(j))?
                .iter()
                .map(|(k, v)| parse(Table::Models, k, v))
                .collect::<Result<_, _>>()?,
            None => self.all(Table::Models)?,
        };
        m.sort_by(|a, b| (&a.job_id, a.version).cmp(&(&b.job_id, b.version)));
        Ok(m)
    }

    pub fn strategy_state(&self, job: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.backend.get(Table::StrategyState, job)
    }

    /// One model version's manifest.
    pub fn model(&self, job: &str, version: u64) -> Result<Option<ModelManifest>, StateError> {
        self.one(Table::Models, &round_key(job, version))
    }

    /// A model version's manifest and its entry in the weights index.
    pub fn model_writes(m: &ModelManifest) -> [Write; 2] {
        [
            Write::Put(Table::Models, round_key(&m.job_id, m.version), json(m)),
            Write::Put(
                Table::WeightRefs,
                weight_ref_key(&m.weights_file, &m.job_id, m.version),
                Vec::new(),
            ),
        ]
    }

    /// Promotions, oldest first; the last one is served.
    pub fn serving_history(&self) -> Result<Vec<ModelRef>, StateError> {
        Ok(self.one(Table::Meta, SERVING)?.unwrap_or_default())
    }

    pub fn serving(&self) -> Result<Option<ModelRef>, StateError> {
        Ok(self.serving_history()?.pop())
    }

    /// The `limit` most recent audit entries, oldest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StateError> {
        let mut all: Vec<AuditEntry> = self.all(Table::Audit)?;
        let skip = all.len().saturating_sub(limit);
        Ok(all.split_off(skip))
    }

    fn next_audit(
        &self,
        who: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<AuditEntry, StateError> {
        let seq = self
            .backend
            .last(Table::Audit)?
            .map(|(k, v)| parse::<AuditEntry>(Table::Audit, &k, &v).map(|e| e.seq + 1))
            .transpose()?
            .unwrap_or(1);
        Ok(AuditEntry {
            seq,
            unix_ms: unix_ms(),
            who: who.into(),
            action: action.into(),
            target: target.into(),
            detail: detail.into(),
        })
    }

    /// Keeps the newest `keep` audit entries from now on (`None`: all): each audited action
    /// removes the entry that leaves the window, in its own commit. Older entries beyond the
    /// window go with [`State::prune`].
    pub fn keep_audit(&self, keep: Option<u64>) {
        self.audit_keep
            .store(keep.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Applies `writes` together with an audit entry for them, in one commit.
    pub fn audited(
        &self,
        who: &str,
        action: &str,
        target: &str,
        detail: &str,
        mut writes: Vec<Write>,
    ) -> Result<AuditEntry, StateError> {
        let _w = self.writer.lock().expect("state writer lock");
        let entry = self.next_audit(who, action, target, detail)?;
        writes.push(Write::Put(Table::Audit, seq_key(entry.seq), json(&entry)));
        let keep = self.audit_keep.load(std::sync::atomic::Ordering::Relaxed);
        if keep > 0 && entry.seq > keep {
            writes.push(Write::Delete(Table::Audit, seq_key(entry.seq - keep)));
        }
        self.backend.commit(&writes)?;
        Ok(entry)
    }

    /// The write that stores `job`.
    pub fn job_write(job: &JobRecord) -> Write {
        Write::Put(Table::Jobs, job.id.clone(), json(job))
    }

    pub fn participant_write(p: &ParticipantRecord) -> Write {
        Write::Put(Table::Participants, p.id.clone(), json(p))
    }

    /// Stores `job` (no audit entry: progress the coordinator itself makes).
    pub fn put_job(&self, job: &JobRecord) -> Result<(), StateError> {
        self.backend.commit(&[Self::job_write(job)])
    }

    /// Records a model version that no round produced (a job's initial model).
    pub fn put_model(&self, m: &ModelManifest) -> Result<(), StateError> {
        self.backend.commit(&Self::model_writes(m))
    }

    /// A completed round, its model version, the strategy's state and the job's progress,
    /// in one commit: after a crash either all of them are there or none.
    pub fn commit_round(
        &self,
        job: &JobRecord,
        round: &RoundRecord,
        model: &ModelManifest,
        strategy_state: Option<&[u8]>,
    ) -> Result<(), StateError> {
        let mut w = vec![
            Self::job_write(job),
            Write::Put(
                Table::Rounds,
                round_key(&job.id, round.summary.round),
                json(round),
            ),
        ];
        w.extend(Self::model_writes(model));
        match strategy_state {
            Some(s) => w.push(Write::Put(Table::StrategyState, job.id.clone(), s.to_vec())),
            None => w.push(Write::Delete(Table::StrategyState, job.id.clone())),
        }
        self.backend.commit(&w)
    }

    /// Round 0's statistics of `job`, once committed.
    pub fn statistics(&self, job: &str) -> Result<Option<StatisticsRecord>, StateError> {
        self.one(Table::Statistics, job)
    }

    /// Commits round 0 of a job with tables: its statistics and the job's record together.
    pub fn commit_statistics(
        &self,
        job: &JobRecord,
        record: &StatisticsRecord,
    ) -> Result<(), StateError> {
        self.backend.commit(&[
            Self::job_write(job),
            Write::Put(Table::Statistics, job.id.clone(), json(record)),
        ])
    }

    /// Promotes `to` (audited).
    pub fn promote(&self, who: &str, to: &ModelRef) -> Result<AuditEntry, StateError> {
        let mut h = self.serving_history()?;
        h.push(to.clone());
        self.audited(
            who,
            "promote",
            &format!("{}@v{}", to.job_id, to.version),
            "",
            vec![Write::Put(Table::Meta, SERVING.into(), json(&h))],
        )
    }

    /// Serves the previously promoted version again (audited); `None` when there is none.
    pub fn rollback(&self, who: &str) -> Result<Option<ModelRef>, StateError> {
        let mut h = self.serving_history()?;
        if h.len() < 2 {
            return Ok(None);
        }
        let from = h.pop().expect("two entries");
        let to = h.last().cloned().expect("one entry left");
        self.audited(
            who,
            "rollback",
            &format!("{}@v{}", to.job_id, to.version),
            &format!("from {}@v{}", from.job_id, from.version),
            vec![Write::Put(Table::Meta, SERVING.into(), json(&h))],
        )?;
        Ok(Some(to))
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> JobRecord {
        JobRecord {
            id: id.into(),
            spec_toml: "id = \"x\"".into(),
            state: JobState::Created,
            rounds: 3,
            rounds_completed: 0,
            strategy: "fedavg".into(),
            model: "logistic".into(),
            dataset: String::new(),
            secure: true,
            created_unix_ms: 1,
            updated_unix_ms: 1,
            created_by: "admin-1".into(),
            restarts: 0,
        }
    }

    fn manifest(job: &str, version: u64) -> ModelManifest {
        ModelManifest {
            job_id: job.into(),
            version,
            parent: version.checked_sub(1),
            round: version,
            strategy: "fedavg".into(),
            model: cohort_model::ModelSpec::Logistic {
                inputs: 2,
                classes: 2,
            },
            num_parameters: 6,
            sha256: format!("{version:064x}"),
            params_digest: String::new(),
            participants: vec!["a".into()],
            total_examples: 10,
            train: None,
            eval: None,
            created_unix_ms: 5,
            weights_file: String::new(),
            pipeline: None,
            privacy: None,
        }
    }

    fn summary(round: u64) -> RoundSummary {
        RoundSummary {
            round,
            attempts: 1,
            participants: vec!["a".into()],
            stragglers: vec![],
            total_examples: 10,
            train: None,
            eval: None,
            evaluated_by: 0,
            seconds: 0.5,
            privacy: None,
            clipping: None,
        }
    }

    /// The same script against both backends; the redb one is reopened between steps, as a
    /// restarted coordinator would (never two handles at once: redb allows one per file).
    fn exercise(open: &dyn Fn() -> State) {
        let mut j = job("bc");
        {
            let s = open();
            s.audited(
                "admin-1",
                "create_job",
                "bc",
                "",
                vec![State::job_write(&j)],
            )
            .unwrap();
            for r in 1..=2 {
                j.rounds_completed = r;
                let rr = RoundRecord {
                    job_id: "bc".into(),
                    summary: summary(r),
                    completed_unix_ms: 9,
                };
                s.commit_round(&j, &rr, &manifest("bc", r), Some(&[r as u8; 4]))
                    .unwrap();
            }
        }
        // A second job's rounds do not mix with the first's.
        open()
            .commit_round(
                &job("other"),
                &RoundRecord {
                    job_id: "other".into(),
                    summary: summary(1),
                    completed_unix_ms: 9,
                },
                &manifest("other", 1),
                None,
            )
            .unwrap();
        let a = ModelRef {
            job_id: "bc".into(),
            version: 1,
        };
        let b = ModelRef {
            job_id: "bc".into(),
            version: 2,
        };
        {
            let s = open();
            assert_eq!(s.job("bc").unwrap().unwrap().rounds_completed, 2);
            assert_eq!(
                s.rounds("bc")
                    .unwrap()
                    .iter()
                    .map(|r| r.summary.round)
                    .collect::<Vec<_>>(),
                vec![1, 2]
            );
            assert_eq!(s.models(Some("bc")).unwrap().len(), 2);
            assert_eq!(s.models(None).unwrap().len(), 3);
            assert_eq!(s.strategy_state("bc").unwrap(), Some(vec![2; 4]));
            assert_eq!(s.strategy_state("other").unwrap(), None);
            // Serving: promote twice, roll back once, not past the first.
            s.promote("admin-1", &a).unwrap();
            s.promote("admin-2", &b).unwrap();
        }
        {
            let s = open();
            assert_eq!(s.serving().unwrap(), Some(b));
            assert_eq!(s.rollback("admin-1").unwrap(), Some(a.clone()));
        }
        assert_eq!(open().rollback("admin-1").unwrap(), None);
        assert_eq!(open().serving().unwrap(), Some(a));
        let audit = open().audit(100).unwrap();
        assert_eq!(
            audit
                .iter()
                .map(|e| (e.seq, e.who.as_str(), e.action.as_str()))
                .collect::<Vec<_>>(),
            vec![
                (1, "admin-1", "create_job"),
                (2, "admin-1", "promote"),
                (3, "admin-2", "promote"),
                (4, "admin-1", "rollback"),
            ]
        );
        assert_eq!(open().audit(2).unwrap()[0].seq, 3);
        // Participants.
        let p = ParticipantRecord {
            id: "h1".into(),
            approval: Approval::Pending,
            role: "participant".into(),
            first_seen_unix_ms: 1,
            last_seen_unix_ms: 2,
            num_examples: 3,
        };
        open().put_participant(&p).unwrap();
        assert_eq!(open().participant("h1").unwrap(), Some(p));
        assert_eq!(open().participant("h2").unwrap(), None);
    }

    #[test]
    fn memory_backend_keeps_what_was_committed() {
        let s = State::in_memory();
        exercise(&|| s.clone());
    }

    #[test]
    fn redb_backend_keeps_what_was_committed_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("coordinator.redb");
        exercise(&|| State::open(&path).unwrap());
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let s = State::in_memory();
        s.backend
            .commit(&[Write::Put(Table::Jobs, "bc".into(), b"{not json".to_vec())])
            .unwrap();
        let e = s.jobs().unwrap_err().to_string();
        assert!(e.contains("jobs/bc"), "{e}");
    }

    #[test]
    fn an_unwritable_database_path_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let e = State::open(&file.join("state.redb"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("plain-file"), "{e}");
    }
}
