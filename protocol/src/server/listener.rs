//! The mutual-TLS listener of every cohort server (coordinator and `cohort serve`): TLS 1.3 handshakes off the accept loop, the CRL
//! re-read while serving, and connections of certificates revoked since they connected are
//! closed at once.

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::tls::{TlsError, TlsFiles};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// One live connection's kill switch.
#[derive(Default)]
struct Switch {
    closed: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl Switch {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for w in self.wakers.lock().expect("waker lock").drain(..) {
            w.wake();
        }
    }

    fn check(&self, cx: &Context<'_>) -> Result<(), io::Error> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "certificate revoked",
            ));
        }
        let mut w = self.wakers.lock().expect("waker lock");
        if !w.iter().any(|x| x.will_wake(cx.waker())) {
            w.push(cx.waker().clone());
        }
        Ok(())
    }
}

/// A TLS connection that errors out as soon as its certificate is revoked.
pub struct Revocable {
    inner: TlsStream<TcpStream>,
    switch: Arc<Switch>,
    registry: Arc<Registry>,
    key: u64,
}

impl Drop for Revocable {
    fn drop(&mut self) {
        self.registry
            .live
            .lock()
            .expect("connection registry lock")
            .remove(&self.key);
    }
}

impl AsyncRead for Revocable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.switch.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Revocable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.switch.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for Revocable {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A live connection: its certificate's serial number, who it is, its kill switch.
struct Live {
    serial: Vec<u8>,
    who: String,
    switch: Arc<Switch>,
}

/// Live connections by the serial number of their client certificate.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, Live>>,
}

/// Connections whose TLS handshake succeeded, as tonic takes them.
pub type Incoming = tokio_stream::wrappers::ReceiverStream<Result<Revocable, io::Error>>;

impl Registry {
    /// Closes every live connection whose certificate `revoked` names.
    fn close_revoked(&self, revoked: &[Vec<u8>]) {
        for Live {
            serial,
            who,
            switch,
        } in self.live.lock().expect("registry lock").values()
        {
            if revoked.contains(serial) && !switch.closed.load(Ordering::SeqCst) {
                tracing::warn!(identity = %who, "certificate revoked: closing its connection");
                switch.close();
            }
        }
    }
}

/// Accepts TCP connections on `listener` and yields the ones whose TLS handshake succeeds.
/// The CRL in `tls` is re-read every `crl_poll` when it changed on disk. The returned tasks
/// must be aborted when serving ends.
pub fn incoming(
    listener: tokio::net::TcpListener,
    tls: TlsFiles,
    crl_poll: Duration,
) -> Result<(Incoming, Vec<tokio::task::JoinHandle<()>>), TlsError> {
    let config = Arc::new(RwLock::new(tls.server_config()?));
    let registry = Arc::new(Registry::default());
    let (tx, rx) = mpsc::channel(64);
    let reload = {
        let (config, registry) = (config.clone(), registry.clone());
        tokio::spawn(async move {
            let stamp = |p: &Option<std::path::PathBuf>| {
                p.as_ref()
                    .and_then(|p| std::fs::metadata(p).ok())
                    .and_then(|m| m.modified().ok())
            };
            let mut seen = stamp(&tls.crl);
            loop {
                tokio::time::sleep(crl_poll).await;
                let now = stamp(&tls.crl);
                if now == seen {
                    continue;
                }
                seen = now;
                let revoked = tls
                    .crl
                    .as_ref()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .map(|pem| cohort_crypto::pki::revoked_serials(&pem));
                match (tls.server_config(), revoked) {
                    (Ok(c), Some(Ok(revoked))) => {
                        *config.write().expect("TLS config lock") = c;
                        tracing::warn!(
                            revoked = revoked.len(),
                            "certificate revocation list reloaded"
                        );
                        registry.close_revoked(&revoked);
                    }
                    (Err(e), _) => {
                        tracing::error!("CRL changed but cannot be used (keeping the old one): {e}")
                    }
                    (_, r) => tracing::error!(
                        "CRL changed but cannot be read (keeping the old one): {:?}",
                        r.map(|r| r.err())
                    ),
                }
            }
        })
    };
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor =
                tokio_rustls::TlsAcceptor::from(config.read().expect("TLS config lock").clone());
            let (tx, registry) = (tx.clone(), registry.clone());
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, "TLS handshake refused: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec())
                    .unwrap_or_default();
                let serial = cohort_crypto::pki::serial_of_der(&leaf).unwrap_or_default();
                let who = cohort_crypto::pki::identity_of(&leaf)
                    .map(|(id, role)| format!("{id} ({role})"))
                    .unwrap_or_else(|_| peer.to_string());
                let switch = Arc::new(Switch::default());
                let key = registry.next.fetch_add(1, Ordering::SeqCst);
                registry.live.lock().expect("registry lock").insert(
                    key,
                    Live {
                        serial,
                        who,
                        switch: switch.clone(),
                    },
                );
                let conn = Revocable {
                    inner: stream,
                    switch,
                    registry,
                    key,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    Ok((
        tokio_stream::wrappers::ReceiverStream::new(rx),
        vec![reload, accept],
    ))
}

/// A plaintext listener's connections with `TCP_NODELAY` set. tonic sets it only on sockets it
/// binds itself; without it, Nagle's algorithm and delayed ACKs add ~40 ms to every small
/// request/response exchange.
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.and_then(|s| {
            s.set_nodelay(true)?;
            Ok(s)
        })
    })
}
