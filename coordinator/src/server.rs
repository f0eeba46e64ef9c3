//! The coordinator's gRPC server: the Federation service, the Admin service, the embedded
//! Inference service when configured, health and reflection, on one plaintext or mutual-TLS
//! listener.

use std::time::Duration;

use cohort_protocol::MAX_MESSAGE_BYTES;
use cohort_protocol::pb::federation_server::FederationServer;

use crate::driver::{Coordinator, CoordinatorError};

impl Coordinator {
    /// The gRPC service, with message size limits set.
    pub fn service(&self) -> FederationServer<Coordinator> {
        FederationServer::new(self.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        self.router()
            .serve_with_incoming_shutdown(cohort_protocol::server::nodelay(listener), shutdown)
            .await
    }

    /// Every service a coordinator serves: Federation, Admin, grpc.health.v1 and server
    /// reflection (v1 and v1alpha), so standard gRPC tools work.
    fn router(&self) -> tonic::transport::server::Router {
        let (health, health_service) = tonic_health::server::health_reporter();
        let (v1, v1alpha) = cohort_protocol::server::reflection();
        let inference = self.shared.inference.get().is_some();
        tokio::spawn(async move {
            use cohort_protocol::pb::{
                admin_server::AdminServer, federation_server::FederationServer,
            };
            health.set_serving::<FederationServer<Coordinator>>().await;
            health
                .set_serving::<AdminServer<crate::admin::AdminApi>>()
                .await;
            if inference {
                health
                    .set_serving::<cohort_protocol::pb::inference_server::InferenceServer<
                        cohort_serving::InferenceApi,
                    >>()
                    .await;
            }
        });
        tonic::transport::Server::builder()
            .add_service(self.service())
            .add_service(self.admin_service())
            .add_optional_service(self.shared.inference.get().map(|i| i.service()))
            .add_service(health_service)
            .add_service(v1)
            .add_service(v1alpha)
    }

    /// Serves with mutual TLS on `listener` until `shutdown` completes: TLS 1.3 only, a
    /// client certificate from the federation CA required, revoked ones refused. Every call
    /// must then come from a participant certificate whose identity matches the session.
    /// The CRL is re-read every `crl_poll` while serving: a revocation takes effect without
    /// a restart, and closes the revoked certificate's open connections.
    pub async fn serve_tls(
        &self,
        listener: tokio::net::TcpListener,
        tls: cohort_protocol::tls::TlsFiles,
        crl_poll: Duration,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), CoordinatorError> {
        let (incoming, tasks) = cohort_protocol::server::incoming(listener, tls, crl_poll)?;
        self.shared
            .require_certificates
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(i) = self.shared.inference.get() {
            i.require_certificates();
        }
        let served = self
            .router()
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        for t in tasks {
            t.abort();
        }
        Ok(served?)
    }
}

/// Raises this process's soft limit on open files to its hard limit, as a server holding a
/// connection per participant needs (the usual soft limit, 1,024, is reached by about a
/// thousand participants; the hard limit is often far higher). Returns the soft limit before
/// and after.
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads and writes only `lim`.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        }
        let hard = lim.rlim_max;
        if hard > 256 {
            // Start lower than the hard limit, so the raise has something to do.
            lim.rlim_cur = 256;
            // SAFETY: as above.
            unsafe {
                assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
            }
        }
        let (before, after) = super::raise_open_files_limit().unwrap();
        assert_eq!(after, hard);
        assert!(before <= after);
        assert_eq!(super::raise_open_files_limit().unwrap(), (hard, hard));
    }
}
