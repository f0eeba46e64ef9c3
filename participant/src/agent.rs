//! The agent loop: join, long-poll for tasks, dispatch them, rejoin after losing the
//! coordinator, and leave (or wait for the next job) when a job finishes.

use super::*;

pub(crate) async fn agent(
    opts: AgentOptions,
    data: Option<SiteData>,
) -> Result<AgentReport, AgentError> {
    let mut report = AgentReport::default();
    let mut held = data.map(Held::new);
    let n = held.as_ref().map_or(0, Held::examples);
    let secrets: SharedSecrets = Arc::new(Mutex::new(Secrets::generate()));
    let keys = lock(&secrets).keys(opts.tls.as_ref())?;
    let mut controls = Controls::new(opts.state_dir.clone());
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
            Ok(Some(Kind::Train(_) | Kind::Evaluate(_) | Kind::Statistics(_)))
                if held.is_none() =>
            {
                tracing::error!(participant = %opts.id, "asked to train or evaluate, but this node is a custodian and holds no data");
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            }
            Ok(Some(Kind::Statistics(t))) => {
                let held = held.as_mut().expect("checked above");
                let spec: Option<cohort_model::tabular::DataSpec> = match serde_json::from_str(
                    &t.data_spec_json,
                ) {
                    Ok(spec) => spec,
                    Err(e) => {
                        tracing::warn!(participant = %opts.id, "statistics task without a readable schema: {e}");
                        continue;
                    }
                };
                let tables = match spec.as_ref().map(|spec| held.tables(spec)) {
                    Some(Ok(t)) => t,
                    Some(Err(NotReady::Data(e))) => return Err(give_up(&mut s, &opts, e).await),
                    Some(Err(NotReady::Task(st))) => {
                        tracing::error!(participant = %opts.id, "cannot send statistics: {}", st.message());
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    None => {
                        tracing::warn!(participant = %opts.id, "statistics task of a job without tables");
                        continue;
                    }
                };
                statistics_round(&mut s, &opts, &tables, &secrets, t).await
            }
            Ok(Some(Kind::Train(t))) => {
                let round = t.round;
                let data = match held
                    .as_mut()
                    .expect("checked above")
                    .ready(&t.pipeline_json)
                {
                    Ok(d) => d,
                    Err(NotReady::Data(e)) => return Err(give_up(&mut s, &opts, e).await),
                    Err(NotReady::Task(st)) => {
                        tracing::error!(participant = %opts.id, round, "cannot train: {}", st.message());
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let data = &data;
                let r = train_round(&mut s, &opts, data, &secrets, &mut controls, t).await;
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
                let data = match held
                    .as_mut()
                    .expect("checked above")
                    .ready(&e.pipeline_json)
                {
                    Ok(d) => d,
                    Err(NotReady::Data(err)) => return Err(give_up(&mut s, &opts, err).await),
                    Err(NotReady::Task(st)) => {
                        tracing::error!(participant = %opts.id, round = e.round, "cannot evaluate: {}", st.message());
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let r = evaluate_round(&mut s, &opts, &data, e).await;
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
            // Refused for good (an expired certificate, a node the operator removed): every
            // later call would be refused the same way.
            Err(e) if e.code() == Code::PermissionDenied => {
                tracing::error!(participant = %opts.id, "refused: {}", e.message());
                return Err(AgentError::Refused(e));
            }
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

/// This site's data cannot take part in the job (its file does not match the job's schema,
/// or the job's strict mode refuses its missing values): leave, saying why.
async fn give_up(s: &mut Session, opts: &AgentOptions, e: cohort_model::DataError) -> AgentError {
    tracing::error!(participant = %opts.id, "this site's data does not fit the job: {e}; leaving");
    let _ = s
        .client
        .leave(pb::LeaveRequest {
            session_id: s.id.clone(),
        })
        .await;
    AgentError::Data(e)
}

#[cfg(test)]
mod tests {
    //! The loop against a scripted coordinator (an in-process Federation server on a loopback
    //! socket whose PollTask answers follow a script): what it does with each kind of task
    //! and failure. The whole loop against the real coordinator runs in the end-to-end tests.

    use std::collections::VecDeque;
    use std::pin::Pin;

    use cohort_protocol::pb::federation_server::{Federation, FederationServer};
    use tonic::{Request, Response, Streaming};

    use super::*;

    type Script = VecDeque<Result<Kind, Status>>;

    /// What the scripted coordinator saw.
    #[derive(Default)]
    struct Seen {
        joins: Vec<String>,
        /// The session of each poll.
        polls: Vec<String>,
        left: Vec<String>,
        heartbeats: usize,
    }

    #[derive(Clone, Default)]
    struct Scripted {
        script: Arc<Mutex<Script>>,
        seen: Arc<Mutex<Seen>>,
        /// Join answers this instead of a session.
        refuse_join: Option<Code>,
    }

    type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

    fn not_scripted<T>() -> Result<T, Status> {
        Err(Status::unimplemented("not in the script"))
    }

    #[tonic::async_trait]
    impl Federation for Scripted {
        async fn join(
            &self,
            req: Request<pb::JoinRequest>,
        ) -> Result<Response<pb::JoinResponse>, Status> {
            let mut seen = self.seen.lock().unwrap();
            seen.joins.push(req.into_inner().participant_id);
            if let Some(code) = self.refuse_join {
                return Err(Status::new(code, "not admitted"));
            }
            Ok(Response::new(pb::JoinResponse {
                session_id: format!("session-{}", seen.joins.len()),
                job_id: "job".into(),
                heartbeat_interval_ms: 1_000,
            }))
        }

        async fn poll_task(
            &self,
            req: Request<pb::PollTaskRequest>,
        ) -> Result<Response<pb::Task>, Status> {
            self.seen
                .lock()
                .unwrap()
                .polls
                .push(req.into_inner().session_id);
            let next = self.script.lock().unwrap().pop_front();
            let kind = match next {
                Some(k) => k?,
                None => Kind::Finished(pb::FinishedTask {
                    reason: "job finished".into(),
                }),
            };
            Ok(Response::new(pb::Task { kind: Some(kind) }))
        }

        type FetchModelStream = Stream<pb::ModelChunk>;
        async fn fetch_model(
            &self,
            _: Request<pb::FetchModelRequest>,
        ) -> Result<Response<Self::FetchModelStream>, Status> {
            not_scripted()
        }

        async fn submit_update(
            &self,
            _: Request<Streaming<pb::UpdateChunk>>,
        ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
            not_scripted()
        }

        async fn submit_evaluation(
            &self,
            _: Request<pb::SubmitEvaluationRequest>,
        ) -> Result<Response<pb::SubmitEvaluationResponse>, Status> {
            not_scripted()
        }

        async fn heartbeat(
            &self,
            _: Request<pb::HeartbeatRequest>,
        ) -> Result<Response<pb::HeartbeatResponse>, Status> {
            self.seen.lock().unwrap().heartbeats += 1;
            Ok(Response::new(pb::HeartbeatResponse::default()))
        }

        async fn leave(
            &self,
            req: Request<pb::LeaveRequest>,
        ) -> Result<Response<pb::LeaveResponse>, Status> {
            self.seen
                .lock()
                .unwrap()
                .left
                .push(req.into_inner().session_id);
            Ok(Response::new(pb::LeaveResponse::default()))
        }

        type FetchDecryptionInputStream = Stream<pb::DecryptionInput>;
        async fn fetch_decryption_input(
            &self,
            _: Request<pb::FetchDecryptionInputRequest>,
        ) -> Result<Response<Self::FetchDecryptionInputStream>, Status> {
            not_scripted()
        }

        async fn submit_share(
            &self,
            _: Request<Streaming<pb::ShareChunk>>,
        ) -> Result<Response<pb::SubmitShareResponse>, Status> {
            not_scripted()
        }
    }

    /// Serves `script` on a loopback socket; returns the options to reach it and what it saw.
    async fn scripted(script: Script) -> (AgentOptions, Arc<Mutex<Seen>>) {
        serve(Scripted {
            script: Arc::new(Mutex::new(script)),
            ..Scripted::default()
        })
        .await
    }

    async fn serve(fake: Scripted) -> (AgentOptions, Arc<Mutex<Seen>>) {
        let seen = fake.seen.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(FederationServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let opts = AgentOptions {
            id: "site-a".into(),
            coordinator: format!("http://{addr}"),
            device: ComputeDevice::Cpu,
            poll_wait: Duration::from_millis(50),
            reconnect_for: Duration::from_secs(10),
            faults: Default::default(),
            tls: None,
            stay_between_jobs: false,
            compute: None,
            min_noise_multiplier: None,
            state_dir: None,
        };
        (opts, seen)
    }

    fn data() -> Arc<LocalData> {
        let ds = cohort_model::Dataset::new(
            (0..40).map(|i| (i % 7) as f32).collect(),
            (0..20).map(|i| (i % 2) as u32).collect(),
            cohort_model::FeatureShape::Flat(2),
            2,
        )
        .unwrap();
        Arc::new(LocalData::prepare(ds, 0.25, true, 1).unwrap())
    }

    fn idle() -> Result<Kind, Status> {
        Ok(Kind::Idle(pb::IdleTask { retry_after_ms: 0 }))
    }

    /// A node cancelled mid-training (an in-process agent dropped, as the soak bench and a
    /// simulation's shutdown do) stops its heartbeats with it: they used to go on for good,
    /// each holding a connection to the coordinator.
    #[tokio::test]
    async fn heartbeats_stop_with_the_work_they_keep_alive_even_when_it_is_abandoned() {
        let (opts, seen) = scripted(VecDeque::new()).await;
        let mut s = crate::session::connect(&opts, 1, &pb::SecureKeys::default())
            .await
            .unwrap();
        s.heartbeat = Duration::from_millis(50);
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let work = crate::session::with_heartbeats(&s, move || {
            let _ = wait.recv_timeout(Duration::from_secs(10));
        });
        let abandoned = tokio::time::timeout(Duration::from_millis(400), work).await;
        assert!(abandoned.is_err(), "the work finished early");
        let during = seen.lock().unwrap().heartbeats;
        assert!(during >= 3, "{during} heartbeats while working");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = seen.lock().unwrap().heartbeats;
        let _ = release.send(());
        // One may have been on its way when the work was dropped.
        assert!(
            after <= during + 1,
            "heartbeats went on after the work was abandoned: {during} then {after}"
        );
    }

    #[tokio::test]
    async fn rejoins_with_a_new_session_after_losing_the_coordinator_and_leaves_when_finished() {
        let (opts, seen) = scripted(VecDeque::from([
            idle(),
            Err(Status::unavailable("coordinator restarting")),
            idle(),
            Err(Status::unauthenticated(
                "unknown or expired session: join again",
            )),
            idle(),
        ]))
        .await;
        let report = run(opts, data()).await.unwrap();
        assert_eq!(report, AgentReport::default(), "no work was asked for");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.joins, ["site-a", "site-a", "site-a"]);
        assert_eq!(
            seen.polls,
            [
                "session-1",
                "session-1",
                "session-2",
                "session-2",
                "session-3",
                "session-3"
            ],
            "every poll after a rejoin uses the new session"
        );
        assert_eq!(
            seen.left,
            ["session-3"],
            "it leaves once, when the job is finished"
        );
    }

    #[tokio::test]
    async fn a_task_that_fails_is_retried_on_the_same_session() {
        // A training task whose model cannot be fetched fails (Unimplemented here): the loop
        // logs it, waits and polls again on the same session; it neither rejoins nor counts
        // a round.
        let train = Kind::Train(pb::TrainTask {
            job_id: "job".into(),
            round: 1,
            model: Some(
                (&cohort_model::ModelSpec::Logistic {
                    inputs: 2,
                    classes: 2,
                })
                    .into(),
            ),
            config: Some(
                (&cohort_model::TrainConfig {
                    epochs: 1,
                    batch_size: 4,
                    learning_rate: 0.1,
                    optimizer: cohort_model::Optimizer::Sgd,
                    seed: 1,
                    proximal_mu: 0.0,
                    momentum: 0.0,
                    weight_decay: 0.0,
                })
                    .into(),
            ),
            num_parameters: 6,
            model_digest: "0".repeat(64),
            deadline_in_ms: 10_000,
            model_version: 0,
            secure: None,
            pipeline_json: String::new(),
            clip_norm: None,
            clip_per_layer: false,
            noise_stddev: None,
            clip_indicator: None,
            control_digest: String::new(),
        });
        let (opts, seen) = scripted(VecDeque::from([Ok(train), idle()])).await;
        let report = run(opts, data()).await.unwrap();
        assert_eq!(report.rounds_trained, 0);
        let s = seen.lock().unwrap();
        assert_eq!(s.joins.len(), 1, "a failed task is not a lost coordinator");
        assert_eq!(s.polls.len(), 3);
    }

    #[tokio::test]
    async fn a_refused_join_ends_the_agent_and_an_unreachable_one_is_retried() {
        for code in [Code::PermissionDenied, Code::InvalidArgument] {
            let (opts, seen) = serve(Scripted {
                refuse_join: Some(code),
                ..Scripted::default()
            })
            .await;
            match run(opts, data()).await {
                Err(AgentError::Refused(s)) => assert_eq!(s.code(), code),
                other => panic!("{code:?}: {other:?}"),
            }
            assert_eq!(
                seen.lock().unwrap().joins.len(),
                1,
                "a refusal is not retried"
            );
        }
        // Unavailable while joining is retried with backoff until `reconnect_for` runs out.
        let (mut opts, seen) = serve(Scripted {
            refuse_join: Some(Code::Unavailable),
            ..Scripted::default()
        })
        .await;
        opts.reconnect_for = Duration::from_millis(800);
        assert!(run(opts, data()).await.is_err());
        assert!(seen.lock().unwrap().joins.len() >= 2, "retried");
    }

    #[tokio::test]
    async fn a_table_that_does_not_match_the_jobs_schema_leaves_the_job_naming_the_cell() {
        // The job's schema (from its round-0 task) says "age" is numeric; this site's file
        // has a word on its third line.
        let schema = cohort_model::tabular::Schema::infer(
            "age,smoker,status\n50,yes,0\n60,no,1\n",
            std::path::Path::new("job.csv"),
            &cohort_model::LabelColumn::Name("status".into()),
        )
        .unwrap();
        let spec = cohort_model::tabular::DataSpec {
            schema,
            options: Default::default(),
        };
        let task = Kind::Statistics(pb::StatisticsTask {
            job_id: "job".into(),
            attempt: 1,
            data_spec_json: serde_json::to_string(&Some(spec)).unwrap(),
            num_values: 60,
            deadline_in_ms: 10_000,
            secure: None,
        });
        let (opts, seen) = scripted(VecDeque::from([Ok(task), idle()])).await;
        let site = Arc::new(SiteCsv {
            text: "age,smoker,status\n50,yes,0\nold,no,1\n".into(),
            path: "site.csv".into(),
            test_fraction: 0.0,
            seed: 1,
        });
        match run(opts, site).await {
            Err(AgentError::Data(e)) => {
                let e = e.to_string();
                assert!(e.contains("site.csv:3"), "{e}");
                assert!(e.contains("age"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(seen.lock().unwrap().left.len(), 1, "it leaves the job");
    }
}
