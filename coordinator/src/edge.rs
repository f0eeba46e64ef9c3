//! The Federation service's edge: who is calling (certificate identity and role), per-caller
//! rate limits, replayed nonces, sessions, the upload slots that bound memory, the transport
//! (plaintext or mutual TLS with a live CRL), and the one mapping of every error the driver
//! and the state machine return to its gRPC status.

use std::time::Instant;

use cohort_protocol::ProtocolError;
use cohort_protocol::pb::{self, update_chunk::Part};
use tonic::{Request, Status, Streaming};

use crate::driver::{Coordinator, NoJob};
use crate::guard::NonceRefusal;
use crate::round::Rejection;

impl From<NonceRefusal> for Status {
    fn from(e: NonceRefusal) -> Status {
        match e {
            NonceRefusal::Malformed(p) => protocol_status(&p),
            NonceRefusal::Replayed => Status::already_exists(e.to_string()),
        }
    }
}

impl From<NoJob> for Status {
    fn from(e: NoJob) -> Status {
        Status::unavailable(e.to_string())
    }
}

impl Coordinator {
    /// The identity in the caller's certificate, when the service runs with TLS; `None`
    /// on a plaintext development listener. Only participant certificates may call.
    /// Every call is also counted against its caller's rate limit: the certificate
    /// identity, or the remote address on a plaintext listener.
    pub(crate) fn caller<T>(&self, req: &Request<T>) -> Result<Option<String>, Status> {
        self.caller_as(req, cohort_crypto::pki::Role::Participant)
    }

    /// [`Self::caller`] for a service meant for `role`.
    pub(crate) fn caller_as<T>(
        &self,
        req: &Request<T>,
        role: cohort_crypto::pki::Role,
    ) -> Result<Option<String>, Status> {
        let id = self.certificate_identity(req, role)?;
        let key = id.clone().unwrap_or_else(|| {
            req.remote_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| "unknown".into())
        });
        if !self.shared.limiter.allow(&key, Instant::now()) {
            tracing::warn!(caller = %key, "refused: over the rate limit");
            return Err(Status::resource_exhausted(format!(
                "{key}: too many requests; slow down"
            )));
        }
        Ok(id)
    }

    /// Sets the per-caller rate limit: `per_second` sustained, bursts of `burst`.
    pub fn set_rate_limit(&self, per_second: f64, burst: f64) {
        self.shared.limiter.set_rate(per_second, burst);
    }

    fn certificate_identity<T>(
        &self,
        req: &Request<T>,
        wanted: cohort_crypto::pki::Role,
    ) -> Result<Option<String>, Status> {
        if !self
            .shared
            .require_certificates
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(None);
        }
        let service = match wanted {
            cohort_crypto::pki::Role::Admin => "the Admin service is for admins",
            _ => "the Federation service is for participants",
        };
        cohort_protocol::server::certificate_identity(req, &[wanted], service).map(Some)
    }

    /// One of the `UPLOAD_SLOTS` model-sized receive buffers, held while an upload or share
    /// arrives.
    pub(crate) async fn upload_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        self.shared
            .upload_slots
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))
    }

    /// Refuses a message for another job than this coordinator's.
    pub(crate) fn check_job(&self, id: &str, job_id: &str) -> Result<(), Status> {
        let job = self.lock()?.config().job_id.clone();
        if job_id == job {
            Ok(())
        } else {
            Err(refuse(
                id,
                Status::not_found(format!("no job {job_id:?} (this coordinator runs {job:?})")),
            ))
        }
    }

    /// Refuses a message whose nonce is missing or was seen before from `id`.
    pub(crate) fn check_nonce(&self, id: &str, nonce: &[u8]) -> Result<(), Status> {
        self.shared
            .nonces
            .check(id, nonce)
            .map_err(|e| refuse(id, e.into()))
    }

    /// The participant of `session`, checked against the caller's certificate identity.
    pub(crate) fn session_of(&self, cert: Option<String>, session: &str) -> Result<String, Status> {
        let id = self.participant(session)?;
        match cert {
            Some(c) if c != id => Err(refuse(
                &c,
                Status::permission_denied(format!(
                    "the session belongs to {id:?}, not to the certificate's {c:?}"
                )),
            )),
            _ => Ok(id),
        }
    }

    pub(crate) fn participant(&self, session: &str) -> Result<String, Status> {
        self.lock()?
            .participant_for_session(session)
            .cloned()
            .ok_or_else(|| {
                tracing::warn!("refused a call with an unknown or expired session");
                Status::unauthenticated("unknown or expired session: join again")
            })
    }
}

/// The gRPC status for a refusal.
pub fn rejection_status(r: &Rejection) -> Status {
    let msg = r.to_string();
    match r {
        Rejection::UnknownParticipant(_) => Status::unauthenticated(msg),
        Rejection::NotAllowed(_) => Status::permission_denied(msg),
        Rejection::RoundClosed { .. } | Rejection::NotSelected(..) => {
            Status::failed_precondition(msg)
        }
        Rejection::Duplicate(..) => Status::already_exists(msg),
        Rejection::ParameterCount { .. } | Rejection::Invalid(_) => Status::invalid_argument(msg),
    }
}

pub(crate) fn protocol_status(e: &ProtocolError) -> Status {
    let msg = e.to_string();
    match e {
        ProtocolError::Malformed(_) | ProtocolError::ParameterCount { .. } => {
            Status::invalid_argument(msg)
        }
        ProtocolError::DigestMismatch { .. } => Status::data_loss(msg),
        ProtocolError::TooLarge { .. } => Status::resource_exhausted(msg),
    }
}

pub(crate) fn refuse(id: &str, status: Status) -> Status {
    tracing::warn!(participant = %id, code = ?status.code(), "refused: {}", status.message());
    status
}

/// The next message of a client stream. tonic reports a message over the size limit as
/// `OutOfRange`; the gRPC specification's code for that is `ResourceExhausted`.
pub(crate) async fn next_message<T>(stream: &mut Streaming<T>) -> Result<Option<T>, Status> {
    stream.message().await.map_err(|s| {
        if s.code() == tonic::Code::OutOfRange {
            Status::resource_exhausted(s.message().to_string())
        } else {
            s
        }
    })
}

/// A client stream of one header, data chunks and a trailer.
pub(crate) trait DataPart: Send + Sized + 'static {
    type Header;
    /// The message's name in errors.
    const HEADER: &'static str;
    /// `Some(header)` if this message is the header.
    fn header(self) -> Option<Self::Header>;
    /// A data chunk or the trailer; `None` for anything else (a second header).
    fn split(self) -> Option<StreamPart>;
}

/// What follows a stream's header.
pub(crate) enum StreamPart {
    Data(Vec<u8>),
    /// The trailer, with the hex SHA-256 of everything sent.
    Trailer {
        digest: String,
    },
}

/// The stream's first message, which must be its header.
pub(crate) async fn first_header<M: DataPart>(
    stream: &mut Streaming<M>,
) -> Result<M::Header, Status> {
    next_message(stream)
        .await?
        .and_then(M::header)
        .ok_or_else(|| {
            Status::invalid_argument(format!("the first message must be a {}", M::HEADER))
        })
}

impl DataPart for pb::UpdateChunk {
    type Header = pb::UpdateHeader;
    const HEADER: &'static str = "UpdateHeader";
    fn header(self) -> Option<pb::UpdateHeader> {
        match self.part {
            Some(Part::Header(h)) => Some(h),
            _ => None,
        }
    }
    fn split(self) -> Option<StreamPart> {
        match self.part {
            Some(Part::Data(d)) => Some(StreamPart::Data(d)),
            Some(Part::Trailer(t)) => Some(StreamPart::Trailer { digest: t.digest }),
            _ => None,
        }
    }
}

impl DataPart for pb::ShareChunk {
    type Header = pb::ShareHeader;
    const HEADER: &'static str = "ShareHeader";
    fn header(self) -> Option<pb::ShareHeader> {
        match self.part {
            Some(pb::share_chunk::Part::Header(h)) => Some(h),
            _ => None,
        }
    }
    fn split(self) -> Option<StreamPart> {
        use pb::share_chunk::Part as SharePart;
        match self.part {
            Some(SharePart::Data(d)) => Some(StreamPart::Data(d)),
            Some(SharePart::Trailer(t)) => Some(StreamPart::Trailer { digest: t.digest }),
            _ => None,
        }
    }
}

/// Receives data chunks into `asm` until the trailer, then checks count and digest.
pub(crate) async fn receive_words<T: cohort_protocol::Word, M: DataPart>(
    stream: &mut Streaming<M>,
    mut asm: cohort_protocol::Assembler<T>,
    id: &str,
) -> Result<(Vec<T>, [u8; 32]), Status> {
    let digest = loop {
        match next_message(stream).await.map_err(|s| refuse(id, s))? {
            Some(m) => match m.split() {
                Some(StreamPart::Data(d)) => {
                    asm.push(&d).map_err(|e| refuse(id, protocol_status(&e)))?
                }
                Some(StreamPart::Trailer { digest }) => break digest,
                None => {
                    return Err(refuse(
                        id,
                        Status::invalid_argument(
                            "unexpected message after the header: only data chunks and one trailer may follow",
                        ),
                    ));
                }
            },
            None => {
                return Err(refuse(
                    id,
                    Status::invalid_argument("stream ended without a trailer"),
                ));
            }
        }
    };
    if next_message(stream).await?.is_some() {
        return Err(refuse(
            id,
            Status::invalid_argument("messages after the trailer"),
        ));
    }
    asm.finish_with_digest(&digest)
        .map_err(|e| refuse(id, protocol_status(&e)))
}
