//! Another executor's internal API, as a migration's destination calls it
//! to pull a tenant from its source (`docs/API.md`, "Internal API"): the
//! session's manifest, modules and assets files by hash, and rounds as
//! streams. Bytes go executor to executor; the proxy only names the source.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{AUTHORIZATION, HOST};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tensor_wasm_shared::error::ErrorBody;
use tensor_wasm_shared::{ErrorCode, TenantId};

/// Longest wait for the source to answer a control call (not a stream): 30 s.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call to the source failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot reach executor {addr}: {message}")]
    Unreachable { addr: String, message: String },
    #[error("executor {addr} answered {status}: {message}")]
    Status {
        addr: String,
        status: u16,
        code: Option<ErrorCode>,
        message: String,
    },
    #[error("executor {addr} did not answer within {0:?}", CALL_TIMEOUT)]
    Timeout { addr: String },
}

impl PeerError {
    /// The source's error code, when it answered one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            PeerError::Status { code, .. } => *code,
            _ => None,
        }
    }
}

/// Header of an assets file's answer: the BLAKE3 digest of its bytes,
/// recorded when the file was stored (`docs/API.md`, "Internal API").
pub const ASSETS_BLAKE3: &str = "x-tensor-wasm-assets-blake3";

/// A response whose body arrives as it is read.
pub type BodyStream = hyper::body::Incoming;

/// The internal API of the executor at `addr`.
#[derive(Clone, Debug)]
pub struct Peer {
    addr: String,
    token: String,
}

impl Peer {
    pub fn new(addr: &str, token: &str) -> Peer {
        Peer {
            addr: addr.to_string(),
            token: token.to_string(),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn unreachable(&self, e: &dyn std::fmt::Display) -> PeerError {
        PeerError::Unreachable {
            addr: self.addr.clone(),
            message: e.to_string(),
        }
    }

    /// A new HTTP/1.1 connection to this executor, made within
    /// [`CONNECT_TIMEOUT`].
    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, PeerError> {
        let stream =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.addr))
                .await
                .map_err(|_| self.unreachable(&"no connection within the connect timeout"))?
                .map_err(|e| self.unreachable(&e))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(&e))?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Sends one request on a new connection; a 2xx answer's body as a
    /// stream (the connection lives until it is read), else the error.
    async fn send(&self, method: &str, path: &str) -> Result<BodyStream, PeerError> {
        Ok(self.send_for(method, path).await?.into_body())
    }

    /// As [`send`](Self::send), with the answer's headers.
    async fn send_for(
        &self,
        method: &str,
        path: &str,
    ) -> Result<hyper::Response<BodyStream>, PeerError> {
        let unreachable = |e: &dyn std::fmt::Display| self.unreachable(e);
        let mut sender = self.connect().await?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.addr)
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Full::new(Bytes::new()))
            .map_err(|e| unreachable(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(response);
        }
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => (Some(b.error.code), b.error.message),
            Err(_) => (
                None,
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
            ),
        };
        Err(PeerError::Status {
            addr: self.addr.clone(),
            status,
            code,
            message,
        })
    }

    /// One whole answer, within [`CALL_TIMEOUT`].
    async fn call(&self, method: &str, path: &str) -> Result<Bytes, PeerError> {
        let timeout = PeerError::Timeout {
            addr: self.addr.clone(),
        };
        let work = async {
            let body = self.send(method, path).await?;
            body.collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| PeerError::Unreachable {
                    addr: self.addr.clone(),
                    message: e.to_string(),
                })
        };
        tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .map_err(|_| timeout)?
    }

    /// The manifest of session `session`: its tenant and functions.
    pub async fn manifest(&self, session: &str) -> Result<Bytes, PeerError> {
        self.call("GET", &format!("/internal/outbound/{session}"))
            .await
    }

    /// The module of `tenant`'s function `id`, as registered.
    pub async fn module(&self, tenant: &TenantId, id: &str) -> Result<Bytes, PeerError> {
        self.call("GET", &format!("/internal/tenants/{tenant}/modules/{id}"))
            .await
    }

    /// `tenant`'s assets file `sha256`, as a stream, with the BLAKE3
    /// digest the source vouches for when it recorded one
    /// ([`ASSETS_BLAKE3`]).
    pub async fn assets(
        &self,
        tenant: &TenantId,
        sha256: &str,
    ) -> Result<(Option<String>, BodyStream), PeerError> {
        let response = self
            .send_for(
                "GET",
                &format!("/internal/tenants/{tenant}/assets/{sha256}"),
            )
            .await?;
        let blake3 = response
            .headers()
            .get(ASSETS_BLAKE3)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((blake3, response.into_body()))
    }

    /// The next round of session `session`, as a stream.
    pub async fn round(&self, session: &str) -> Result<BodyStream, PeerError> {
        self.send("GET", &format!("/internal/outbound/{session}/round"))
            .await
    }

    /// The final round of session `session` (the source freezes the
    /// tenant first), as a stream.
    pub async fn final_round(&self, session: &str) -> Result<BodyStream, PeerError> {
        self.send("POST", &format!("/internal/outbound/{session}/final"))
            .await
    }
}

/// Sends tenant requests on to other executors, as the proxy would have
/// (`crate::http`'s fence): the requests of a tenant that left this
/// executor, to the one it moved to. A proxy cut off from etcd may send a
/// moved tenant's every request this way, so connections are kept open
/// between them ([`FORWARD_IDLE_CONNECTIONS`] idle ones per executor, for
/// [`FORWARD_IDLE`]) rather than one made and closed for each, which would
/// hold a local port each for a minute after (TIME_WAIT).
#[derive(Debug)]
pub struct Forwarder {
    client: Client<HttpConnector, axum::body::Body>,
    token: String,
}

/// Idle connections a [`Forwarder`] keeps to each executor: 32.
const FORWARD_IDLE_CONNECTIONS: usize = 32;

/// How long a [`Forwarder`] keeps an idle connection: 30 s.
const FORWARD_IDLE: Duration = Duration::from_secs(30);

impl Forwarder {
    /// Sends with the internal `token`.
    pub fn new(token: &str) -> Forwarder {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(FORWARD_IDLE)
            .pool_max_idle_per_host(FORWARD_IDLE_CONNECTIONS)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Forwarder {
            client,
            token: token.to_string(),
        }
    }

    /// Sends tenant request `req` on to the executor at `to`, its body
    /// streamed as it arrives: the request's own headers (the tenant, the
    /// request id), the internal token, `epoch` as its placement epoch and
    /// `hops` as its hops. The answer, whatever its status, streamed as it
    /// arrives. Only the connection is bounded in time: an invocation's
    /// deadline bounds the rest, as it does when the proxy sends it.
    pub async fn send_on(
        &self,
        to: &str,
        req: Request<axum::body::Body>,
        epoch: i64,
        hops: u32,
    ) -> Result<hyper::Response<BodyStream>, PeerError> {
        let unreachable = |e: &dyn std::fmt::Display| PeerError::Unreachable {
            addr: to.to_string(),
            message: e.to_string(),
        };
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = format!("http://{to}{path}")
            .parse()
            .map_err(|e| unreachable(&e))?;
        let value =
            |v: String| hyper::header::HeaderValue::from_str(&v).map_err(|e| unreachable(&e));
        parts.headers.insert(HOST, value(to.to_string())?);
        parts
            .headers
            .insert(AUTHORIZATION, value(format!("Bearer {}", self.token))?);
        parts.headers.insert(
            tensor_wasm_shared::headers::EPOCH,
            value(epoch.to_string())?,
        );
        parts
            .headers
            .insert(tensor_wasm_shared::headers::HOPS, value(hops.to_string())?);
        self.client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|e| unreachable(&e))
    }
}

/// Longest wait for a connection to another executor: 5 s, past the
/// second resend of a lost SYN (after 1 s, then 3 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Feeds a streamed body into `tx`. Frames of at least [`WHOLE_FRAME`]
/// bytes go on as they are, without a copy; smaller ones (what one short
/// socket read brought) that are ready together are gathered into chunks of
/// up to [`crate::pipe::CHUNK`] bytes, so that the reading thread wakes
/// once per chunk rather than once per read.
pub async fn forward(body: BodyStream, tx: crate::pipe::ChunkSender) {
    use futures_util::FutureExt;
    let mut body = body;
    let mut gathered = bytes::BytesMut::new();
    let mut next = None;
    loop {
        let frame = match next.take() {
            Some(f) => f,
            None => body.frame().await,
        };
        match frame {
            Some(Ok(frame)) => {
                let data = frame.into_data().unwrap_or_default();
                if data.len() >= WHOLE_FRAME {
                    let gathered = (!gathered.is_empty()).then(|| gathered.split().freeze());
                    for chunk in gathered.into_iter().chain([data]) {
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                gathered.extend_from_slice(&data);
                if gathered.len() < crate::pipe::CHUNK {
                    // Another frame ready now joins this chunk.
                    if let Some(ready) = body.frame().now_or_never() {
                        next = Some(ready);
                        continue;
                    }
                }
                if !gathered.is_empty() && tx.send(Ok(gathered.split().freeze())).await.is_err() {
                    return;
                }
            }
            Some(Err(e)) => {
                let _ = tx.send(Err(std::io::Error::other(e))).await;
                return;
            }
            None => {
                if !gathered.is_empty() {
                    let _ = tx.send(Ok(gathered.split().freeze())).await;
                }
                return;
            }
        }
    }
}

/// Frames this large are handed on whole: 64 KiB.
const WHOLE_FRAME: usize = 64 << 10;
