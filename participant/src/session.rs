//! The connection to the coordinator: connecting with backoff, fetching the global model
//! (chunked, digest-checked), heartbeats while a long local step runs, and nonces.

use super::*;

pub(crate) struct Session {
    pub(crate) client: FederationClient<Channel>,
    pub(crate) id: String,
    pub(crate) heartbeat: Duration,
}

/// How often an idle or busy connection to the coordinator is pinged.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is given up.
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) async fn connect(
    opts: &AgentOptions,
    num_examples: u64,
    keys: &pb::SecureKeys,
) -> Result<Session, AgentError> {
    let endpoint = Endpoint::from_shared(opts.coordinator.clone())
        .map_err(|e| AgentError::Address(opts.coordinator.clone(), e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // A half-open connection (a partition, a NAT that forgot it) would leave a call
        // waiting forever: unanswered HTTP/2 pings close it, the call fails, the node rejoins.
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let endpoint = match &opts.tls {
        Some(tls) => endpoint
            .tls_config(tls.client_config())
            .map_err(|e| AgentError::Address(opts.coordinator.clone(), e.to_string()))?,
        None => endpoint,
    };
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Some(tls) = &opts.tls {
            check_certificate(&opts.id, &tls.cert_pem)?;
        }
        let attempt = async {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let mut client = FederationClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let joined = client
                .join(pb::JoinRequest {
                    participant_id: opts.id.clone(),
                    num_examples,
                    client_version: env!("CARGO_PKG_VERSION").into(),
                    keys: Some(keys.clone()),
                })
                .await?
                .into_inner();
            Ok::<_, Status>(Session {
                client,
                id: joined.session_id,
                heartbeat: Duration::from_millis(joined.heartbeat_interval_ms.max(100) as u64),
            })
        };
        match attempt.await {
            Ok(s) => {
                tracing::info!(participant = %opts.id, "joined");
                return Ok(s);
            }
            Err(s) if matches!(s.code(), Code::PermissionDenied | Code::InvalidArgument) => {
                return Err(AgentError::Refused(s));
            }
            Err(s) => {
                if started.elapsed() > opts.reconnect_for {
                    return Err(AgentError::Refused(s));
                }
                tracing::debug!(participant = %opts.id, "coordinator not reachable ({}); retrying", s.message());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Refuses to dial with an expired certificate: the coordinator's TLS handshake would fail
/// with nothing but a transport error, retried until `reconnect_for` runs out.
pub(crate) fn check_certificate(id: &str, cert_pem: &str) -> Result<(), AgentError> {
    let not_after = cohort_crypto::pki::not_after_of_pem(cert_pem)
        .map_err(|e| AgentError::Certificate(format!("this node's certificate: {e}")))?;
    if let Some(at) = cohort_crypto::pki::expired_at(not_after, cohort_protocol::tls::unix_now()) {
        return Err(AgentError::Certificate(format!(
            "the certificate of {id:?} expired at {at}: ask the federation's operator for a new \
             one (the coordinator refuses expired certificates)"
        )));
    }
    Ok(())
}

pub(crate) async fn fetch_model(
    s: &mut Session,
    job_id: &str,
    version: u64,
    expected: u64,
    digest: &str,
    control_variate: bool,
) -> Result<Vec<f32>, Status> {
    let mut stream = s
        .client
        .fetch_model(pb::FetchModelRequest {
            session_id: s.id.clone(),
            job_id: job_id.into(),
            version,
            control_variate,
        })
        .await?
        .into_inner();
    let mut asm = ParamAssembler::new(expected);
    let mut last = String::new();
    while let Some(chunk) = stream.message().await? {
        asm.push(&chunk.data)
            .map_err(|e| Status::data_loss(e.to_string()))?;
        if !chunk.digest.is_empty() {
            last = chunk.digest;
        }
    }
    if last != digest {
        return Err(Status::data_loss(if control_variate {
            "control variate's digest differs from the task's"
        } else {
            "model digest differs from the task's"
        }));
    }
    asm.finish(digest)
        .map_err(|e| Status::data_loss(e.to_string()))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `f` on a blocking thread while heartbeats keep the participant alive. The heartbeats
/// stop when this returns or when it is dropped unfinished (an agent cancelled mid-training:
/// otherwise they went on for good, holding the connection, on a session long gone).
pub(crate) async fn with_heartbeats<T: Send + 'static>(
    s: &Session,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let mut client = s.client.clone();
    let (session, every) = (s.id.clone(), s.heartbeat);
    let _beat = AbortOnDrop(tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let _ = client
                .heartbeat(pb::HeartbeatRequest {
                    session_id: session.clone(),
                })
                .await;
        }
    }));
    tokio::task::spawn_blocking(f)
        .await
        .expect("training thread panicked")
}

/// A fresh nonce for a state-changing message (the coordinator refuses repeats).
pub(crate) fn nonce() -> Vec<u8> {
    rand::random::<[u8; cohort_protocol::NONCE_BYTES]>().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_fresh_and_of_the_protocol_length() {
        let (a, b) = (nonce(), nonce());
        assert_eq!(a.len(), cohort_protocol::NONCE_BYTES);
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn an_address_that_is_not_a_uri_is_named() {
        let opts = AgentOptions {
            id: "p".into(),
            coordinator: "not a uri".into(),
            device: ComputeDevice::Cpu,
            poll_wait: Duration::from_millis(10),
            reconnect_for: Duration::from_millis(10),
            faults: Default::default(),
            tls: None,
            stay_between_jobs: false,
            compute: None,
            min_noise_multiplier: None,
            state_dir: None,
        };
        let Err(e) = connect(&opts, 10, &pb::SecureKeys::default()).await else {
            panic!("connected to {:?}", opts.coordinator);
        };
        assert!(e.to_string().contains("not a uri"), "{e}");
    }
}
