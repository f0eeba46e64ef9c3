//! Retention: how much the coordinator keeps of the parts of its state that grow with use
//! (`[retention]` in its configuration). Without a setting, everything is kept.
//!
//! - **Model versions**: each round writes one. A job keeps its newest `model_versions`; a
//!   job's newest is always among them (a running job resumes from it). The serving
//!   history keeps its newest `model_versions` promotions too (how far a rollback can go
//!   back), and their versions are kept whatever their age. A weights object goes once no kept version names it
//!   (objects are content-addressed and shared between versions and jobs).
//! - **Round history**: a finished or cancelled job keeps its newest `round_history` round
//!   records. An active job keeps all of them: its privacy accounting and a resume after a
//!   restart replay them.
//! - **Audit log**: the newest `audit_entries` entries. Once [`State::keep_audit`] is set,
//!   each audited action removes the entry that falls out of the window in the same commit,
//!   so the log never holds more.
//!
//! Pruning is a state commit (the record) followed by removing the registry's objects; a
//! crash between the two leaves objects no state names, which the next pass at start
//! ([`State::prune`] with every job) removes.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::records::{ModelManifest, ModelRef};
use crate::state::{
    AuditEntry, JobRecord, SERVING, State, StateError, Table, Write, job_prefix, json, parse,
    round_key, seq_key, weight_ref_key,
};

/// `[retention]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Model versions kept per job (the newest), and promotions kept in the serving history
    /// (their versions are kept regardless of age). At least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_versions: Option<u64>,
    /// Round records kept per finished or cancelled job (the newest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_history: Option<u64>,
    /// Audit entries kept (the newest). At least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_entries: Option<u64>,
}

impl Retention {
    /// Refuses settings that would keep nothing where something must be kept.
    pub fn validate(&self) -> Result<(), String> {
        if self.model_versions == Some(0) {
            return Err(
                "retention.model_versions must be at least 1: a job's newest version \
                        is the model it resumes from"
                    .into(),
            );
        }
        if self.audit_entries == Some(0) {
            return Err(
                "retention.audit_entries must be at least 1 (omit it to keep the \
                        whole audit log)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether any part is pruned.
    pub fn prunes(&self) -> bool {
        self.model_versions.is_some()
            || self.round_history.is_some()
            || self.audit_entries.is_some()
    }
}

/// What one pass removed from the state; the caller removes the same versions' registry
/// manifests and the weights in `orphaned_weights`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pruned {
    pub model_versions: Vec<ModelRef>,
    pub rounds: usize,
    pub audit_entries: usize,
    /// Weights objects that a removed version named and no kept version does.
    pub orphaned_weights: Vec<String>,
}

impl Pruned {
    pub fn is_empty(&self) -> bool {
        self.model_versions.is_empty() && self.rounds == 0 && self.audit_entries == 0
    }
}

impl State {
    /// Applies `retention` to `jobs` (and to the audit log), in one commit.
    pub fn prune(&self, retention: &Retention, jobs: &[JobRecord]) -> Result<Pruned, StateError> {
        let mut writes = Vec::new();
        let mut out = Pruned::default();
        // The newest promotions (those a rollback can return to) keep their versions; with
        // model versions pruned, the serving history keeps as many entries as a job keeps
        // versions.
        let mut history = self.serving_history()?;
        let mut jobs = jobs.to_vec();
        if let Some(keep) = retention.model_versions {
            let cut = history.len().saturating_sub(keep.max(1) as usize);
            if cut > 0 {
                // The jobs of promotions that leave the history may have versions that only
                // those promotions kept: they are pruned in this pass too.
                for r in history.drain(..cut) {
                    if !jobs.iter().any(|j| j.id == r.job_id)
                        && let Some(j) = self.job(&r.job_id)?
                    {
                        jobs.push(j);
                    }
                }
                writes.push(Write::Put(Table::Meta, SERVING.into(), json(&history)));
            }
        }
        let served: BTreeSet<ModelRef> = history.into_iter().collect();
        let mut removed_weights = BTreeSet::new();
        for job in &jobs {
            if let Some(keep) = retention.model_versions {
                let versions = self.models(Some(&job.id))?;
                let cut = versions.len().saturating_sub(keep.max(1) as usize);
                for m in &versions[..cut] {
                    let r = ModelRef {
                        job_id: m.job_id.clone(),
                        version: m.version,
                    };
                    if served.contains(&r) {
                        continue;
                    }
                    writes.push(Write::Delete(
                        Table::Models,
                        round_key(&m.job_id, m.version),
                    ));
                    writes.push(Write::Delete(
                        Table::WeightRefs,
                        weight_ref_key(&m.weights_file, &m.job_id, m.version),
                    ));
                    removed_weights.insert(m.weights_file.clone());
                    out.model_versions.push(r);
                }
            }
            if let Some(keep) = retention.round_history.filter(|_| !job.state.is_active()) {
                let keys: Vec<String> = self
                    .backend
                    .scan_prefix(Table::Rounds, &job_prefix(&job.id))?
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
                let cut = keys.len().saturating_sub(keep as usize);
                out.rounds += cut;
                writes.extend(
                    keys.into_iter()
                        .take(cut)
                        .map(|k| Write::Delete(Table::Rounds, k)),
                );
            }
        }
        if let Some(keep) = retention.audit_entries
            && let Some((k, v)) = self.backend.last(Table::Audit)?
        {
            let last = parse::<AuditEntry>(Table::Audit, &k, &v)?.seq;
            // Entries are numbered from 1 without gaps; the oldest kept is `last - keep + 1`.
            let first_kept = seq_key(last.saturating_sub(keep.max(1)) + 1);
            // Audited actions trim the log as they go: usually nothing is older.
            let older = self
                .backend
                .first_key(Table::Audit)?
                .is_some_and(|k| k < first_kept);
            for (key, _) in older
                .then(|| self.backend.scan(Table::Audit))
                .transpose()?
                .unwrap_or_default()
            {
                if key >= first_kept {
                    break;
                }
                writes.push(Write::Delete(Table::Audit, key));
                out.audit_entries += 1;
            }
        }
        if writes.is_empty() {
            return Ok(out);
        }
        self.backend.commit(&writes)?;
        for w in removed_weights {
            if self
                .backend
                .scan_prefix(Table::WeightRefs, &format!("{w}\u{0}"))?
                .is_empty()
            {
                out.orphaned_weights.push(w);
            }
        }
        Ok(out)
    }

    /// Builds the weights index again where it does not match the versions: a state written
    /// before the index existed, or versions added or removed by a coordinator that did not
    /// keep it (an older release run on the same file). Each version has exactly one entry,
    /// so the counts agree exactly when the index is whole; otherwise pruning could take a
    /// kept version's weights for orphaned. Checked at every opening (two counts).
    pub(crate) fn index_weights(&self) -> Result<(), StateError> {
        if self.backend.count(Table::WeightRefs)? == self.backend.count(Table::Models)? {
            return Ok(());
        }
        let stale = self
            .backend
            .scan(Table::WeightRefs)?
            .into_iter()
            .map(|(k, _)| Write::Delete(Table::WeightRefs, k));
        let fresh = self.models(None)?.into_iter().map(|m| {
            Write::Put(
                Table::WeightRefs,
                weight_ref_key(&m.weights_file, &m.job_id, m.version),
                Vec::new(),
            )
        });
        self.backend.commit(&stale.chain(fresh).collect::<Vec<_>>())
    }

    /// Every weights object a kept model version names.
    pub fn weights_named(&self) -> Result<BTreeSet<String>, StateError> {
        Ok(self
            .models(None)?
            .into_iter()
            .map(|m: ModelManifest| m.weights_file)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::RoundSummary;
    use crate::state::{JobState, RoundRecord};

    fn job(id: &str, state: JobState) -> JobRecord {
        JobRecord {
            id: id.into(),
            spec_toml: String::new(),
            state,
            rounds: 10,
            rounds_completed: 0,
            strategy: "fedavg".into(),
            model: "logistic".into(),
            dataset: String::new(),
            secure: false,
            created_unix_ms: 1,
            updated_unix_ms: 1,
            created_by: "ops".into(),
            restarts: 0,
        }
    }

    fn round(s: &State, j: &JobRecord, r: u64, weights: &str) {
        let summary = RoundSummary {
            round: r,
            attempts: 1,
            participants: vec!["a".into()],
            stragglers: vec![],
            total_examples: 1,
            train: None,
            eval: None,
            evaluated_by: 0,
            seconds: 0.1,
            privacy: None,
            clipping: None,
        };
        let m = ModelManifest {
            job_id: j.id.clone(),
            version: r,
            parent: r.checked_sub(1),
            round: r,
            strategy: "fedavg".into(),
            model: cohort_model::ModelSpec::Logistic {
                inputs: 2,
                classes: 2,
            },
            num_parameters: 6,
            sha256: String::new(),
            params_digest: String::new(),
            participants: vec![],
            total_examples: 1,
            train: None,
            eval: None,
            created_unix_ms: 1,
            weights_file: weights.into(),
            pipeline: None,
            privacy: None,
        };
        let rec = RoundRecord {
            job_id: j.id.clone(),
            summary,
            completed_unix_ms: 1,
        };
        s.commit_round(j, &rec, &m, None).unwrap();
    }

    fn versions(s: &State, job: &str) -> Vec<u64> {
        s.models(Some(job))
            .unwrap()
            .iter()
            .map(|m| m.version)
            .collect()
    }

    #[test]
    fn retention_keeps_the_newest_the_promoted_and_whatever_another_version_shares() {
        keeps_what_it_should(State::in_memory());
        let dir = tempfile::tempdir().unwrap();
        keeps_what_it_should(State::open(&dir.path().join("state.redb")).unwrap());
    }

    fn keeps_what_it_should(s: State) {
        let a = job("a", JobState::Running);
        let b = job("b", JobState::Finished);
        for r in 1..=6 {
            round(&s, &a, r, &format!("w{r}"));
        }
        // Job b's version 1 shares a's version 1 weights; its others are its own.
        round(&s, &b, 1, "w1");
        round(&s, &b, 2, "wb2");
        for v in [2, 3, 4] {
            let to = ModelRef {
                job_id: "a".into(),
                version: v,
            };
            s.promote("ops", &to).unwrap();
        }
        for i in 0..3 {
            s.audited("ops", "noop", &i.to_string(), "", vec![])
                .unwrap();
        }
        let keep = Retention {
            model_versions: Some(2),
            round_history: Some(1),
            audit_entries: Some(3),
        };
        let p = s.prune(&keep, &[a.clone(), b.clone()]).unwrap();
        // The serving history keeps its newest two promotions, and their versions stay.
        let served: Vec<u64> = s
            .serving_history()
            .unwrap()
            .iter()
            .map(|r| r.version)
            .collect();
        assert_eq!(served, vec![3, 4]);
        assert_eq!(
            versions(&s, "a"),
            vec![3, 4, 5, 6],
            "newest two and the promoted ones"
        );
        assert_eq!(versions(&s, "b"), vec![1, 2]);
        // w1 is no longer named by a, but b's version 1 still names it.
        assert_eq!(p.orphaned_weights, vec!["w2".to_string()]);
        // a is running: all its rounds stay; b is finished: its newest one.
        assert_eq!(s.rounds("a").unwrap().len(), 6);
        assert_eq!(
            s.rounds("b")
                .unwrap()
                .iter()
                .map(|r| r.summary.round)
                .collect::<Vec<_>>(),
            vec![2]
        );
        let audit: Vec<u64> = s.audit(100).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(audit, vec![4, 5, 6]);
        // Numbering carries on after pruning; with the window set, each audited action
        // drops the entry that leaves it.
        s.keep_audit(Some(3));
        assert_eq!(s.audited("ops", "noop", "x", "", vec![]).unwrap().seq, 7);
        let audit: Vec<u64> = s.audit(100).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(audit, vec![5, 6, 7]);
        // A second pass has nothing left to do.
        let again = s.prune(&keep, &[a.clone(), b.clone()]).unwrap();
        assert!(again.is_empty(), "{again:?}");
        // Promotions that leave the serving history let their versions go, even in a pass
        // over another job.
        for v in [5, 6] {
            let to = ModelRef {
                job_id: "a".into(),
                version: v,
            };
            s.promote("ops", &to).unwrap();
        }
        let p = s.prune(&keep, &[b]).unwrap();
        assert_eq!(versions(&s, "a"), vec![5, 6]);
        assert_eq!(p.orphaned_weights, vec!["w3".to_string(), "w4".into()]);
    }

    #[test]
    fn a_weights_index_that_does_not_match_the_versions_is_built_again() {
        let s = State::in_memory();
        let a = job("a", JobState::Finished);
        let b = job("b", JobState::Finished);
        for r in 1..=3 {
            round(&s, &a, r, &format!("w{r}"));
        }
        round(&s, &b, 1, "w1");
        // An older coordinator wrote no index.
        let refs = |s: &State| s.backend.scan(Table::WeightRefs).unwrap().len();
        assert_eq!(refs(&s), 4);
        let drop_index: Vec<Write> = s
            .backend
            .scan(Table::WeightRefs)
            .unwrap()
            .into_iter()
            .map(|(k, _)| Write::Delete(Table::WeightRefs, k))
            .collect();
        s.backend.commit(&drop_index).unwrap();
        assert_eq!(refs(&s), 0);
        s.index_weights().unwrap();
        assert_eq!(refs(&s), 4);
        let keep = Retention {
            model_versions: Some(1),
            ..Default::default()
        };
        let p = s.prune(&keep, &[a, b]).unwrap();
        // a's versions 1 and 2 go; w1 is still b's.
        assert_eq!(p.orphaned_weights, vec!["w2".to_string()]);
        assert_eq!(refs(&s), 2);
        // A whole index is left as it is.
        s.index_weights().unwrap();
        assert_eq!(refs(&s), 2);
        // A version that an older coordinator added, writing no index entry, sharing b's
        // version 1 weights. Unless the index is built again, pruning b's version 1 would
        // take w1 for orphaned while version 9 still names it.
        let mut late = s.model("b", 1).unwrap().unwrap();
        late.version = 9;
        s.backend
            .commit(&[Write::Put(Table::Models, round_key("b", 9), json(&late))])
            .unwrap();
        s.index_weights().unwrap();
        assert_eq!(refs(&s), 3);
        let p = s.prune(&keep, &[job("b", JobState::Finished)]).unwrap();
        assert_eq!(versions(&s, "b"), vec![9]);
        assert!(p.orphaned_weights.is_empty(), "{p:?}");
    }

    #[test]
    fn settings_that_keep_nothing_are_refused_by_name() {
        let e = Retention {
            model_versions: Some(0),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("retention.model_versions"), "{e}");
        let e = Retention {
            audit_entries: Some(0),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("retention.audit_entries"), "{e}");
        assert!(!Retention::default().prunes());
    }
}
