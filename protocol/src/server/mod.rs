//! What every cohort gRPC server puts between the network and its services (feature
//! `server`): the mutual-TLS [`listener`] with a live CRL, the caller's identity from its
//! certificate ([`certificate_identity`]), per-caller token buckets ([`RateLimiter`]), gRPC
//! server [`reflection`], and the Prometheus `/metrics` and `/ready` endpoint
//! ([`serve_metrics`]). The coordinator and the inference server (`cohort serve`) share them.

pub mod listener;

use std::sync::Mutex;
use std::time::Instant;

use cohort_crypto::pki::Role;
use tonic::{Request, Status};

pub use listener::{Incoming, incoming, nodelay};

/// gRPC server reflection, v1 and v1alpha, over every `cohort.v1` service and
/// `grpc.health.v1`, so grpcurl, grpcui and generated clients work without the .proto files.
pub fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let with_sets = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = with_sets(tonic_reflection::server::Builder::configure())
        .build_v1()
        .expect("the descriptor set built with the protocol is valid");
    let v1alpha = with_sets(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .expect("the descriptor set built with the protocol is valid");
    (v1, v1alpha)
}

/// The identity in the caller's client certificate, if its role is one of `allowed`;
/// otherwise `PermissionDenied` naming the role and what `service` is for
/// (`Unauthenticated` without a certificate). Every refusal is logged with the identity.
pub fn certificate_identity<T>(
    req: &Request<T>,
    allowed: &[Role],
    service: &str,
) -> Result<String, Status> {
    let leaf = req
        .peer_certs()
        .and_then(|certs| certs.first().cloned())
        .ok_or_else(|| {
            tracing::warn!("refused a call without a client certificate");
            Status::unauthenticated("a client certificate is required")
        })?;
    let (id, role, not_after) = cohort_crypto::pki::identity_and_expiry(&leaf)
        .map_err(|e| Status::permission_denied(e.to_string()))?;
    // The TLS handshake checked the certificate's validity when the connection opened; a
    // connection outlives it, so every call checks that it has not expired since.
    if let Some(at) = cohort_crypto::pki::expired_at(not_after, crate::tls::unix_now()) {
        tracing::warn!(identity = %id, %role, expired = %at, "refused: certificate expired");
        return Err(Status::permission_denied(format!(
            "the certificate of {id:?} expired at {at}: ask the federation's operator for a \
             new one"
        )));
    }
    if !allowed.contains(&role) {
        tracing::warn!(identity = %id, %role, "refused: {service}");
        return Err(Status::permission_denied(format!(
            "{id:?} holds a {role} certificate; {service}"
        )));
    }
    Ok(id)
}

/// Token buckets per caller: `per_second` tokens sustained, bursts of `burst`.
pub struct RateLimiter {
    rate: Mutex<(f64, f64)>,
    buckets: Mutex<std::collections::HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: f64) -> Self {
        RateLimiter {
            rate: Mutex::new((per_second, burst)),
            buckets: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Changes the rate; buckets keep their tokens (capped at the new burst on next use).
    pub fn set_rate(&self, per_second: f64, burst: f64) {
        *self.rate.lock().expect("limiter lock") = (per_second, burst);
    }

    /// Whether `key` may make one request now (and spends a token if so).
    pub fn allow(&self, key: &str, now: Instant) -> bool {
        self.allow_n(key, now, 1.0)
    }

    /// Whether `key` may spend `cost` tokens now (and spends them if so).
    pub fn allow_n(&self, key: &str, now: Instant, cost: f64) -> bool {
        let (rate, burst) = *self.rate.lock().expect("limiter lock");
        let mut b = self.buckets.lock().expect("limiter lock");
        if b.len() > 100_000 {
            // Forget idle callers rather than grow without bound.
            b.retain(|_, (tokens, at)| *tokens < burst || now.duration_since(*at).as_secs() < 60);
        }
        let (tokens, at) = b.entry(key.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= cost {
            *tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// Serves `/metrics` (what `encode` writes, in the OpenMetrics text format) and `/ready`
/// (200 when `ready()` says so, 503 otherwise, for Kubernetes readiness probes) on
/// `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    encode: impl Fn() -> String + Clone + Send + Sync + 'static,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let encode = encode.clone();
                async move {
                    (
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        encode(),
                    )
                }
            }),
        )
        .route(
            "/ready",
            axum::routing::get(move || {
                let ready = ready.clone();
                async move {
                    if ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_limiter_refills_at_its_rate_and_caps_at_its_burst() {
        let l = RateLimiter::new(10.0, 3.0);
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.allow("a", t0)));
        assert!(!l.allow("a", t0), "the burst is spent");
        assert!(l.allow("b", t0), "callers have their own buckets");
        assert!(
            l.allow("a", t0 + Duration::from_millis(100)),
            "one token after 0.1 s"
        );
        assert!(!l.allow("a", t0 + Duration::from_millis(100)));
        // An hour idle refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        assert!((0..3).all(|_| l.allow("a", later)));
        assert!(!l.allow("a", later));
        assert!(
            !l.allow_n("c", t0, 4.0),
            "a cost above the burst is never allowed"
        );
        l.set_rate(10.0, 10.0);
        assert!(
            l.allow_n("d", t0, 4.0),
            "a new caller starts with the new burst"
        );
    }
}
