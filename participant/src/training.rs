//! Training and evaluation tasks: local training on the node's own data (on a shared
//! compute pool in a simulation), the update's upload in plaintext or encrypted, and
//! federated evaluation of a new version.

use super::*;

/// Runs `f` on a pool of `compute`, or directly when there is none.
pub(crate) fn on_compute<T: Send>(
    compute: Option<&ComputeSlots>,
    f: impl FnOnce() -> T + Send,
) -> T {
    match compute {
        Some(c) => c.run(f),
        None => f(),
    }
}

/// Local training or evaluation: on a blocking thread, on this agent's compute pool if it
/// shares one, while heartbeats keep the session alive.
async fn local_step<T: Send + 'static>(
    s: &Session,
    opts: &AgentOptions,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let compute = opts.compute.clone();
    with_heartbeats(s, move || on_compute(compute.as_deref(), f)).await
}

pub(crate) fn metrics_pb(loss: f64, accuracy: f64, n: usize) -> pb::Metrics {
    (&Metrics {
        loss,
        accuracy,
        auc: None,
        num_examples: n,
    })
        .into()
}

/// The model spec a task names; a task without a valid one is refused.
pub(crate) fn task_model(model: Option<&pb::ModelSpec>) -> Result<ModelSpec, Status> {
    let m = model.ok_or_else(|| Status::invalid_argument("task without model"))?;
    ModelSpec::try_from(m).map_err(|e| Status::invalid_argument(e.to_string()))
}

pub(crate) async fn train_round(
    s: &mut Session,
    opts: &AgentOptions,
    data: &Arc<LocalData>,
    secrets: &SharedSecrets,
    controls: &mut Controls,
    t: pb::TrainTask,
) -> Result<(), Status> {
    let spec = task_model(t.model.as_ref())?;
    // Checked before spending a round's training on it.
    let secure = checked_round(opts, &t.job_id, t.round, t.secure.as_ref())?;
    if let Some(floor) = opts.min_noise_multiplier
        && let Err(why) = noise_meets(floor, &t, secure.as_ref(), spec.num_parameters())
    {
        // Nothing is sent: the round goes on without this participant.
        tracing::error!(participant = %opts.id, round = t.round, "refusing to train: {why}");
        return Ok(());
    }
    let noise = match (t.noise_stddev, &secure) {
        (Some(sd), Some(_)) if sd.is_finite() && sd >= 0.0 => Some(sd),
        (None, _) => None,
        (Some(sd), _) => {
            return Err(Status::invalid_argument(format!(
                "differential-privacy noise of {sd} asked for a round that is not securely \
                 aggregated: refusing to train for it"
            )));
        }
    };
    let cfg = TrainConfig::try_from(
        t.config
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("task without config"))?,
    )
    .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let global = fetch_model(
        s,
        &t.job_id,
        t.model_version,
        t.num_parameters,
        &t.model_digest,
        false,
    )
    .await?;
    // SCAFFOLD: the server's control variate and this node's own.
    let scaffold = if t.control_digest.is_empty() {
        None
    } else {
        let server = fetch_model(
            s,
            &t.job_id,
            t.model_version,
            t.num_parameters,
            &t.control_digest,
            true,
        )
        .await?;
        match controls.get(&t.job_id, server.len()) {
            Ok(local) => Some((server, local)),
            Err(e) => {
                // Nothing is sent: the coordinator counts this participant as a straggler.
                tracing::error!(participant = %opts.id, round = t.round, "cannot read this node's control variate: {e}");
                return Ok(());
            }
        }
    };
    let (d, dev) = (data.clone(), opts.device);
    let start = global.clone();
    let layers = spec.clone();
    let trained = local_step(s, opts, move || match scaffold {
        None => cohort_model::train(&spec, &start, &d.train, &cfg, dev).map(|(p, r)| (p, r, None)),
        Some((server, local)) => cohort_model::scaffold::train(
            &spec,
            &start,
            &d.train,
            &cfg,
            dev,
            &server,
            local.as_deref(),
        )
        .map(|c| (c.params, c.report, Some((c.control, c.control_change)))),
    })
    .await;
    let (params, report, control) = match trained {
        Ok(x) => x,
        Err(e) => {
            // Nothing is sent: the coordinator counts this participant as a straggler.
            tracing::error!(participant = %opts.id, round = t.round, "local training failed: {e}");
            return Ok(());
        }
    };
    let mut delta: Vec<f32> = params.iter().zip(&global).map(|(p, g)| p - g).collect();
    let (clip, per_layer, indicator) = (t.clip_norm, t.clip_per_layer, t.clip_indicator);
    let change = control.as_ref().map(|(_, dc)| &dc[..]);
    if cohort_model::update_to_send(&mut delta, &layers, clip, per_layer, change, indicator) {
        tracing::debug!(participant = %opts.id, round = t.round, "update clipped to L2 norm {clip:?}");
    }
    let delay = opts.faults.upload_delay;
    if !delay.is_zero() {
        tracing::info!(participant = %opts.id, round = t.round, "fault injection: delaying the upload by {delay:?}");
        tokio::time::sleep(delay).await;
    }
    let header = pb::UpdateHeader {
        nonce: nonce(),
        session_id: s.id.clone(),
        job_id: t.job_id.clone(),
        round: t.round,
        num_parameters: delta.len() as u64,
        // Under distributed DP nothing but the noised update leaves: no example count, no
        // training metrics (they would reveal what ε does not cover).
        num_examples: if noise.is_some() {
            1
        } else {
            report.num_examples as u64
        },
        train: noise.is_none().then(|| {
            metrics_pb(
                *report.epoch_loss.last().unwrap_or(&f64::NAN),
                report.last_epoch_accuracy,
                report.num_examples,
            )
        }),
        train_seconds: if noise.is_some() { 0.0 } else { report.seconds },
        secure: None,
    };
    send_values(s, opts, secrets, header, delta, secure, noise).await?;
    if let Some((c, _)) = control
        && let Err(e) = controls.set(&t.job_id, c)
    {
        tracing::error!(participant = %opts.id, round = t.round, "cannot keep this node's control variate: {e}");
    }
    tracing::info!(participant = %opts.id, round = t.round, loss = report.epoch_loss.last(), "update sent");
    Ok(())
}

/// Whether the distributed noise `t` asks for gives a noise multiplier of at least `floor`:
/// the noise's standard deviation times √T_min (the fewest participants a decryption
/// includes) over the round's sensitivity. The noise is absent, or the round is not secure,
/// or it has no clip norm: refused.
fn noise_meets(
    floor: f64,
    t: &pb::TrainTask,
    secure: Option<&aggregation::RoundInfo>,
    num_parameters: usize,
) -> Result<(), String> {
    let (Some(sd), Some(clip), Some(info)) = (t.noise_stddev, t.clip_norm, secure) else {
        return Err(format!(
            "this participant requires distributed differential privacy (noise multiplier at \
             least {floor}), and the task asks for no noise"
        ));
    };
    let d = num_parameters + usize::from(t.clip_indicator.is_some());
    let s = cohort_crypto::dp::round_sensitivity(clip, d, &info.codec, t.clip_indicator);
    let z = sd * (info.t_min as f64).sqrt() / s;
    // The coordinator's own arithmetic gives exactly the configured multiplier; allow for
    // its rounding only.
    if z < floor * (1.0 - 1e-9) {
        return Err(format!(
            "the task's noise amounts to a noise multiplier of {z:.4} (σ {sd} over T_min {} \
             at clip norm {clip}), below this participant's floor {floor}",
            info.t_min
        ));
    }
    Ok(())
}

/// Uploads `values` under `header`: in plaintext, or encrypted for `secure` with the weight
/// its round gives `header.num_examples`.
async fn send_values(
    s: &mut Session,
    opts: &AgentOptions,
    secrets: &SharedSecrets,
    mut header: pb::UpdateHeader,
    values: Vec<f32>,
    secure: Option<aggregation::RoundInfo>,
    noise_stddev: Option<f64>,
) -> Result<(), Status> {
    let round = header.round;
    let Some(info) = secure else {
        let chunks = cohort_protocol::update_chunks(header, &values);
        s.client
            .submit_update(futures::stream::iter(chunks))
            .await?;
        return Ok(());
    };
    let (me, sec, n) = (opts.id.clone(), secrets.clone(), header.num_examples);
    let protected = with_heartbeats(s, move || {
        let mut guard = lock(&sec);
        let x = &mut *guard;
        x.round_seeds
            .insert((info.job.clone(), info.round, info.attempt), info.seed);
        // Distributed differential privacy: discrete Gaussian noise from the operating
        // system's generator, added to the encoded values before encryption (none: the
        // encoding alone).
        let sd = noise_stddev.unwrap_or(0.0);
        let messages =
            cohort_crypto::dp::noised_messages(&info.codec, &values, sd, &mut rand::rng());
        let threads = cohort_crypto::glwe::default_threads();
        aggregation::protect_messages(
            &info,
            &me,
            &x.sign,
            &mut x.seeds,
            &messages,
            n,
            &mut x.rng,
            threads,
        )
    })
    .await
    .map_err(|e| {
        tracing::error!(participant = %opts.id, round, "refusing to encrypt: {e}");
        Status::aborted(format!("refusing to encrypt: {e}"))
    })?;
    header.secure = Some(pb::SecureUpload {
        weight: protected.weight,
        pieces: protected
            .pieces
            .iter()
            .map(cohort_protocol::secure::sealed_pb)
            .collect(),
        signature: protected.signature.to_vec(),
        num_bodies: protected.bodies.len() as u64,
    });
    let bodies: Vec<cohort_protocol::Body> = protected
        .bodies
        .iter()
        .map(|&b| cohort_protocol::Body(b))
        .collect();
    let chunks = cohort_protocol::update_chunks(header, &bodies);
    s.client
        .submit_update(futures::stream::iter(chunks))
        .await?;
    tracing::info!(participant = %opts.id, round, weight = protected.weight, "encrypted update sent");
    Ok(())
}

/// The task's secure round, checked: key pieces are sealed only to keys their owners'
/// certificates vouch for.
fn checked_round(
    opts: &AgentOptions,
    job: &str,
    round: u64,
    secure: Option<&pb::SecureRound>,
) -> Result<Option<aggregation::RoundInfo>, Status> {
    let info = secure
        .map(|r| round_from_pb(job, round, r))
        .transpose()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if let (Some(info), Some(tls)) = (&info, &opts.tls)
        && let Err(e) = info.check_bindings(&tls.ca_pem, std::time::SystemTime::now())
    {
        tracing::error!(participant = %opts.id, round, "refusing to take part: {e}");
        return Err(Status::aborted(format!("refusing to take part: {e}")));
    }
    Ok(info)
}

/// Round 0 of a job with tables: this site's training table's statistics, split into the
/// codec's digits, sent with weight 1 (encrypted in secure jobs). Only the federation's sums
/// are ever decrypted.
pub(crate) async fn statistics_round(
    s: &mut Session,
    opts: &AgentOptions,
    tables: &SiteTables,
    secrets: &SharedSecrets,
    t: pb::StatisticsTask,
) -> Result<(), Status> {
    let secure = checked_round(opts, &t.job_id, 0, t.secure.as_ref())?;
    let codec = secure.as_ref().map(|i| i.codec).unwrap_or_default();
    let stats = cohort_model::tabular::TableStats::of(&tables.train);
    let values = cohort_crypto::DigitCodec::for_statistics(&codec)
        .and_then(|d| d.encode(&stats.to_values(), &codec))
        .map_err(|e| Status::aborted(format!("this site's statistics: {e}")))?;
    if values.len() as u64 != t.num_values {
        return Err(Status::aborted(format!(
            "this site's statistics make {} values, the coordinator expects {}",
            values.len(),
            t.num_values
        )));
    }
    let header = pb::UpdateHeader {
        nonce: nonce(),
        session_id: s.id.clone(),
        job_id: t.job_id.clone(),
        round: 0,
        num_parameters: values.len() as u64,
        num_examples: 1,
        train: None,
        train_seconds: 0.0,
        secure: None,
    };
    send_values(s, opts, secrets, header, values, secure, None).await?;
    tracing::info!(participant = %opts.id, rows = stats.rows, "statistics sent (round 0)");
    Ok(())
}

pub(crate) async fn evaluate_round(
    s: &mut Session,
    opts: &AgentOptions,
    data: &Arc<LocalData>,
    e: pb::EvaluateTask,
) -> Result<(), Status> {
    let spec = task_model(e.model.as_ref())?;
    let params = fetch_model(
        s,
        &e.job_id,
        e.model_version,
        e.num_parameters,
        &e.model_digest,
        false,
    )
    .await?;
    let (d, dev) = (data.clone(), opts.device);
    let m = local_step(s, opts, move || {
        cohort_model::evaluate(&spec, &params, &d.test, dev)
    })
    .await;
    let m = m.map_err(|err| Status::internal(err.to_string()))?;
    s.client
        .submit_evaluation(pb::SubmitEvaluationRequest {
            nonce: nonce(),
            session_id: s.id.clone(),
            job_id: e.job_id,
            round: e.round,
            metrics: Some((&m).into()),
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_model::Sharing;

    #[test]
    fn a_task_without_a_valid_model_is_refused_as_invalid() {
        let e = task_model(None).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("without model"));
        let bad = ModelSpec::Logistic {
            inputs: 0,
            classes: 2,
        };
        let e = task_model(Some(&(&bad).into())).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let good = ModelSpec::Logistic {
            inputs: 3,
            classes: 2,
        };
        assert_eq!(task_model(Some(&(&good).into())).unwrap(), good);
    }

    /// The coordinator's job configuration asks for z = 1.5; a participant with floor 1.5
    /// trains, one with floor 2 refuses, and so does any floor for a task without noise.
    #[test]
    fn a_participant_refuses_tasks_below_its_noise_floor() {
        let spec = ModelSpec::Logistic {
            inputs: 3,
            classes: 2,
        };
        let codec = cohort_crypto::Codec::default();
        let sd = 1.5 * cohort_crypto::dp::round_sensitivity(1.0, 8, &codec, None) / 2f64.sqrt();
        let info = aggregation::RoundInfo {
            job: "j".into(),
            round: 1,
            attempt: 1,
            seed: cohort_crypto::RoundSeed(0),
            committee: Vec::new(),
            threshold: 1,
            t_min: 2,
            codec,
            params: Default::default(),
            weight_unit: u64::MAX,
        };
        let task = pb::TrainTask {
            clip_norm: Some(1.0),
            noise_stddev: Some(sd),
            ..Default::default()
        };
        let n = spec.num_parameters();
        assert!(noise_meets(1.5, &task, Some(&info), n).is_ok());
        let e = noise_meets(2.0, &task, Some(&info), n).unwrap_err();
        assert!(
            e.contains("noise multiplier of 1.5000") && e.contains("floor 2"),
            "{e}"
        );
        let none = pb::TrainTask {
            noise_stddev: None,
            ..task.clone()
        };
        assert!(
            noise_meets(0.5, &none, Some(&info), n)
                .unwrap_err()
                .contains("asks for no noise")
        );
        assert!(
            noise_meets(0.5, &task, None, n).is_err(),
            "a plaintext round"
        );
    }

    #[test]
    fn local_work_runs_on_a_shared_pool_when_given_one() {
        let slots = ComputeSlots::new(Sharing::PerCore, 2).unwrap();
        assert_eq!(on_compute(Some(&slots), rayon::current_num_threads), 1);
        let all = ComputeSlots::new(Sharing::OneAtATime, 3).unwrap();
        assert_eq!(on_compute(Some(&all), rayon::current_num_threads), 3);
        assert_eq!(on_compute(None, || 5), 5);
    }

    #[test]
    fn training_metrics_travel_without_an_auc() {
        let m = metrics_pb(0.25, 0.75, 40);
        let back = Metrics::try_from(&m).unwrap();
        assert_eq!(
            (back.loss, back.accuracy, back.num_examples),
            (0.25, 0.75, 40)
        );
        assert_eq!(back.auc, None);
    }
}
