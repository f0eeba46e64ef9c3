//! The agent loop: join, long-poll for tasks, dispatch them, rejoin after losing the
//! coordinator, and leave (or wait for the next job) when a job finishes.

use super::*;

pub(crate) async fn agent(
    opts: AgentOptions,
    data: Option<Arc<LocalData>>,
) -> Result<AgentReport, AgentError> {
    let mut report = AgentReport::default();
    let n = data.as_ref().map_or(0, |d| d.train.len() as u64);
    let secrets: SharedSecrets = Arc::new(Mutex::new(Secrets::generate()));
    let keys = lock(&secrets).keys(opts.tls.as_ref())?;
    let mut s = connect(&opts, n, &keys).await?;
    loop {
        let polled = s
            .client
            .poll_task(pb::PollTaskRequest {
                session_id: s.id.clone(),
                wait_ms: opts.poll_wait.as_millis() as u32,
            })
            .await;
        let outcome = match polled.map(|r| r.into_inner().kind) {
            Ok(Some(Kind::Train(_) | Kind::Evaluate(_))) if data.is_none() => {
                tracing::error!(participant = %opts.id, "asked to train or evaluate, but this node is a custodian and holds no data");
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            }
            Ok(Some(Kind::Train(t))) => {
                let round = t.round;
                let data = data.as_ref().expect("checked above");
                let r = train_round(&mut s, &opts, data, &secrets, t).await;
                if r.is_ok() {
                    report.rounds_trained += 1;
                } else if let Err(e) = &r
                    && matches!(e.code(), Code::FailedPrecondition | Code::AlreadyExists)
                {
                    tracing::warn!(participant = %opts.id, round, "update refused: {}", e.message());
                    report.updates_refused += 1;
                    continue;
                }
                r
            }
            Ok(Some(Kind::Evaluate(e))) => {
                let data = data.as_ref().expect("checked above");
                let r = evaluate_round(&mut s, &opts, data, e).await;
                if r.is_ok() {
                    report.evaluations += 1;
                } else if let Err(e) = &r
                    && matches!(e.code(), Code::FailedPrecondition | Code::AlreadyExists)
                {
                    continue;
                }
                r
            }
            Ok(Some(Kind::Decrypt(d))) => {
                let r = decrypt_round(&mut s, &opts, &secrets, d).await;
                if r.is_ok() {
                    report.shares_sent += 1;
                }
                if let Err(e) = &r
                    && matches!(e.code(), Code::FailedPrecondition | Code::AlreadyExists)
                {
                    continue;
                }
                r
            }
            Ok(Some(Kind::Idle(_))) | Ok(None) => Ok(()),
            Ok(Some(Kind::Finished(f))) if opts.stay_between_jobs => {
                // A new job replaces the coordinator's sessions: the next poll then fails
                // with Unauthenticated, and this node joins the new job.
                tracing::info!(participant = %opts.id, "{}; waiting for the next job", f.reason);
                tokio::time::sleep(BETWEEN_JOBS_POLL).await;
                Ok(())
            }
            Ok(Some(Kind::Finished(f))) => {
                tracing::info!(participant = %opts.id, "{}", f.reason);
                let _ = s
                    .client
                    .leave(pb::LeaveRequest {
                        session_id: s.id.clone(),
                    })
                    .await;
                return Ok(report);
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.code(),
                    Code::Unauthenticated | Code::Unavailable | Code::Unknown | Code::Cancelled
                ) =>
            {
                tracing::warn!(participant = %opts.id, "lost the coordinator ({}); rejoining", e.message());
                s = connect(&opts, n, &keys).await?;
            }
            Err(e) => {
                tracing::warn!(participant = %opts.id, "task failed: {} ({:?})", e.message(), e.code());
                // This node refused the task itself (Aborted): the same task will come back
                // until the round moves on, so wait longer before asking again.
                let pause = if e.code() == Code::Aborted { 1000 } else { 200 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
}
