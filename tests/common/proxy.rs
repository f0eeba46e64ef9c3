//! A fault-injecting TCP proxy for the tests: it sits between participants and the
//! coordinator on loopback and, switched at run time, delays (with jitter) or throttles the
//! bytes it forwards, swallows them (a partition: connections stay open, nothing arrives:
//! half-open from both ends), refuses new connections (a server that is down), or resets
//! every open connection mid-stream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to the bytes it forwards, from now on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    Pass,
    /// Each chunk waits `ms` ± `jitter_ms` (uniform) before it is forwarded.
    Delay {
        ms: u64,
        jitter_ms: u64,
    },
    /// At most this many bytes a second, each way, per connection.
    Throttle {
        bytes_per_second: u64,
    },
    /// Nothing is forwarded (and new connections are accepted, then starved): a network
    /// partition, the connections half-open.
    Partition,
    /// New connections are reset as soon as they are accepted (a server that is down);
    /// open ones go on.
    Refuse,
}

pub struct FaultProxy {
    /// Where participants dial instead of the coordinator.
    pub addr: String,
    fault: Arc<Mutex<Fault>>,
    /// Bumped by `reset_all`: connections opened before it are reset.
    generation: Arc<AtomicU64>,
    /// Connections accepted so far.
    accepted: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl FaultProxy {
    /// A proxy to `upstream` (`host:port`), forwarding faithfully until told otherwise.
    pub fn start(upstream: &str) -> FaultProxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding the proxy");
        let addr = listener.local_addr().unwrap().to_string();
        let fault = Arc::new(Mutex::new(Fault::Pass));
        let generation = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_string();
        let (f, g, a) = (fault.clone(), generation.clone(), accepted.clone());
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                if *f.lock().unwrap() == Fault::Refuse {
                    #[allow(deprecated)] // a zero linger resets; it does not block
                    let _ = client.set_linger(Some(Duration::ZERO));
                    drop(client);
                    continue;
                }
                let (f, g, upstream) = (f.clone(), g.clone(), upstream.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        connection(client, server, f, g).await;
                    }
                });
            }
        });
        FaultProxy {
            addr,
            fault,
            generation,
            accepted,
            _rt: rt,
        }
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Resets every connection open now (RST to both ends, mid-stream); later ones pass.
    pub fn reset_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Forwards both ways until either end closes or a reset is asked for.
async fn connection(
    client: TcpStream,
    server: TcpStream,
    fault: Arc<Mutex<Fault>>,
    generation: Arc<AtomicU64>,
) {
    let born = generation.load(Ordering::SeqCst);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(pump(cr, sw, fault.clone()));
    let down = tokio::spawn(pump(sr, cw, fault));
    loop {
        if up.is_finished() || down.is_finished() {
            break;
        }
        if generation.load(Ordering::SeqCst) != born {
            // RST, not FIN: abort the pumps and drop both sockets with linger 0.
            up.abort();
            down.abort();
            let _ = (up.await, down.await);
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    up.abort();
    down.abort();
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    fault: Arc<Mutex<Fault>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    // Linger 0 on both sockets: when this task is aborted, dropping them sends a reset.
    // (tokio deprecates set_linger because a positive linger blocks the dropping thread; a
    // zero linger does not block, it resets, which is the point here.)
    #[allow(deprecated)]
    {
        let _ = from.as_ref().set_linger(Some(Duration::ZERO));
        let _ = to.as_ref().set_linger(Some(Duration::ZERO));
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let current = *fault.lock().unwrap();
        match current {
            Fault::Pass => {}
            Fault::Delay { ms, jitter_ms } => {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let j = if jitter_ms == 0 {
                    0
                } else {
                    seed % (2 * jitter_ms + 1)
                };
                let wait = (ms + j).saturating_sub(jitter_ms);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Fault::Throttle { bytes_per_second } => {
                let secs = n as f64 / bytes_per_second.max(1) as f64;
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
            Fault::Partition => continue,
            Fault::Refuse => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
