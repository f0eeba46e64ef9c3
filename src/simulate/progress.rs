//! Following a simulation: the progress bar (rounds, rounds a second, ETA, updates of the
//! round under way) and `--rounds-log`, a CSV line a round as it completes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use cohort_coordinator::{Event, RoundSummary};

use super::fmt_opt;

/// `--rounds-log`: one CSV line a completed round, written as it completes.
pub(super) struct RoundsLog {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl RoundsLog {
    pub(super) fn create(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("creating the rounds log {}", path.display()))?;
        let mut log = RoundsLog {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
        };
        log.line(
            "round,participants,stragglers,train_loss,train_accuracy,eval_loss,eval_accuracy,\
             eval_auc,seconds",
        );
        Ok(log)
    }

    fn line(&mut self, text: &str) {
        use std::io::Write;
        if let Err(e) = writeln!(self.file, "{text}").and_then(|_| self.file.flush()) {
            tracing::error!("writing the rounds log {}: {e}", self.path.display());
        }
    }

    fn round(&mut self, s: &RoundSummary) {
        let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
        self.line(&format!(
            "{},{},{},{},{},{},{},{},{}",
            s.round,
            s.participants.len(),
            s.stragglers.len(),
            opt(s.train.map(|m| m.loss)),
            opt(s.train.map(|m| m.accuracy)),
            opt(s.eval.map(|m| m.loss)),
            opt(s.eval.map(|m| m.accuracy)),
            opt(s.eval.and_then(|m| m.auc)),
            s.seconds
        ));
    }
}

/// The progress bar's view of the events, and the rounds log.
pub(super) struct Progress {
    pub(super) bar: indicatif::ProgressBar,
    pub(super) selected: usize,
    pub(super) received: usize,
    pub(super) last: String,
    pub(super) log: Option<RoundsLog>,
    /// What the run learns besides its rounds, read after it.
    pub(super) outcome: std::sync::Arc<std::sync::Mutex<Outcome>>,
}

/// Round 0's statistics and pipeline (jobs with tables), and why the job stopped if it
/// stopped on its own.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub(super) statistics: Option<cohort_coordinator::round::FederationStatistics>,
    pub(super) failure: Option<String>,
}

impl Progress {
    pub(super) fn on(&mut self, ev: &Event) {
        match ev {
            Event::RoundStarted { selected, .. } => {
                (self.selected, self.received) = (selected.len(), 0);
            }
            Event::UpdateAccepted { .. } => self.received += 1,
            Event::StatisticsCompleted { statistics, .. } => {
                self.outcome.lock().expect("outcome lock").statistics = Some(statistics.clone());
                self.last = format!(
                    ", round 0: statistics of {} sites, {} rows",
                    statistics.sites, statistics.stats.rows
                );
            }
            Event::JobFailed { reason } => {
                self.outcome.lock().expect("outcome lock").failure = Some(reason.clone());
            }
            Event::RoundCompleted { summary, .. } => {
                if let Some(log) = &mut self.log {
                    log.round(summary);
                }
                self.bar.inc(1);
                self.last = format!(
                    ", last held-out accuracy {}",
                    fmt_opt(summary.eval.map(|m| m.accuracy), 4)
                );
            }
            _ => {}
        }
        self.bar.set_message(format!(
            "{}/{} updates{}",
            self.received, self.selected, self.last
        ));
    }
}
