//! Round 0: the federation's statistics, before any training, in jobs that declare their
//! tables (`JobConfig::data`).
//!
//! Every online participant (custodians aside) is asked for its training table's statistics
//! ([`cohort_model::tabular::TableStats`]: rows, per numeric column count, sum, sum of
//! squares and missing count, per categorical column a count per declared category, unknown
//! and missing, per class a count). Each statistic is split into signed digits
//! ([`DigitCodec::for_statistics`]) that travel as update values with weight 1, through the
//! same upload, secure aggregation and committee as a training round's updates: the
//! coordinator learns only the federation's totals, over at least T_min sites in secure
//! jobs. The decrypted digit sums recombine into exact sums (up to 2^-32 fixed-point
//! rounding of each site's values), from which the job's pipeline is fitted
//! ([`DataSpec::fit`]). The round is then committed like any other (the driver stores the
//! statistics with the job) and round 1 starts.
//!
//! Secure round 0 announces a weight unit of `u64::MAX`, so that every participant's
//! declared weight (`RoundInfo::weight_for`) is 1; the machine refuses any other weight in it.

use std::sync::Arc;
use std::time::Instant;

use cohort_crypto::{Codec, DigitCodec};
use cohort_model::tabular::{DataSpec, Pipeline, TableStats};

use super::{Event, FailureCause, Orchestrator, ParticipantId, Phase, Rejection};

/// The statistics round's outcome, kept for the job's life.
#[derive(Debug, Clone, PartialEq)]
pub struct FederationStatistics {
    pub stats: TableStats,
    pub pipeline: Arc<Pipeline>,
    /// The pipeline as JSON, as every training and evaluation task carries it (serialised
    /// once, not at every poll).
    pub pipeline_json: Arc<str>,
    /// Sites whose statistics are in the sums.
    pub sites: usize,
}

impl FederationStatistics {
    fn new(stats: TableStats, pipeline: Pipeline, sites: usize) -> Self {
        let json = serde_json::to_string(&pipeline).expect("a pipeline serialises");
        FederationStatistics {
            stats,
            pipeline: Arc::new(pipeline),
            pipeline_json: json.into(),
            sites,
        }
    }
}

/// Round 0's participants, timing and attempt, for its event.
pub(super) struct Closed {
    pub(super) attempt: u32,
    pub(super) participants: Vec<ParticipantId>,
    pub(super) stragglers: Vec<ParticipantId>,
    pub(super) started: Instant,
}

impl Orchestrator {
    /// The codec statistics' digits are scaled by: the secure codec, or the default one in
    /// plaintext jobs (so that their sums are just as exact).
    pub fn statistics_codec(&self) -> Codec {
        self.config
            .secure
            .as_ref()
            .map(|s| s.codec)
            .unwrap_or_default()
    }

    /// How statistics are split into update values (validated with the job).
    pub fn statistics_digits(&self) -> DigitCodec {
        DigitCodec::for_statistics(&self.statistics_codec())
            .expect("validated with the job's settings")
    }

    /// The job's tables, if it declares them.
    pub fn data_spec(&self) -> Option<&DataSpec> {
        self.config.data.as_ref()
    }

    /// The federation's statistics and pipeline, once round 0 is done.
    pub fn statistics(&self) -> Option<&FederationStatistics> {
        self.statistics.as_ref()
    }

    /// Values an update of `round` carries: the model's parameters, or in round 0 the
    /// digits of the statistics.
    pub(super) fn update_len(&self, round: u64) -> usize {
        match (&self.config.data, round) {
            (Some(data), 0) => self.statistics_digits().len_for(data.statistics_len()),
            _ => self.config.training_len(),
        }
    }

    /// Refuses what round 0 cannot carry: a weight other than 1, and (plaintext jobs) a
    /// value that is not a whole number of the codec's units within its clip.
    pub(super) fn check_statistics_update(
        &self,
        id: &str,
        round: u64,
        weight: u64,
        values: Option<&[f32]>,
    ) -> Result<(), Rejection> {
        if round != 0 {
            return Ok(());
        }
        if weight != 1 {
            return Err(Rejection::Invalid(format!(
                "{id}: statistics are summed with weight 1, not {weight}"
            )));
        }
        let codec = self.statistics_codec();
        let unit = (1u64 << codec.frac_bits) as f64;
        if let Some(i) = values.into_iter().flatten().position(|&v| {
            let s = v as f64 * unit;
            !(s.fract() == 0.0 && (v as f64).abs() <= codec.clip as f64)
        }) {
            return Err(Rejection::Invalid(format!(
                "{id}: statistics value {i} is not one of the codec's digits"
            )));
        }
        Ok(())
    }

    /// Restores the statistics of a job resumed after a restart (as stored when round 0
    /// was committed): the pipeline is fitted again from them, and a job still waiting for
    /// round 0 goes on to round 1.
    pub fn restore_statistics(
        &mut self,
        stats: &TableStats,
        sites: usize,
        now: Instant,
    ) -> Result<(), super::JobError> {
        let data = self.config.data.as_ref().ok_or_else(|| {
            super::JobError::Resume("statistics were stored for a job without tables".into())
        })?;
        let (stats, pipeline) = data
            .fit(&stats.to_values())
            .map_err(|e| super::JobError::Resume(format!("the stored statistics: {e}")))?;
        self.statistics = Some(FederationStatistics::new(stats, pipeline, sites));
        if let Phase::Waiting { round: 0, .. } = self.phase {
            self.phase = Phase::Waiting {
                round: 1,
                attempt: 1,
            };
            self.advance(now);
        }
        Ok(())
    }

    /// Round 0 closed with the integer sums of every statistic's digits: recombine them,
    /// fit the pipeline, report, and wait for the commit. Sums that do not decode fail the
    /// attempt (tried again); statistics no pipeline can be fitted from (a column without
    /// any value in the whole federation) stop the job, saying why.
    pub(super) fn finish_statistics(&mut self, closed: Closed, digit_sums: &[i64], now: Instant) {
        let data = self
            .config
            .data
            .clone()
            .expect("round 0 runs only in jobs with tables");
        let values = match self.statistics_digits().decode(digit_sums) {
            Ok(v) => v,
            Err(e) => {
                let cause = FailureCause::Undecodable {
                    reason: e.to_string(),
                };
                self.fail_attempt(0, closed.attempt, cause, now);
                return;
            }
        };
        match data.fit(&values) {
            Ok((stats, pipeline)) => {
                let sites = closed.participants.len();
                let statistics = FederationStatistics::new(stats, pipeline, sites);
                self.events.push_back(Event::StatisticsCompleted {
                    attempts: closed.attempt,
                    participants: closed.participants,
                    stragglers: closed.stragglers,
                    seconds: now.duration_since(closed.started).as_secs_f64(),
                    statistics: statistics.clone(),
                });
                self.statistics = Some(statistics);
                self.phase = Phase::Committing {
                    round: 0,
                    failure: None,
                };
            }
            Err(reason) => {
                let reason = format!("the federation's statistics fit no pipeline: {reason}");
                self.events.push_back(Event::JobFailed {
                    reason: reason.clone(),
                });
                self.failure = Some(reason);
                self.phase = Phase::Finished;
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
