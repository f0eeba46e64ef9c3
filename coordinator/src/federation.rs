//! The `cohort.v1.Federation` RPCs: join, long-polled tasks, chunked model downloads, update
//! and share uploads, evaluations, heartbeats and leaving. Each call converts its messages to
//! domain types, passes the edge's checks ([`crate::edge`]), feeds the state machine through
//! the driver and returns.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_model::Metrics;
use cohort_protocol::pb::federation_server::Federation;
use cohort_protocol::pb::{self, task::Kind};
use cohort_protocol::{ParamAssembler, ProtocolError};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::driver::{Coordinator, EncodedModel};
use crate::edge::{first_header, protocol_status, receive_words, refuse, rejection_status};
use crate::round::{PartyKeys, SecureUpdate, ShareAnswer, SignedShare, Task, Update};
use cohort_crypto::{MemberPublic, VerifyKey};
use cohort_protocol::WordAssembler;
use cohort_protocol::secure::{bytes32, bytes64, record_pb, round_pb, sealed_from_pb, sealed_pb};

/// Longest a PollTask call is held open.
const MAX_POLL_WAIT: Duration = Duration::from_secs(30);

impl Coordinator {
    /// The download form of model `version`, encoded on first use and then shared by every
    /// task and fetch of that version.
    fn encoded(&self, job: &str, version: u64, params: &[f32]) -> Arc<EncodedModel> {
        Self::encode_once(&self.shared.encoded, job, version, params)
    }

    /// SCAFFOLD: the server's control variate of model `version`, encoded like the model.
    fn encoded_control(&self, job: &str, version: u64, control: &[f32]) -> Arc<EncodedModel> {
        Self::encode_once(&self.shared.encoded_control, job, version, control)
    }

    fn encode_once(
        cache: &std::sync::Mutex<Option<Arc<EncodedModel>>>,
        job: &str,
        version: u64,
        params: &[f32],
    ) -> Arc<EncodedModel> {
        let mut cache = cache.lock().expect("encoded-model lock");
        match &*cache {
            Some(e) if e.version == version && e.job == job => e.clone(),
            _ => {
                let chunks = cohort_protocol::model_chunks(params);
                let digest = chunks.last().map(|c| c.digest.clone()).unwrap_or_default();
                let e = Arc::new(EncodedModel {
                    job: job.to_string(),
                    version,
                    digest,
                    chunks,
                });
                *cache = Some(e.clone());
                e
            }
        }
    }

    fn task_message(&self, id: &str) -> Result<pb::Task, Status> {
        let (task, version, params, cfg, update_len, pipeline_json) = {
            let o = self.lock()?;
            let (v, p) = o.global();
            (
                o.task_for(id),
                v,
                p,
                o.config().clone(),
                o.current_update_len(),
                // Jobs with tables: the pipeline every site prepares its rows with.
                o.statistics().map(|s| s.pipeline_json.clone()),
            )
        };
        let pipeline_json = pipeline_json.as_deref().unwrap_or_default().to_string();
        let now = Instant::now();
        let ms = |d: Instant| d.saturating_duration_since(now).as_millis() as u64;
        let kind = match task {
            Task::Train {
                round,
                model_version,
                config,
                deadline,
                secure,
                clip_norm,
                clip_per_layer,
                noise_stddev,
                clip_indicator,
                control,
            } => Kind::Train(pb::TrainTask {
                control_digest: control
                    .map(|c| {
                        self.encoded_control(&cfg.job_id, version, &c)
                            .digest
                            .clone()
                    })
                    .unwrap_or_default(),
                clip_norm,
                clip_per_layer,
                noise_stddev,
                clip_indicator,
                secure: secure.as_deref().map(round_pb),
                job_id: cfg.job_id.clone(),
                round,
                model: Some((&cfg.model).into()),
                config: Some((&config).into()),
                num_parameters: params.len() as u64,
                model_digest: self.encoded(&cfg.job_id, version, &params).digest.clone(),
                deadline_in_ms: ms(deadline),
                model_version,
                pipeline_json: pipeline_json.clone(),
            }),
            Task::Evaluate {
                round,
                model_version,
                deadline,
            } => Kind::Evaluate(pb::EvaluateTask {
                job_id: cfg.job_id.clone(),
                round,
                model: Some((&cfg.model).into()),
                num_parameters: params.len() as u64,
                model_digest: self.encoded(&cfg.job_id, version, &params).digest.clone(),
                deadline_in_ms: ms(deadline),
                model_version,
                pipeline_json,
            }),
            Task::Statistics {
                attempt,
                deadline,
                secure,
            } => Kind::Statistics(pb::StatisticsTask {
                job_id: cfg.job_id.clone(),
                attempt,
                data_spec_json: serde_json::to_string(&cfg.data)
                    .map_err(|e| Status::internal(e.to_string()))?,
                num_values: update_len as u64,
                deadline_in_ms: ms(deadline),
                secure: secure.as_deref().map(round_pb),
            }),
            Task::Decrypt(d) => Kind::Decrypt(pb::DecryptTask {
                job_id: cfg.job_id.clone(),
                round: d.info.round,
                secure: Some(round_pb(&d.info)),
                manifest_digest: d.manifest_digest.to_vec(),
                manifest_participants: d.manifest_participants as u32,
                manifest_signature: d.manifest_signature.to_vec(),
                coordinator_key: d.coordinator_key.0.to_vec(),
                pieces: d.pieces.iter().map(|&k| k as u32).collect(),
                // The model's parameters, or round 0's statistics digits.
                num_parameters: update_len as u64,
                deadline_in_ms: ms(d.deadline),
                request: d.request,
            }),
            Task::Idle => Kind::Idle(pb::IdleTask { retry_after_ms: 0 }),
            Task::Finished => Kind::Finished(pb::FinishedTask {
                reason: if self.lock()?.is_cancelled() {
                    format!("job {} was cancelled by an operator", cfg.job_id)
                } else {
                    format!("job {} finished", cfg.job_id)
                },
            }),
        };
        Ok(pb::Task { kind: Some(kind) })
    }
}

type ModelStream = Pin<Box<dyn Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for Coordinator {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let cert = self.caller(&req)?;
        let leaf: Option<Vec<u8>> = req.peer_certs().and_then(|c| c.first().map(|d| d.to_vec()));
        if let Some(l) = &leaf
            && let Ok((id, role, not_after)) = cohort_crypto::pki::identity_and_expiry(l)
        {
            self.metrics()
                .certificate(&id, &role.to_string(), not_after);
        }
        let r = req.into_inner();
        if let Some(c) = &cert
            && *c != r.participant_id
        {
            return Err(refuse(
                c,
                Status::permission_denied(format!(
                    "the certificate is {c:?}'s; it cannot join as {:?}",
                    r.participant_id
                )),
            ));
        }
        let session = format!("{:032x}", rand::random::<u128>());
        let id = r.participant_id.clone();
        let keys = r
            .keys
            .as_ref()
            .map(|k| {
                Ok::<_, ProtocolError>(PartyKeys {
                    seal: MemberPublic(bytes32(&k.seal_key, "keys.seal_key")?),
                    verify: VerifyKey(bytes32(&k.verify_key, "keys.verify_key")?),
                    // The certificate this call came with, and the participant's signature
                    // with its key over both keys: relayed so that others can check them.
                    binding: leaf.as_ref().filter(|_| !k.binding.is_empty()).map(|cert| {
                        cohort_crypto::aggregation::KeyBinding {
                            certificate: cert.clone(),
                            signature: k.binding.clone(),
                        }
                    }),
                })
            })
            .transpose()
            .map_err(|e| refuse(&id, protocol_status(&e)))?;
        self.admit(&id, r.num_examples)?;
        self.with(true, |o| {
            o.handle_join_with_keys(
                &r.participant_id,
                session.clone(),
                r.num_examples,
                keys,
                Instant::now(),
            )
        })?
        .map_err(|e| refuse(&id, rejection_status(&e)))?;
        let o = self.lock()?;
        Ok(Response::new(pb::JoinResponse {
            session_id: session,
            job_id: o.config().job_id.clone(),
            heartbeat_interval_ms: (o.config().liveness_timeout / 3).as_millis() as u32,
        }))
    }

    async fn poll_task(
        &self,
        req: Request<pb::PollTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let cert = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.session_of(cert, &r.session_id)?;
        let wait = Duration::from_millis(r.wait_ms as u64).min(MAX_POLL_WAIT);
        let until = tokio::time::Instant::now() + wait;
        let mut changed = self.shared.changed.subscribe();
        loop {
            changed.borrow_and_update();
            self.with(false, |o| o.handle_heartbeat(&id, Instant::now()))?
                .map_err(|e| refuse(&id, rejection_status(&e)))?;
            let task = self.task_message(&id)?;
            if !matches!(task.kind, Some(Kind::Idle(_))) {
                return Ok(Response::new(task));
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return Ok(Response::new(task)) },
                _ = tokio::time::sleep_until(until) => return Ok(Response::new(task)),
            }
        }
    }

    type FetchModelStream = ModelStream;

    async fn fetch_model(
        &self,
        req: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let cert = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.session_of(cert, &r.session_id)?;
        self.check_job(&id, &r.job_id)?;
        let (job, (version, params), control) = {
            let o = self.lock()?;
            (o.config().job_id.clone(), o.global(), o.control_variate())
        };
        if r.version != version {
            return Err(refuse(
                &id,
                Status::failed_precondition(format!(
                    "model version {} is not the current global model (version {version})",
                    r.version
                )),
            ));
        }
        let chunks = match (r.control_variate, control) {
            (false, _) => self.encoded(&job, version, &params).chunks.clone(),
            (true, Some(c)) => self.encoded_control(&job, version, &c).chunks.clone(),
            (true, None) => {
                return Err(refuse(
                    &id,
                    Status::failed_precondition(format!(
                        "job {job} has no control variates (its strategy is not SCAFFOLD)"
                    )),
                ));
            }
        };
        Ok(Response::new(Box::pin(futures::stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn submit_update(
        &self,
        req: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        let cert = self.caller(&req)?;
        let mut stream = req.into_inner();
        let header = first_header(&mut stream).await?;
        let id = self.session_of(cert, &header.session_id)?;
        self.check_job(&id, &header.job_id)?;
        self.check_nonce(&id, &header.nonce)?;
        if let Some(sec) = header.secure.as_ref() {
            self.lock()?
                .check_secure_update(&id, header.round, sec.num_bodies as usize)
                .map_err(|e| refuse(&id, rejection_status(&e)))?;
        } else {
            self.lock()?
                .check_update(&id, header.round, header.num_parameters as usize)
                .map_err(|e| refuse(&id, rejection_status(&e)))?;
        }
        let train = header
            .train
            .as_ref()
            .map(Metrics::try_from)
            .transpose()
            .map_err(|e| refuse(&id, protocol_status(&e)))?;
        // One model-sized buffer per upload in flight, at most UPLOAD_SLOTS of them.
        let _slot = self.upload_slot().await?;
        if let Some(sec) = header.secure {
            let pieces = sec
                .pieces
                .iter()
                .map(sealed_from_pb)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| refuse(&id, protocol_status(&e)))?;
            let signature = bytes64(&sec.signature, "secure.signature")
                .map_err(|e| refuse(&id, protocol_status(&e)))?;
            let asm = cohort_protocol::BodyAssembler::new(sec.num_bodies);
            let (bodies, bodies_sha256) = receive_words(&mut stream, asm, &id).await?;
            let update = SecureUpdate {
                round: header.round,
                weight: sec.weight,
                bodies: bodies.into_iter().map(|b| b.0).collect(),
                bodies_sha256,
                pieces,
                signature,
                train,
            };
            self.shared
                .metrics
                .received("update", update.bodies.len() as u64 * 6);
            let t = Instant::now();
            let done = self.with(true, |o| {
                o.handle_secure_update(&id, update, Instant::now())
            })?;
            self.shared
                .metrics
                .aggregation("update", t.elapsed().as_secs_f64());
            done.map_err(|e| refuse(&id, rejection_status(&e)))?;
        } else {
            let asm = ParamAssembler::new(header.num_parameters);
            let (delta, _) = receive_words(&mut stream, asm, &id).await?;
            let update = Update {
                round: header.round,
                delta,
                num_examples: header.num_examples,
                train,
            };
            self.shared
                .metrics
                .received("update", update.delta.len() as u64 * 4);
            let t = Instant::now();
            let done = self.with(true, |o| o.handle_update(&id, update, Instant::now()))?;
            self.shared
                .metrics
                .aggregation("update", t.elapsed().as_secs_f64());
            done.map_err(|e| refuse(&id, rejection_status(&e)))?;
        }
        Ok(Response::new(pb::SubmitUpdateResponse {
            round: header.round,
        }))
    }

    type FetchDecryptionInputStream =
        Pin<Box<dyn Stream<Item = Result<pb::DecryptionInput, Status>> + Send>>;

    async fn fetch_decryption_input(
        &self,
        req: Request<pb::FetchDecryptionInputRequest>,
    ) -> Result<Response<Self::FetchDecryptionInputStream>, Status> {
        use pb::decryption_input::Kind as In;
        let cert = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.session_of(cert, &r.session_id)?;
        self.check_job(&id, &r.job_id)?;
        let (records, pieces) = self
            .lock()?
            .decryption_input(&id, r.round, r.attempt)
            .map_err(|e| refuse(&id, rejection_status(&e)))?;
        let items = records
            .into_iter()
            .map(|(rec, keys)| In::Upload(record_pb(&rec, &keys)))
            .chain(pieces.into_iter().map(|(sender, p)| {
                In::Piece(pb::PieceFrom {
                    sender,
                    piece: Some(sealed_pb(&p)),
                })
            }))
            .map(|kind| Ok(pb::DecryptionInput { kind: Some(kind) }));
        Ok(Response::new(Box::pin(futures::stream::iter(
            items.collect::<Vec<_>>(),
        ))))
    }

    async fn submit_share(
        &self,
        req: Request<Streaming<pb::ShareChunk>>,
    ) -> Result<Response<pb::SubmitShareResponse>, Status> {
        let cert = self.caller(&req)?;
        let mut stream = req.into_inner();
        let header = first_header(&mut stream).await?;
        let id = self.session_of(cert, &header.session_id)?;
        self.check_job(&id, &header.job_id)?;
        self.check_nonce(&id, &header.nonce)?;
        let share = if header.refused.is_empty() {
            let expected = self.lock()?.bodies_len().unwrap_or(0) as u64;
            if header.num_values != expected {
                return Err(refuse(
                    &id,
                    Status::invalid_argument(format!(
                        "share has {} values, the round's ciphertexts have {expected}",
                        header.num_values
                    )),
                ));
            }
            let signature = bytes64(&header.signature, "share signature")
                .map_err(|e| refuse(&id, protocol_status(&e)))?;
            let _slot = self.upload_slot().await?;
            let (values, sha256) =
                receive_words(&mut stream, WordAssembler::new(header.num_values), &id).await?;
            Ok(SignedShare {
                values,
                sha256,
                signature,
            })
        } else {
            Err(header.refused.clone())
        };
        let answer = ShareAnswer {
            round: header.round,
            attempt: header.attempt,
            request: header.request,
            pieces: header.pieces.iter().map(|&k| k as usize).collect(),
            share,
        };
        if let Ok(sh) = &answer.share {
            self.shared
                .metrics
                .received("share", sh.values.len() as u64 * 8);
        }
        let t = Instant::now();
        let done = self.with(true, |o| o.handle_share(&id, answer, Instant::now()))?;
        self.shared
            .metrics
            .aggregation("share", t.elapsed().as_secs_f64());
        done.map_err(|e| refuse(&id, rejection_status(&e)))?;
        Ok(Response::new(pb::SubmitShareResponse {}))
    }

    async fn submit_evaluation(
        &self,
        req: Request<pb::SubmitEvaluationRequest>,
    ) -> Result<Response<pb::SubmitEvaluationResponse>, Status> {
        let cert = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.session_of(cert, &r.session_id)?;
        self.check_job(&id, &r.job_id)?;
        self.check_nonce(&id, &r.nonce)?;
        let metrics = r
            .metrics
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("metrics missing"))
            .and_then(|m| Metrics::try_from(m).map_err(|e| protocol_status(&e)))
            .map_err(|s| refuse(&id, s))?;
        self.with(true, |o| {
            o.handle_evaluation(&id, r.round, metrics, Instant::now())
        })?
        .map_err(|e| refuse(&id, rejection_status(&e)))?;
        Ok(Response::new(pb::SubmitEvaluationResponse {}))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let cert = self.caller(&req)?;
        let id = self.session_of(cert, &req.into_inner().session_id)?;
        self.with(false, |o| o.handle_heartbeat(&id, Instant::now()))?
            .map_err(|e| refuse(&id, rejection_status(&e)))?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn leave(
        &self,
        req: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let cert = self.caller(&req)?;
        let id = self.session_of(cert, &req.into_inner().session_id)?;
        self.with(true, |o| o.handle_leave(&id, Instant::now()))?
            .map_err(|e| refuse(&id, rejection_status(&e)))?;
        Ok(Response::new(pb::LeaveResponse {}))
    }
}
