//! `cohort serve`: the Inference service alone, with health and reflection.

use std::time::Duration;

use cohort_protocol::pb;

use crate::api::InferenceApi;
use crate::deployment::Inference;
use crate::error::ServingError;

/// Serves the Inference service alone (`cohort serve`) on `listener`, with grpc.health.v1
/// (SERVING once a version is loaded) and server reflection: with mutual TLS when `tls` is
/// given (inference and admin certificates only; the CRL re-read every `crl_poll`).
pub async fn serve_alone(
    inference: Inference,
    listener: tokio::net::TcpListener,
    tls: Option<cohort_protocol::tls::TlsFiles>,
    crl_poll: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServingError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<pb::inference_server::InferenceServer<InferenceApi>>()
        .await;
    let watch = inference.clone();
    let health_task = tokio::spawn(async move {
        loop {
            if watch.serving().is_some() {
                health
                    .set_serving::<pb::inference_server::InferenceServer<InferenceApi>>()
                    .await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (v1, v1alpha) = cohort_protocol::server::reflection();
    let router = tonic::transport::Server::builder()
        .add_service(inference.service())
        .add_service(health_service)
        .add_service(v1)
        .add_service(v1alpha);
    let served = match tls {
        Some(tls) => {
            let (incoming, tasks) = cohort_protocol::server::incoming(listener, tls, crl_poll)?;
            inference.require_certificates();
            let r = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .map_err(ServingError::from);
            for t in tasks {
                t.abort();
            }
            r
        }
        None => router
            .serve_with_incoming_shutdown(cohort_protocol::server::nodelay(listener), shutdown)
            .await
            .map_err(ServingError::from),
    };
    health_task.abort();
    served
}
