//! Prometheus metrics, served as text on `/metrics` (`metrics_listen` in coordinator.toml).
//!
//! Names follow Prometheus conventions (`_total` counters, `_seconds` units). Each is fed
//! from the coordinator's processed events, so the counts agree with what was committed.
//! `deploy/prometheus/alerts.yml` holds alerting rules over them. Jobs are labelled `job_id`,
//! not `job`, which Prometheus reserves for the scrape target.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::round::{Event, FailureCause};
use cohort_storage::ModelRef;
use cohort_storage::state::JobState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabel {
    job_id: String,
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    job_id: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ParticipantLabel {
    participant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabel {
    identity: String,
    role: String,
}

/// A certificate the coordinator holds or has seen: whose, in which role, and when it
/// expires (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateExpiry {
    pub identity: String,
    pub role: String,
    pub not_after: i64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServingLabel {
    job_id: String,
}

/// Every state a job's `cohort_job_state` series exist for.
const JOB_STATES: [JobState; 5] = [
    JobState::Created,
    JobState::Running,
    JobState::Paused,
    JobState::Finished,
    JobState::Cancelled,
];

/// Ended (finished or cancelled) jobs whose series stay on /metrics, the newest. An older
/// job's series are removed, so the page does not grow with every job a long-running
/// coordinator runs; Prometheus keeps what it scraped of them.
pub const ENDED_JOBS_SHOWN: usize = 10;

/// The coordinator's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    rounds_started: Family<JobLabel, Counter>,
    rounds_completed: Family<JobLabel, Counter>,
    round_failures: Family<FailureLabel, Counter>,
    round_duration: Family<JobLabel, Histogram>,
    round_participants: Family<JobLabel, Gauge>,
    stragglers: Family<JobLabel, Counter>,
    committee_failures: Family<JobLabel, Counter>,
    commit_failures: Family<JobLabel, Counter>,
    commit_pending: Family<JobLabel, Gauge>,
    job_state: Family<StateLabel, Gauge>,
    participants_connected: Gauge,
    participant_last_seen: Family<ParticipantLabel, Gauge>,
    participants_lost: Counter,
    bytes_received: Family<KindLabel, Counter>,
    aggregation_seconds: Family<KindLabel, Histogram>,
    serving_version: Family<ServingLabel, Gauge>,
    privacy_epsilon: Family<JobLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    clip_norm: Family<JobLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// The inference service's (embedded or `cohort serve`).
    inference: cohort_serving::InferenceMetrics,
    /// Who is online, to count `participants_connected` exactly.
    online: Arc<Mutex<BTreeMap<String, bool>>>,
    /// Ended jobs whose series are still shown, oldest first (see [`ENDED_JOBS_SHOWN`]).
    ended: Arc<Mutex<std::collections::VecDeque<String>>>,
    certificate_expiry: Family<CertificateLabel, Gauge>,
    /// The certificates behind `certificate_expiry`, by identity and role.
    certificates: Arc<Mutex<BTreeMap<(String, String), i64>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn duration_buckets() -> Histogram {
    // 0.1 s … ~30 min.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.1, 2.0, 15,
    ))
}

fn fast_buckets() -> Histogram {
    // 0.1 ms … ~3 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1e-4, 2.0, 15,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("cohort");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            rounds_started: Family::default(),
            rounds_completed: Family::default(),
            round_failures: Family::default(),
            round_duration: Family::new_with_constructor(duration_buckets),
            round_participants: Family::default(),
            stragglers: Family::default(),
            committee_failures: Family::default(),
            commit_failures: Family::default(),
            commit_pending: Family::default(),
            job_state: Family::default(),
            participants_connected: Gauge::default(),
            participant_last_seen: Family::default(),
            participants_lost: Counter::default(),
            bytes_received: Family::default(),
            aggregation_seconds: Family::new_with_constructor(fast_buckets),
            serving_version: Family::default(),
            privacy_epsilon: Family::default(),
            clip_norm: Family::default(),
            inference: cohort_serving::InferenceMetrics::new(),
            online: Arc::default(),
            ended: Arc::default(),
            certificate_expiry: Family::default(),
            certificates: Arc::default(),
        };
        r.register(
            "rounds_started",
            "Round attempts started",
            m.rounds_started.clone(),
        );
        r.register(
            "rounds_completed",
            "Rounds completed and committed as a model version",
            m.rounds_completed.clone(),
        );
        r.register(
            "round_failures",
            "Round attempts that failed, by cause",
            m.round_failures.clone(),
        );
        r.register(
            "round_duration_seconds",
            "Time from a completed round's start to its commit",
            m.round_duration.clone(),
        );
        r.register(
            "privacy_epsilon",
            "Jobs with differential privacy: epsilon spent so far (at the job's delta)",
            m.privacy_epsilon.clone(),
        );
        r.register(
            "clip_norm",
            "Jobs with adaptive clipping: the clip norm of the next round",
            m.clip_norm.clone(),
        );
        r.register(
            "round_participants",
            "Participants aggregated in the last completed round",
            m.round_participants.clone(),
        );
        r.register(
            "stragglers",
            "Selected participants left out at a round's deadline",
            m.stragglers.clone(),
        );
        r.register(
            "committee_member_failures",
            "Committee members that refused or missed the decryption deadline",
            m.committee_failures.clone(),
        );
        r.register(
            "commit_failures",
            "Failed attempts to commit a completed round (model version and state) to storage",
            m.commit_failures.clone(),
        );
        r.register(
            "commit_failing",
            "1 while a job holds a completed round that storage has refused to commit",
            m.commit_pending.clone(),
        );
        r.register(
            "job_state",
            "1 for each job's current state (created, running, paused, finished, cancelled)",
            m.job_state.clone(),
        );
        r.register(
            "participants_connected",
            "Participants online in the active job",
            m.participants_connected.clone(),
        );
        r.register(
            "participant_last_seen_timestamp_seconds",
            "When each participant joined or was last seen joining or leaving (Unix time)",
            m.participant_last_seen.clone(),
        );
        r.register(
            "participants_lost",
            "Participants not heard from within the liveness timeout",
            m.participants_lost.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes of uploads (kind=update) and decryption shares (kind=share) received",
            m.bytes_received.clone(),
        );
        r.register(
            "aggregation_seconds",
            "Time the state machine spent folding an upload into the sum (kind=update) or \
             decrypting it (kind=share)",
            m.aggregation_seconds.clone(),
        );
        r.register(
            "serving_version",
            "The model version promoted for serving, by job",
            m.serving_version.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "When each certificate expires (Unix time): the coordinator's own (role=coordinator), \
             the federation's CA (role=ca), and every participant's and custodian's as it last \
             joined",
            m.certificate_expiry.clone(),
        );
        m.inference.register(&mut r);
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }

    /// The inference service's share of the metrics.
    pub fn inference(&self) -> cohort_serving::InferenceMetrics {
        self.inference.clone()
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    fn job(job: &str) -> JobLabel {
        JobLabel { job_id: job.into() }
    }

    /// Counts what an event says.
    pub fn observe(&self, job: &str, ev: &Event) {
        let now = cohort_storage::state::unix_ms() as i64 / 1000;
        match ev {
            Event::RoundStarted { .. } => {
                self.rounds_started.get_or_create(&Self::job(job)).inc();
            }
            Event::RoundCompleted { summary, .. } => {
                self.rounds_completed.get_or_create(&Self::job(job)).inc();
                self.round_duration
                    .get_or_create(&Self::job(job))
                    .observe(summary.seconds);
                self.round_participants
                    .get_or_create(&Self::job(job))
                    .set(summary.participants.len() as i64);
                if let Some(c) = summary.clipping {
                    self.clip_norm
                        .get_or_create(&Self::job(job))
                        .set(c.next_clip_norm);
                }
                if let Some(p) = summary.privacy {
                    self.privacy_epsilon
                        .get_or_create(&Self::job(job))
                        .set(p.epsilon);
                }
            }
            Event::RoundFailed { cause, .. } => {
                let cause = match cause {
                    FailureCause::TooFewUpdates { .. } => "too_few_updates",
                    FailureCause::CommitteeUnavailable { .. } => "committee_unavailable",
                    FailureCause::Undecodable { .. } => "undecodable",
                };
                self.round_failures
                    .get_or_create(&FailureLabel {
                        job_id: job.into(),
                        cause: cause.into(),
                    })
                    .inc();
            }
            Event::StragglersDropped { ids, .. } => {
                self.stragglers
                    .get_or_create(&Self::job(job))
                    .inc_by(ids.len() as u64);
            }
            Event::MemberFailed { .. } => {
                self.committee_failures.get_or_create(&Self::job(job)).inc();
            }
            Event::CommitFailed { .. } => {
                self.commit_pending.get_or_create(&Self::job(job)).set(1);
            }
            Event::CommitRecovered { .. } => {
                self.commit_pending.get_or_create(&Self::job(job)).set(0);
            }
            Event::ParticipantJoined { id, .. } => self.presence(id, true, now),
            Event::ParticipantLeft { id } => self.presence(id, false, now),
            Event::ParticipantLost { id } => {
                self.participants_lost.inc();
                self.presence(id, false, now)
            }
            Event::JobCancelled { .. } | Event::JobFinished { .. } | Event::JobFailed { .. } => {
                self.online.lock().expect("metrics lock").clear();
                self.participants_connected.set(0);
            }
            _ => {}
        }
    }

    /// Records when the certificate of `identity` (in `role`) expires.
    pub fn certificate(&self, identity: &str, role: &str, not_after: i64) {
        self.certificate_expiry
            .get_or_create(&CertificateLabel {
                identity: identity.into(),
                role: role.into(),
            })
            .set(not_after);
        self.certificates
            .lock()
            .expect("metrics lock")
            .insert((identity.into(), role.into()), not_after);
    }

    /// Every certificate recorded by [`Self::certificate`], the soonest to expire first.
    pub fn certificates(&self) -> Vec<CertificateExpiry> {
        let mut v: Vec<CertificateExpiry> = self
            .certificates
            .lock()
            .expect("metrics lock")
            .iter()
            .map(|((identity, role), &not_after)| CertificateExpiry {
                identity: identity.clone(),
                role: role.clone(),
                not_after,
            })
            .collect();
        v.sort_by(|a, b| {
            a.not_after
                .cmp(&b.not_after)
                .then(a.identity.cmp(&b.identity))
        });
        v
    }

    /// One failed attempt to commit a round of `job`.
    pub fn commit_failure(&self, job: &str) {
        self.commit_failures.get_or_create(&Self::job(job)).inc();
    }

    fn presence(&self, id: &str, online: bool, now: i64) {
        let mut o = self.online.lock().expect("metrics lock");
        o.insert(id.to_string(), online);
        self.participants_connected
            .set(o.values().filter(|v| **v).count() as i64);
        self.participant_last_seen
            .get_or_create(&ParticipantLabel {
                participant: id.into(),
            })
            .set(now);
    }

    /// Sets a job's state, and makes sure each of its series exists from the start (at 0),
    /// so that `increase()` and `rate()` in alerting rules see every job.
    pub fn job_state(&self, job: &str, state: JobState) {
        let l = Self::job(job);
        let _ = self.rounds_started.get_or_create(&l);
        let _ = self.rounds_completed.get_or_create(&l);
        let _ = self.stragglers.get_or_create(&l);
        let _ = self.committee_failures.get_or_create(&l);
        let _ = self.commit_failures.get_or_create(&l);
        let _ = self.commit_pending.get_or_create(&l);
        let _ = self.round_duration.get_or_create(&l);
        for cause in ["too_few_updates", "committee_unavailable", "undecodable"] {
            let _ = self.round_failures.get_or_create(&FailureLabel {
                job_id: job.into(),
                cause: cause.into(),
            });
        }
        for s in JOB_STATES {
            self.job_state
                .get_or_create(&StateLabel {
                    job_id: job.into(),
                    state: s.as_str().into(),
                })
                .set(i64::from(s == state));
        }
        if !state.is_active() && state != JobState::Created {
            let mut ended = self.ended.lock().expect("metrics lock");
            if !ended.iter().any(|j| j == job) {
                ended.push_back(job.to_string());
            }
            while ended.len() > ENDED_JOBS_SHOWN {
                let old = ended.pop_front().expect("more than one");
                self.forget_job(&old);
            }
        }
    }

    /// Removes every series labelled with `job`.
    fn forget_job(&self, job: &str) {
        let l = Self::job(job);
        for f in [
            &self.rounds_started,
            &self.rounds_completed,
            &self.stragglers,
            &self.committee_failures,
            &self.commit_failures,
        ] {
            f.remove(&l);
        }
        self.commit_pending.remove(&l);
        self.round_participants.remove(&l);
        self.round_duration.remove(&l);
        self.privacy_epsilon.remove(&l);
        self.clip_norm.remove(&l);
        for cause in ["too_few_updates", "committee_unavailable", "undecodable"] {
            self.round_failures.remove(&FailureLabel {
                job_id: job.into(),
                cause: cause.into(),
            });
        }
        for s in JOB_STATES {
            self.job_state.remove(&StateLabel {
                job_id: job.into(),
                state: s.as_str().into(),
            });
        }
    }

    pub fn received(&self, kind: &str, bytes: u64) {
        self.bytes_received
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc_by(bytes);
    }

    pub fn aggregation(&self, kind: &str, seconds: f64) {
        self.aggregation_seconds
            .get_or_create(&KindLabel { kind: kind.into() })
            .observe(seconds);
    }

    pub fn serving(&self, to: &ModelRef) {
        self.serving_version.clear();
        self.serving_version
            .get_or_create(&ServingLabel {
                job_id: to.job_id.clone(),
            })
            .set(to.version as i64);
    }

    /// Serves `/metrics` on `listener` until `shutdown` completes, and `/ready` (always 200).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.serve_with_readiness(listener, shutdown, || true).await
    }

    /// Serves `/metrics`, and `/ready`: 200 when `ready()` says so, 503 otherwise.
    pub async fn serve_with_readiness(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
        ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
    ) -> std::io::Result<()> {
        cohort_protocol::server::serve_metrics(listener, shutdown, move || self.encode(), ready)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_rounds_and_presence_in_the_text_format() {
        let m = Metrics::new();
        m.observe(
            "bc",
            &Event::ParticipantJoined {
                id: "h1".into(),
                rejoined: false,
            },
        );
        m.observe(
            "bc",
            &Event::RoundFailed {
                round: 1,
                attempt: 1,
                cause: FailureCause::TooFewUpdates {
                    received: 0,
                    needed: 1,
                },
            },
        );
        m.job_state("bc", JobState::Running);
        let text = m.encode();
        assert!(text.contains("cohort_participants_connected 1"), "{text}");
        assert!(
            text.contains(r#"cohort_round_failures_total{job_id="bc",cause="too_few_updates"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cohort_job_state{job_id="bc",state="running"} 1"#),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }

    #[test]
    fn only_the_newest_ended_jobs_keep_their_series() {
        let m = Metrics::new();
        let n = ENDED_JOBS_SHOWN + 2;
        for i in 0..n {
            let job = format!("j{i}");
            m.job_state(&job, JobState::Running);
            m.job_state(&job, JobState::Finished);
        }
        m.job_state("now", JobState::Running);
        let text = m.encode();
        for i in 0..n {
            let shown = text.contains(&format!(
                r#"cohort_rounds_completed_total{{job_id="j{i}"}}"#
            ));
            assert_eq!(shown, i >= 2, "j{i}: {text}");
            let state = text.contains(&format!(
                r#"cohort_job_state{{job_id="j{i}",state="finished"}} 1"#
            ));
            assert_eq!(state, i >= 2, "j{i}: {text}");
        }
        assert!(
            text.contains(r#"cohort_job_state{job_id="now",state="running"} 1"#),
            "{text}"
        );
    }
}
