//! Client connections of the public listener: how many, and for how long
//! each may sit without finishing a request (`SECURITY.md`, "A hostile
//! client").
//!
//! pingora bounds each read of a request header (60 s), not the header as a
//! whole, and sets no cap on connections: a client sending one header byte
//! a minute holds its socket for ever, and enough of them take every file
//! descriptor the process has. [`Guarded`] wraps the public listener's
//! application:
//!
//! - it counts connections, in all and per client address, and answers one
//!   over either cap `503 capacity_exhausted` at once and closes it;
//! - it wraps each connection in a [`Watched`] stream whose reads fail once
//!   a request's header has taken longer than `header_timeout` since its
//!   first byte (for a new connection, since it was accepted), or once a
//!   kept-alive connection has been idle for `idle_timeout`.
//!
//! The service tells the stream where a request stands:
//! [`header_read`] when the header is in (the body is then bounded by
//! pingora's per-read timeout and the invocation's deadline), and
//! [`request_done`] when its answer is written (the connection is then
//! idle until the next request's first byte).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType,
};
use pingora::proxy::Session;
use pingora::server::ShutdownWatch;
use prometheus::{IntCounterVec, IntGauge};
use tensor_wasm_shared::{ApiError, ErrorCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;

use crate::fleet::lock;

/// The public listener's connection limits (`docs/CONFIG.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, in all.
    pub max: usize,
    /// Connections open at once from one client address; 0: no cap.
    pub per_client: usize,
    /// From a request's first byte (a new connection's accept) to the end
    /// of its header.
    pub header_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max: 16_384,
            per_client: 1024,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl ConnLimits {
    /// The default cap on connections in all for a process that may open
    /// `files` file descriptors: each request in flight holds two (its
    /// client's and its executor's), and 512 stay for everything else (the
    /// audit log, calls to executors, the admin listener).
    pub fn max_for_files(files: u64) -> usize {
        (files.saturating_sub(512) / 2).clamp(64, 1 << 20) as usize
    }
}

/// What the connection counters report.
#[derive(Clone, Debug)]
pub struct ConnMetrics {
    /// Connections open now.
    pub open: IntGauge,
    /// Connections refused, by `reason` (`total` or `per_client`).
    pub refused: IntCounterVec,
    /// Connections closed for taking too long, by `phase` (`header` or
    /// `idle`).
    pub timed_out: IntCounterVec,
}

/// A [`ServerApp`] behind connection caps and header and idle timeouts.
pub struct Guarded<A> {
    inner: Arc<A>,
    limits: ConnLimits,
    metrics: ConnMetrics,
    open: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

impl<A> fmt::Debug for Guarded<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("limits", &self.limits)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl<A> Guarded<A> {
    pub fn new(inner: A, limits: ConnLimits, metrics: ConnMetrics) -> Guarded<A> {
        Guarded {
            inner: Arc::new(inner),
            limits,
            metrics,
            open: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a connection from `client` in, or says which cap it is over.
    fn admit(&self, client: Option<IpAddr>) -> Result<Admitted<'_, A>, &'static str> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.limits.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err("total");
        }
        let client = client.filter(|_| self.limits.per_client > 0);
        if let Some(ip) = client {
            let mut per = lock(&self.per_client);
            let n = per.entry(ip).or_insert(0);
            if *n >= self.limits.per_client {
                drop(per);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err("per_client");
            }
            *n += 1;
        }
        self.metrics.open.inc();
        Ok(Admitted {
            guarded: self,
            client,
        })
    }
}

/// A connection counted in; counted out when dropped.
struct Admitted<'a, A> {
    guarded: &'a Guarded<A>,
    client: Option<IpAddr>,
}

impl<A> Drop for Admitted<'_, A> {
    fn drop(&mut self) {
        let g = self.guarded;
        g.open.fetch_sub(1, Ordering::AcqRel);
        g.metrics.open.dec();
        if let Some(ip) = self.client {
            let mut per = lock(&g.per_client);
            if let Some(n) = per.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&ip);
                }
            }
        }
    }
}

/// The answer to a connection over a cap, written before it is closed.
fn refusal(reason: &str) -> Vec<u8> {
    let message = match reason {
        "per_client" => "too many connections from this address; reuse one (keep-alive)",
        _ => "the proxy has as many connections as it takes; retry shortly",
    };
    let body =
        serde_json::to_vec(&ApiError::new(ErrorCode::CapacityExhausted, message).into_body())
            .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// How long writing a refusal may take: a client that does not read it
/// does not keep the socket.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().cloned())
            .and_then(|a| match a {
                SocketAddr::Inet(a) => Some(a.ip()),
                _ => None,
            });
        let admitted = match self.admit(client) {
            Ok(a) => a,
            Err(reason) => {
                self.metrics.refused.with_label_values(&[reason]).inc();
                tracing::debug!(?client, reason, "connection refused");
                let answer = refusal(reason);
                let _ = tokio::time::timeout(REFUSAL_WRITE, async {
                    stream.write_all(&answer).await?;
                    stream.flush().await
                })
                .await;
                return None;
            }
        };
        let watched: Stream = Box::new(Watched::new(stream, self.limits, self.metrics.clone()));
        // The connection's requests, one after another, here rather than in
        // pingora's loop: the count must hold until the last one ends.
        let mut next = self.inner.process_new(watched, shutdown).await;
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
        drop(admitted);
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Tells the connection under `session` that its request's header is in:
/// header time no longer counts.
pub fn header_read(session: &Session) {
    if let Some(w) = watched(session) {
        w.enter(Phase::Body, None);
    }
}

/// Tells the connection under `session` that its request is answered: it
/// is idle until the next request's first byte.
pub fn request_done(session: &Session) {
    if let Some(w) = watched(session) {
        w.enter(Phase::Idle, Some(w.limits.idle_timeout));
    }
}

fn watched(session: &Session) -> Option<&Watched> {
    let stream = session.as_downstream().stream()?;
    stream.as_ref().as_any().downcast_ref::<Watched>()
}

/// Where a connection's current request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Reading a header: bounded by `header_timeout`.
    Header = 0,
    /// Reading a body or writing the answer: pingora's timeouts apply.
    Body = 1,
    /// Between requests: bounded by `idle_timeout`.
    Idle = 2,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Header,
            1 => Phase::Body,
            _ => Phase::Idle,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Phase::Header => "header",
            Phase::Body => "body",
            Phase::Idle => "idle",
        }
    }
}

/// A client connection whose reads fail when its header or idle time is
/// up (module doc). The service reaches it through `as_any` on the
/// session's stream; the phase and deadline are atomics for that reason,
/// though only the connection's own task touches them.
pub struct Watched {
    inner: Stream,
    limits: ConnLimits,
    metrics: ConnMetrics,
    origin: Instant,
    phase: AtomicU8,
    /// Nanoseconds after `origin`.
    deadline: AtomicU64,
    timer: Option<(u64, Pin<Box<Sleep>>)>,
}

impl fmt::Debug for Watched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watched")
            .field("inner", &self.inner)
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

impl Watched {
    fn new(inner: Stream, limits: ConnLimits, metrics: ConnMetrics) -> Watched {
        let w = Watched {
            inner,
            limits,
            metrics,
            origin: Instant::now(),
            phase: AtomicU8::new(Phase::Header as u8),
            deadline: AtomicU64::new(0),
            timer: None,
        };
        w.enter(Phase::Header, Some(limits.header_timeout));
        w
    }

    fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    fn enter(&self, phase: Phase, within: Option<Duration>) {
        if let Some(within) = within {
            let at = self.origin.elapsed().saturating_add(within);
            self.deadline.store(
                u64::try_from(at.as_nanos()).unwrap_or(u64::MAX),
                Ordering::Release,
            );
        }
        self.phase.store(phase as u8, Ordering::Release);
    }

    fn deadline(&self) -> Instant {
        self.origin + Duration::from_nanos(self.deadline.load(Ordering::Acquire))
    }

    fn timed_out(&self, phase: Phase) -> io::Error {
        self.metrics
            .timed_out
            .with_label_values(&[phase.label()])
            .inc();
        // Once: the next read gets the error from pingora's side again only
        // if it asks, and it closes the connection on the first.
        self.enter(Phase::Body, None);
        let (what, within) = match phase {
            Phase::Idle => ("an idle connection", self.limits.idle_timeout),
            _ => ("a request header", self.limits.header_timeout),
        };
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} took longer than {within:?}"),
        )
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let phase = this.phase();
        if phase != Phase::Body && Instant::now() >= this.deadline() {
            return Poll::Ready(Err(this.timed_out(phase)));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if phase == Phase::Idle && buf.filled().len() > before {
                    this.enter(Phase::Header, Some(this.limits.header_timeout));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if phase != Phase::Body => {
                let at = this.deadline.load(Ordering::Acquire);
                let deadline = this.deadline();
                let timer = match &mut this.timer {
                    Some((set, t)) if *set == at => t,
                    slot => {
                        let t = Box::pin(tokio::time::sleep_until(deadline.into()));
                        &mut slot.insert((at, t)).1
                    }
                };
                if timer.as_mut().poll(cx).is_ready() {
                    this.timer = None;
                    return Poll::Ready(Err(this.timed_out(phase)));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Watched {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(self.inner.as_mut()).await
    }
}

impl UniqueID for Watched {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Watched {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Watched {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Watched {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Watched {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Watched {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use prometheus::Opts;

    use super::*;

    fn metrics() -> ConnMetrics {
        ConnMetrics {
            open: IntGauge::new("open", "open").unwrap(),
            refused: IntCounterVec::new(Opts::new("refused", "refused"), &["reason"]).unwrap(),
            timed_out: IntCounterVec::new(Opts::new("timed_out", "timed_out"), &["phase"]).unwrap(),
        }
    }

    #[test]
    fn connections_are_capped_in_all_and_per_address_and_counted_out_on_close() {
        let g = Guarded::new(
            (),
            ConnLimits {
                max: 3,
                per_client: 2,
                ..ConnLimits::default()
            },
            metrics(),
        );
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = g.admit(Some(a)).unwrap();
        let a2 = g.admit(Some(a)).unwrap();
        assert_eq!(g.admit(Some(a)).err(), Some("per_client"));
        let b1 = g.admit(Some(b)).unwrap();
        // Three in all: even a new address waits, and so does one without
        // an address (a Unix socket).
        assert_eq!(
            g.admit(Some("10.0.0.3".parse().unwrap())).err(),
            Some("total")
        );
        assert_eq!(g.admit(None).err(), Some("total"));
        assert_eq!(g.metrics.open.get(), 3);
        drop(a1);
        let a3 = g.admit(Some(a)).unwrap();
        drop((a2, a3, b1));
        assert_eq!(g.metrics.open.get(), 0);
        assert_eq!(g.open.load(Ordering::Relaxed), 0);
        assert!(lock(&g.per_client).is_empty(), "no address left behind");
    }

    #[test]
    fn the_default_cap_leaves_descriptors_for_the_rest() {
        assert_eq!(ConnLimits::max_for_files(1024), 256);
        assert_eq!(ConnLimits::max_for_files(100), 64);
        assert_eq!(
            ConnLimits::max_for_files(1 << 20),
            (((1 << 20) - 512) / 2) as usize
        );
    }
}
