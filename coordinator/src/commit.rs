//! Committing what rounds produce, and pruning what the retention setting lets go.
//!
//! A completed round's model version is written to the registry, then committed to the
//! state together with its round record, the strategy's state and the job's progress (one
//! commit: after a crash all of them are there or none). Round 0 of a job with tables
//! commits the federation's statistics. After each commit, `[retention]` is applied to the
//! job: old model versions, the round history of a finished job and old audit entries go
//! from the state first, then their registry objects (see `cohort_storage::retention`).

use cohort_storage::state::{JobRecord, JobState, RoundRecord, StateError, unix_ms};
use std::sync::Mutex;

use cohort_storage::{ModelManifest, ModelStore, Pruned, Retention, State, StoreError};

use crate::config::JobSection;
use crate::metrics::Metrics as Meters;
use crate::round::RoundSummary;

/// The job an event came from (events are processed after the job may have been replaced),
/// and what commits need of it.
#[derive(Debug)]
pub(crate) struct JobContext {
    pub(crate) config: crate::JobConfig,
    pub(crate) strategy: &'static str,
    /// The job's view of the model registry.
    pub(crate) store: ModelStore,
}

/// The parts of the coordinator's shared state that commits and pruning touch.
pub(crate) struct Durable<'a> {
    pub(crate) state: &'a State,
    /// The registry's root.
    pub(crate) store: &'a ModelStore,
    /// Serialises read-modify-write of job and participant records.
    pub(crate) records: &'a Mutex<()>,
    pub(crate) retention: Retention,
    pub(crate) metrics: &'a Meters,
}

/// A completed round that could not be committed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    #[error("writing the model version: {0}")]
    Registry(#[from] StoreError),
    #[error("committing to the state: {0}")]
    State(#[from] StateError),
    #[error("the model writer panicked: {0}")]
    Panicked(String),
}

/// A job record for `cfg`, as created.
pub(crate) fn new_record(
    cfg: &crate::JobConfig,
    strategy: &str,
    spec: Option<&JobSection>,
    who: &str,
) -> JobRecord {
    let now = unix_ms();
    JobRecord {
        id: cfg.job_id.clone(),
        spec_toml: spec.map(|s| s.to_spec()).unwrap_or_default(),
        state: JobState::Created,
        rounds: cfg.rounds,
        rounds_completed: 0,
        strategy: strategy.to_string(),
        model: model_name(&cfg.model),
        dataset: spec.and_then(|s| s.dataset.clone()).unwrap_or_default(),
        secure: cfg.secure.is_some(),
        created_unix_ms: now,
        updated_unix_ms: now,
        created_by: who.to_string(),
        restarts: 0,
    }
}

fn model_name(m: &cohort_model::ModelSpec) -> String {
    use cohort_model::ModelSpec::*;
    match m {
        Logistic { inputs, classes } => format!("logistic {inputs}→{classes}"),
        Mlp {
            inputs,
            hidden,
            classes,
        } => format!("mlp {inputs}→{hidden:?}→{classes}"),
        Cnn { classes, .. } => format!("cnn →{classes}"),
        Layers { layers, .. } => format!("layers {}", cohort_model::layers::summary(layers)),
        Custom { name, .. } => format!("custom {name}"),
    }
}

/// Commits round 0: the federation's statistics with the job's record. Runs on a blocking
/// thread.
pub(crate) fn commit_statistics(
    d: &Durable,
    ctx: &JobContext,
    st: &crate::round::FederationStatistics,
) -> Result<(), CommitError> {
    let cfg = &ctx.config;
    let _g = d.records.lock().expect("records lock");
    let mut job = d
        .state
        .job(&cfg.job_id)?
        .unwrap_or_else(|| new_record(cfg, ctx.strategy, None, "embedded"));
    job.updated_unix_ms = unix_ms();
    let record = cohort_storage::state::StatisticsRecord {
        job_id: cfg.job_id.clone(),
        stats: st.stats.clone(),
        sites: st.sites,
        completed_unix_ms: unix_ms(),
    };
    d.state.commit_statistics(&job, &record)?;
    Ok(())
}

/// Writes a completed round's model version, then commits it with the round record, the
/// strategy's state and the job's progress. Runs on a blocking thread.
pub(crate) fn commit_round(
    d: &Durable,
    ctx: &JobContext,
    summary: &RoundSummary,
    params: &[f32],
    strategy_state: Option<&[u8]>,
    pipeline: Option<&cohort_model::tabular::Pipeline>,
) -> Result<ModelManifest, CommitError> {
    let cfg = &ctx.config;
    let m = ctx.store.write_with_pipeline(
        &cfg.job_id,
        &cfg.model,
        ctx.strategy,
        summary.round,
        params,
        Some(summary),
        unix_ms(),
        pipeline,
    )?;
    let _g = d.records.lock().expect("records lock");
    let mut job = d
        .state
        .job(&cfg.job_id)?
        .unwrap_or_else(|| new_record(cfg, ctx.strategy, None, "embedded"));
    job.rounds_completed = summary.round;
    job.updated_unix_ms = unix_ms();
    if summary.round >= cfg.rounds && job.state.is_active() {
        job.state = JobState::Finished;
    }
    let record = RoundRecord {
        job_id: cfg.job_id.clone(),
        summary: summary.clone(),
        completed_unix_ms: unix_ms(),
    };
    d.state.commit_round(&job, &record, &m, strategy_state)?;
    d.metrics.job_state(&job.id, job.state);
    Ok(m)
}

/// Applies the retention setting to job `id` (after its round was committed and its state
/// machine told, so pruning never delays the next round).
pub(crate) fn prune_job(d: &Durable, id: &str) {
    match d.state.job(id) {
        Ok(Some(job)) => {
            prune(d, &[job]);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(job = id, "retention: reading the job failed: {e}"),
    }
}

/// Applies the retention setting to `jobs` and the audit log, then removes the registry
/// objects of what went. Failures are logged and counted, never fatal: what was committed
/// stays committed, and the next pass tries again.
pub(crate) fn prune(d: &Durable, jobs: &[JobRecord]) -> Option<Pruned> {
    let retention = d.retention;
    if !retention.prunes() {
        return None;
    }
    let pruned = {
        let _g = d.records.lock().expect("records lock");
        d.state.prune(&retention, jobs)
    };
    let pruned = match pruned {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(
                "retention: pruning the state failed (retried after the next round): {e}"
            );
            return None;
        }
    };
    remove_objects(d, &pruned);
    if !pruned.is_empty() {
        tracing::debug!(
            versions = pruned.model_versions.len(),
            rounds = pruned.rounds,
            audit = pruned.audit_entries,
            weights = pruned.orphaned_weights.len(),
            "retention: pruned"
        );
    }
    Some(pruned)
}

/// Removes the registry manifests of pruned versions and the weights no kept version names.
fn remove_objects(d: &Durable, pruned: &Pruned) {
    let removed = pruned
        .model_versions
        .iter()
        .map(|r| d.store.for_job(&r.job_id).delete_version(r.version))
        .chain(
            pruned
                .orphaned_weights
                .iter()
                .map(|k| d.store.delete_weights(k)),
        );
    for r in removed {
        if let Err(e) = r {
            tracing::warn!(
                "retention: removing a registry object failed (removed at the next start): {e}"
            );
        }
    }
}

/// At start: applies the retention setting to every job, then removes registry objects that
/// no state record names any more (left by a pass that stopped between its state commit
/// and its object removals). Only when model versions are pruned at all: without that
/// setting the registry is left as it is.
pub(crate) fn prune_at_start(d: &Durable) -> Result<Option<Pruned>, StateError> {
    let jobs = d.state.jobs()?;
    let Some(pruned) = prune(d, &jobs) else {
        return Ok(None);
    };
    if d.retention.model_versions.is_none() {
        return Ok(Some(pruned));
    }
    let named = d.state.weights_named()?;
    let mut stray = Pruned::default();
    match d.store.weights_objects() {
        Ok(objects) => {
            stray.orphaned_weights = objects.into_iter().filter(|k| !named.contains(k)).collect()
        }
        Err(e) => tracing::warn!("retention: listing the registry's weights failed: {e}"),
    }
    for job in &jobs {
        let kept: std::collections::BTreeSet<u64> = d
            .state
            .models(Some(&job.id))?
            .iter()
            .map(|m| m.version)
            .collect();
        let Some(&newest) = kept.last() else { continue };
        match d.store.for_job(&job.id).versions() {
            // Versions above the newest committed one are a round's write before its
            // commit: the round is redone and overwrites them.
            Ok(vs) => stray.model_versions.extend(
                vs.into_iter()
                    .filter(|v| *v < newest && !kept.contains(v))
                    .map(|version| cohort_storage::ModelRef {
                        job_id: job.id.clone(),
                        version,
                    }),
            ),
            Err(e) => {
                tracing::warn!(job = %job.id, "retention: listing the registry's versions failed: {e}")
            }
        }
    }
    remove_objects(d, &stray);
    Ok(Some(pruned))
}
