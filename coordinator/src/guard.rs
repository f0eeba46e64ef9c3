//! The Federation edge's per-caller memory, kept in the driver's shared state: the default
//! rate limit, and the nonces of recent messages (replays are refused).

use std::sync::Mutex;

use cohort_protocol::ProtocolError;

/// Default per-caller limit: generous for a participant (long-polls, heartbeats, chunked
/// uploads), tight enough to stop a flood.
pub(crate) const RATE_PER_SECOND: f64 = 50.0;
pub(crate) const RATE_BURST: f64 = 500.0;

/// Why a message's nonce is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum NonceRefusal {
    #[error("{0}")]
    Malformed(ProtocolError),
    #[error("replayed message: its nonce was used before")]
    Replayed,
}

/// Recent message nonces per participant: a state-changing message (an update, a share, an
/// evaluation) whose nonce was seen before is a replay and is refused. The newest
/// `NONCES_KEPT` per participant are kept; anything older is refused anyway by the round,
/// attempt and seed the message is bound to.
#[derive(Default)]
pub(crate) struct NonceLog {
    seen: Mutex<std::collections::HashMap<String, NonceWindow>>,
}

#[derive(Default)]
struct NonceWindow {
    set: std::collections::HashSet<[u8; cohort_protocol::NONCE_BYTES]>,
    order: std::collections::VecDeque<[u8; cohort_protocol::NONCE_BYTES]>,
}

const NONCES_KEPT: usize = 256;

impl NonceLog {
    pub(crate) fn check(&self, id: &str, nonce: &[u8]) -> Result<(), NonceRefusal> {
        let n = cohort_protocol::nonce_of(nonce).map_err(NonceRefusal::Malformed)?;
        let mut seen = self.seen.lock().expect("nonce lock");
        let w = seen.entry(id.to_string()).or_default();
        if !w.set.insert(n) {
            return Err(NonceRefusal::Replayed);
        }
        w.order.push_back(n);
        if w.order.len() > NONCES_KEPT
            && let Some(old) = w.order.pop_front()
        {
            w.set.remove(&old);
        }
        Ok(())
    }
}
