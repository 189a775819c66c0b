//! The proxy's own calls to executors: health probes, `/internal/info`, and
//! the export/import/thaw/drop steps of a migration.
//!
//! Client traffic never goes through here (pingora forwards it). These
//! calls are few, so each opens its own HTTP/1.1 connection: no pool means
//! no connection tied to one runtime, and a dead executor is seen at once
//! as a refused connection rather than as a stale pooled socket.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use tensor_wasm_shared::ErrorCode;
use tensor_wasm_shared::error::ErrorBody;

/// Why a call to an executor gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("executor at {addr} unreachable: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("executor at {addr}: {message}")]
    Http { addr: String, message: String },
    #[error("executor at {addr} did not answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    /// The executor answered with an error status. `code` is `None` when
    /// the body was not an error envelope with a code this build knows.
    #[error("executor at {addr} answered {status}: {} {message}", code.map_or("(no code)", ErrorCode::as_str))]
    Status {
        addr: String,
        status: u16,
        code: Option<ErrorCode>,
        message: String,
    },
}

impl UpstreamError {
    /// The executor's error `code`, when it answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            UpstreamError::Status { code, .. } => *code,
            _ => None,
        }
    }

    /// True when the executor could not be reached at all.
    pub fn is_unreachable(&self) -> bool {
        !matches!(self, UpstreamError::Status { .. })
    }
}

/// One executor, as the proxy calls it.
#[derive(Clone, Debug)]
pub struct ExecutorClient {
    pub addr: String,
    token: String,
}

impl ExecutorClient {
    pub fn new(addr: &str, internal_token: &str) -> ExecutorClient {
        ExecutorClient {
            addr: addr.to_string(),
            token: internal_token.to_string(),
        }
    }

    /// `GET path`, the body of a 2xx answer.
    pub async fn get(&self, path: &str, timeout: Duration) -> Result<Bytes, UpstreamError> {
        self.call("GET", path, Bytes::new(), timeout).await
    }

    /// `POST path` with `body`, the body of a 2xx answer.
    pub async fn post(
        &self,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, UpstreamError> {
        self.call("POST", path, body, timeout).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str, timeout: Duration) -> Result<Bytes, UpstreamError> {
        self.call("DELETE", path, Bytes::new(), timeout).await
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, UpstreamError> {
        match tokio::time::timeout(timeout, self.call_inner(method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout {
                addr: self.addr.clone(),
                after: timeout,
            }),
        }
    }

    async fn call_inner(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<Bytes, UpstreamError> {
        let http = |e: &dyn std::fmt::Display| UpstreamError::Http {
            addr: self.addr.clone(),
            message: e.to_string(),
        };
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|source| UpstreamError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(&e))?;
        let conn = tokio::spawn(conn);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.addr)
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(body))
            .map_err(|e| http(&e))?;
        let response = sender.send_request(request).await.map_err(|e| http(&e))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| http(&e))?
            .to_bytes();
        drop(sender);
        conn.abort();
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => (Some(b.error.code), b.error.message),
            Err(_) => (
                None,
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
            ),
        };
        Err(UpstreamError::Status {
            addr: self.addr.clone(),
            status,
            code,
            message,
        })
    }
}
