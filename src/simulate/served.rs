//! The simulation's served model: its throw-away federation PKI, and the final version
//! answering every participant's held-out rows through the Inference service over mutual TLS.

use std::time::{Duration, Instant};

use anyhow::Context;

use cohort_model::ComputeDevice;
use cohort_storage::ModelStore;

use super::{SIM_APP, participant_id};

/// The final version served by `cohort serve`'s code over mutual TLS, asked for every
/// participant's held-out rows (prepared as that site prepares its own data), in batches as
/// large as a request may carry. Returns the rows answered, their accuracy and the slowest batch's seconds.
pub(super) async fn ask_served_model(
    store: ModelStore,
    to: cohort_storage::ModelRef,
    pki: &SimPki,
    locals: &[std::sync::Arc<cohort_participant::LocalData>],
    device: ComputeDevice,
) -> anyhow::Result<(usize, f64, f64)> {
    use cohort_protocol::pb::{self, inference_client::InferenceClient};
    use cohort_serving::{DeviceChoice, Inference, InferenceSettings};
    let settings = InferenceSettings {
        device: match device {
            ComputeDevice::Cpu => DeviceChoice::Cpu,
            ComputeDevice::Wgpu => DeviceChoice::Wgpu,
        },
        queue: 4096,
        ..InferenceSettings::default()
    };
    let inference = Inference::new(store, settings, cohort_serving::InferenceMetrics::new())
        .map_err(anyhow::Error::msg)?;
    let i = inference.clone();
    tokio::task::spawn_blocking(move || i.switch(&to))
        .await?
        .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cohort_serving::serve_alone(
        inference,
        listener,
        Some(pki.coordinator.clone()),
        Duration::from_secs(3600),
        async {
            let _ = stop_rx.await;
        },
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(pki.client(SIM_APP)?.client_config())?
        .connect()
        .await?;
    let mut client = InferenceClient::new(channel)
        .max_decoding_message_size(cohort_protocol::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(cohort_protocol::MAX_MESSAGE_BYTES);
    let (mut rows, mut correct, mut slowest) = (0, 0, 0.0f64);
    // Every participant's held-out rows, in batches across participants (10,000s of
    // participants hold a few rows each).
    let features = locals.first().map_or(1, |l| l.test.shape.len());
    let per_request = cohort_protocol::examples_per_request(features).min(1024);
    let all = locals
        .iter()
        .flat_map(|l| (0..l.test.len()).map(move |r| (&l.test, r)));
    let mut batch: Vec<(&cohort_model::Dataset, usize)> = Vec::with_capacity(per_request);
    let mut all = all.peekable();
    while all.peek().is_some() {
        batch.clear();
        batch.extend(all.by_ref().take(per_request));
        let started = Instant::now();
        let answer = client
            .predict_batch(pb::PredictBatchRequest {
                examples: batch
                    .iter()
                    .map(|&(t, r)| pb::Example {
                        raw: Default::default(),
                        features: t.row(r).to_vec(),
                        label: Some(t.labels[r]),
                    })
                    .collect(),
            })
            .await?
            .into_inner();
        slowest = slowest.max(started.elapsed().as_secs_f64());
        rows += batch.len();
        correct += batch
            .iter()
            .zip(&answer.predictions)
            .filter(|((t, r), p)| p.class == t.labels[*r])
            .count();
    }
    let _ = stop_tx.send(());
    server.await?.map_err(anyhow::Error::msg)?;
    Ok((rows, correct as f64 / rows.max(1) as f64, slowest))
}

/// The simulation's throw-away federation PKI: a CA, the coordinator's certificate and one
/// participant certificate per agent, in a temporary directory removed at the end.
pub(super) struct SimPki {
    pub(super) dir: tempfile::TempDir,
    pub(super) coordinator: cohort_protocol::tls::TlsFiles,
}

impl SimPki {
    pub(super) fn new(participants: usize, custodians: &[String]) -> anyhow::Result<Self> {
        use cohort_crypto::pki::{Authority, Role, Validity};
        let dir = tempfile::Builder::new()
            .prefix("cohort-sim-pki")
            .tempdir()?;
        let v = Validity::days(std::time::SystemTime::now(), 2);
        let ca = Authority::generate("cohort simulation (throw-away)", &v)?;
        let write = |name: &str, text: &str| -> anyhow::Result<std::path::PathBuf> {
            let p = dir.path().join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        let ca_path = write("ca.pem", ca.cert_pem())?;
        let c = ca.issue(
            "coordinator",
            Role::Coordinator,
            &["coordinator".to_string()],
            &["127.0.0.1".parse().expect("an IP address")],
            &v,
        )?;
        let coordinator = cohort_protocol::tls::TlsFiles {
            ca: ca_path,
            cert: write("coordinator.pem", &c.cert_pem)?,
            key: write("coordinator.key", &c.key_pem)?,
            crl: Some(write(
                "crl.pem",
                &ca.crl(&[], 1, 2, std::time::SystemTime::now())?,
            )?),
            server_name: None,
            key_passphrase_env: None,
        };
        let ids = (0..participants)
            .map(participant_id)
            .chain(custodians.iter().cloned());
        for id in ids {
            let p = ca.issue(&id, Role::Participant, &[], &[], &v)?;
            write(&format!("{id}.pem"), &p.cert_pem)?;
            write(&format!("{id}.key"), &p.key_pem)?;
        }
        // Simulation workers (`--workers`) share one certificate, as the pods of a
        // Kubernetes Indexed Job share a Secret.
        let worker = ca.issue("worker", Role::Participant, &[], &[], &v)?;
        write("worker.pem", &worker.cert_pem)?;
        write("worker.key", &worker.key_pem)?;
        let app = ca.issue(SIM_APP, Role::Inference, &[], &[], &v)?;
        write(&format!("{SIM_APP}.pem"), &app.cert_pem)?;
        write(&format!("{SIM_APP}.key"), &app.key_pem)?;
        Ok(SimPki { dir, coordinator })
    }

    pub(super) fn client(&self, id: &str) -> anyhow::Result<cohort_protocol::tls::NodeTls> {
        let files = cohort_protocol::tls::TlsFiles {
            ca: self.coordinator.ca.clone(),
            cert: self.dir.path().join(format!("{id}.pem")),
            key: self.dir.path().join(format!("{id}.key")),
            crl: None,
            server_name: Some("coordinator".into()),
            key_passphrase_env: None,
        };
        Ok(files.node()?)
    }
}
