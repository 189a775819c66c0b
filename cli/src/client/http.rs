//! The one HTTP client of the client commands: a base URL, a bearer token
//! and a ureq agent, for the proxy's public API or its admin API.
//!
//! Every call ends in one of three ways, and [`HttpError`] keeps them apart
//! so that the message says what to do next:
//! 1. no answer (the fleet is not running, the URL is wrong, TLS failed):
//!    [`HttpError::Unreachable`], naming the URL and the variable to set;
//! 2. an answer with an error status: [`HttpError::Api`] carrying the API's
//!    own `{"error": {"code", "message"}}` (`docs/API.md`), its request id,
//!    and a hint for the codes a user can act on;
//! 3. a 2xx answer, handed back as bytes, JSON, or streamed to a sink.
//!
//! Bodies are sent from readers with an explicit `content-length`, so a
//! multi-GiB snapshot or a large module is streamed, never copied whole,
//! and a progress bar can follow it.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::de::DeserializeOwned;
use tensor_wasm_shared::ErrorCode;
use tensor_wasm_shared::error::{ApiError, ErrorBody};
use tensor_wasm_shared::names::env;

/// Time allowed to open a connection: 10 s, long enough for a remote
/// proxy, short enough that a wrong address fails while the user waits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read into memory: 4 GiB, the admin API's own body limit.
const MAX_ANSWER_BYTES: u64 = 4 << 30;
/// Bodies from this size up get a progress bar: 1 MiB; smaller ones are
/// over before a bar would be drawn.
pub const PROGRESS_FROM_BYTES: u64 = 1 << 20;
/// Characters of a non-JSON error body shown to the user.
const ERROR_BODY_PREVIEW: usize = 500;

/// A setting as messages name it: `ENV_VAR (--flag)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    env: &'static str,
    flag: &'static str,
}

impl Setting {
    pub const fn new(env: &'static str, flag: &'static str) -> Setting {
        Setting { env, flag }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.env, self.flag)
    }
}

/// Which API an [`Endpoint`] speaks to; names it in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// The proxy's public API (tenant token).
    Public,
    /// The proxy's admin API (admin token).
    Admin,
}

impl Service {
    fn url_setting(self) -> Setting {
        match self {
            Service::Public => Setting::new(env::URL, "--url"),
            Service::Admin => Setting::new(env::ADMIN_URL, "--admin-url"),
        }
    }

    fn token_setting(self) -> Setting {
        match self {
            Service::Public => Setting::new(env::TOKEN, "--token"),
            Service::Admin => Setting::new(env::ADMIN_TOKEN, "--admin-token"),
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Service::Public => "the proxy",
            Service::Admin => "the admin API",
        })
    }
}

/// Why a call to the fleet failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No token was given and none was found in the state directory.
    #[error(
        "no {what}: set {setting}, or run `tensor-wasm up` first (it writes {})",
        path.display()
    )]
    NoToken {
        what: &'static str,
        setting: Setting,
        path: PathBuf,
    },
    /// The token file exists but cannot be read or is empty.
    #[error("cannot read the {what} from {}: {reason}", path.display())]
    TokenFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// A URL that is not `http://` or `https://`.
    #[error("{url:?} is not an http:// or https:// URL; set {setting}")]
    BadUrl { url: String, setting: Setting },
    /// `--ca-cert` could not be used.
    #[error("--ca-cert {}: {reason}", path.display())]
    CaCert { path: PathBuf, reason: String },
    /// No answer came.
    #[error("cannot reach {service} at {url}: {source}; {hint}")]
    Unreachable {
        service: Service,
        url: String,
        hint: String,
        #[source]
        source: ureq::Error,
    },
    /// The API answered with an error.
    #[error("{error} (HTTP {status}{}){}", request_id.as_deref().map(|r| format!(", request {r}")).unwrap_or_default(), hint.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
    Api {
        status: u16,
        error: ApiError,
        request_id: Option<String>,
        hint: Option<String>,
    },
    /// An error status without the API's error body (a proxy in between,
    /// a wrong URL).
    #[error("HTTP {status} from {url}: {body}")]
    Status {
        status: u16,
        url: String,
        body: String,
    },
    /// The answer broke off.
    #[error("reading the answer from {url}: {source}")]
    Read {
        url: String,
        #[source]
        source: ureq::Error,
    },
    /// Streaming an answer to a file failed.
    #[error("writing the answer from {url}: {source}")]
    Sink {
        url: String,
        #[source]
        source: io::Error,
    },
    /// A 2xx answer that is not the JSON this client expects.
    #[error("{url}: unexpected answer ({source}); is {setting} the right URL?")]
    Decode {
        url: String,
        setting: Setting,
        #[source]
        source: serde_json::Error,
    },
}

/// A request body.
pub enum Body {
    /// No body (GET, DELETE).
    None,
    /// Bytes in memory.
    Bytes { content_type: String, data: Vec<u8> },
    /// `len` bytes from `reader`, with a progress bar labelled `label` when
    /// large.
    Stream {
        content_type: String,
        len: u64,
        reader: Box<dyn Read + Send>,
        label: String,
    },
}

impl Body {
    /// A JSON body.
    pub fn json(value: &serde_json::Value) -> Body {
        Body::Bytes {
            content_type: "application/json".into(),
            data: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    /// An empty POST body.
    pub fn empty() -> Body {
        Body::Bytes {
            content_type: "application/octet-stream".into(),
            data: Vec::new(),
        }
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Body::None => f.write_str("None"),
            Body::Bytes { content_type, data } => {
                write!(f, "Bytes({content_type}, {} bytes)", data.len())
            }
            Body::Stream {
                content_type, len, ..
            } => write!(f, "Stream({content_type}, {len} bytes)"),
        }
    }
}

/// A 2xx answer read whole.
#[derive(Debug)]
pub struct Reply {
    /// The media type, without parameters (`application/json`).
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as `T`.
    pub fn json<T: DeserializeOwned>(&self, ep: &Endpoint) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|source| HttpError::Decode {
            url: ep.base.clone(),
            setting: ep.service.url_setting(),
            source,
        })
    }
}

/// One API: where it is, how to authenticate, the agent that calls it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub base: String,
    pub service: Service,
    token: Option<String>,
    agent: ureq::Agent,
}

/// How endpoints connect: TLS roots and the answer deadline.
#[derive(Clone, Debug, Default)]
pub struct Transport {
    /// PEM certificates to trust instead of the built-in roots.
    pub ca_cert: Option<PathBuf>,
    /// Longest wait for an answer once the request is sent; `None`: no
    /// limit.
    pub timeout: Option<Duration>,
}

impl Transport {
    fn agent(&self) -> Result<ureq::Agent, HttpError> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_recv_response(self.timeout)
            .user_agent(format!(
                "tensor-wasm/{}",
                tensor_wasm_shared::build::VERSION
            ));
        if let Some(path) = &self.ca_cert {
            config = config.tls_config(tls_roots(path)?);
        }
        Ok(config.build().into())
    }
}

#[cfg(feature = "tls")]
fn tls_roots(path: &std::path::Path) -> Result<ureq::tls::TlsConfig, HttpError> {
    use std::sync::Arc;
    use ureq::tls::{PemItem, RootCerts, TlsConfig};
    let bad = |reason: String| HttpError::CaCert {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let PemItem::Certificate(c) = item.map_err(|e| bad(e.to_string()))? {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        return Err(bad("no PEM certificate in the file".into()));
    }
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(certs)))
        .build())
}

#[cfg(not(feature = "tls"))]
fn tls_roots(path: &std::path::Path) -> Result<ureq::tls::TlsConfig, HttpError> {
    Err(HttpError::CaCert {
        path: path.to_path_buf(),
        reason: "this binary was built without the `tls` feature".into(),
    })
}

impl Endpoint {
    /// An endpoint at `base` (`http://host:port`), with `token` sent as
    /// the bearer token when given.
    pub fn new(
        service: Service,
        base: &str,
        token: Option<String>,
        transport: &Transport,
    ) -> Result<Endpoint, HttpError> {
        let base = base.trim().trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(HttpError::BadUrl {
                url: base,
                setting: service.url_setting(),
            });
        }
        Ok(Endpoint {
            base,
            service,
            token,
            agent: transport.agent()?,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request; any answer, whatever its status, is `Ok`.
    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<ureq::http::Response<ureq::Body>, HttpError> {
        let url = self.url(path);
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let bad_url = |e: ureq::http::Error| HttpError::BadUrl {
            url: format!("{url} ({e})"),
            setting: self.service.url_setting(),
        };
        let sent = match body {
            Body::None => {
                let req = req.body(ureq::SendBody::none()).map_err(bad_url)?;
                self.agent.run(req)
            }
            Body::Bytes { content_type, data } => {
                let req = req
                    .header("content-type", content_type)
                    .body(data)
                    .map_err(bad_url)?;
                self.agent.run(req)
            }
            Body::Stream {
                content_type,
                len,
                reader,
                label,
            } => {
                let bar = progress(len, &label);
                let reader = Progress {
                    inner: reader,
                    bar: bar.clone(),
                };
                let req = req
                    .header("content-type", content_type)
                    .header("content-length", len)
                    .body(ureq::SendBody::from_owned_reader(reader))
                    .map_err(bad_url)?;
                let sent = self.agent.run(req);
                bar.finish_and_clear();
                sent
            }
        };
        sent.map_err(|source| self.unreachable(&url, source))
    }

    fn unreachable(&self, url: &str, source: ureq::Error) -> HttpError {
        let hint = if source.to_string().contains("certificate") {
            format!(
                "the server's certificate is not trusted: pass the CA certificate that signed it \
                 with {}",
                Setting::new(env::CA_CERT, "--ca-cert")
            )
        } else {
            format!(
                "is the fleet running? Start one with `tensor-wasm up`, or set {}",
                self.service.url_setting()
            )
        };
        HttpError::Unreachable {
            service: self.service,
            url: url.to_string(),
            hint,
            source,
        }
    }

    /// One call; a non-2xx answer is an error carrying the API's code.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<Reply, HttpError> {
        let resp = self.send(method, path, headers, body)?;
        self.check(resp, &self.url(path))
    }

    /// One call whose 2xx answer is read as it arrives (a stream); an
    /// error answer is the API's error.
    pub fn open(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<ureq::http::Response<ureq::Body>, HttpError> {
        let resp = self.send(method, path, headers, body)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let url = self.url(path);
        self.check(resp, &url)?;
        Err(HttpError::Status {
            status: 0,
            url,
            body: "an error answer that did not read as one".into(),
        })
    }

    /// One call; answers with one of the `ok` statuses also come back as
    /// `Ok` (the drain route answers 502 with its report).
    pub fn call_allowing(
        &self,
        method: &str,
        path: &str,
        body: Body,
        ok: &[u16],
    ) -> Result<Reply, HttpError> {
        let resp = self.send(method, path, &[], body)?;
        let url = self.url(path);
        if ok.contains(&resp.status().as_u16()) {
            return read_reply(resp, &url);
        }
        self.check(resp, &url)
    }

    /// Reads a 2xx answer whole, or turns an error answer into its error.
    fn check(&self, resp: ureq::http::Response<ureq::Body>, url: &str) -> Result<Reply, HttpError> {
        let status = resp.status().as_u16();
        let request_id = header(&resp, "x-request-id");
        let retry_after = header(&resp, "retry-after");
        let reply = read_reply(resp, url)?;
        if (200..300).contains(&status) {
            return Ok(reply);
        }
        match serde_json::from_slice::<ErrorBody>(&reply.body) {
            Ok(ErrorBody { error }) => {
                let hint = hint(self.service, error.code, retry_after.as_deref());
                Err(HttpError::Api {
                    status,
                    error,
                    request_id,
                    hint,
                })
            }
            Err(_) => {
                let text = String::from_utf8_lossy(&reply.body);
                let mut body: String = text.trim().chars().take(ERROR_BODY_PREVIEW).collect();
                if body.is_empty() {
                    body = "(empty body)".into();
                }
                Err(HttpError::Status {
                    status,
                    url: url.to_string(),
                    body,
                })
            }
        }
    }

    /// `GET path` as JSON.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, HttpError> {
        self.call("GET", path, &[("accept", "application/json")], Body::None)?
            .json(self)
    }

    /// `method path` with `body`, answered with JSON.
    pub fn send_json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Body,
    ) -> Result<T, HttpError> {
        self.call(method, path, &[("accept", "application/json")], body)?
            .json(self)
    }

    /// Sends a request and streams a 2xx answer's body into `sink`, with a
    /// progress bar labelled `label` when it is large; the bytes written.
    pub fn download(
        &self,
        method: &str,
        path: &str,
        body: Body,
        sink: &mut dyn Write,
        label: &str,
    ) -> Result<u64, HttpError> {
        let url = self.url(path);
        let resp = self.send(method, path, &[], body)?;
        if !resp.status().is_success() {
            // An error answer: `check` turns it into the API's error.
            self.check(resp, &url)?;
            return Ok(0);
        }
        let len = resp.body().content_length();
        let bar = progress(len.unwrap_or(0), label);
        let mut reader = resp.into_body().into_with_config().limit(u64::MAX).reader();
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    bar.finish_and_clear();
                    return Err(HttpError::Read {
                        url,
                        source: ureq::Error::Io(e),
                    });
                }
            };
            if let Err(source) = sink.write_all(&buf[..n]) {
                bar.finish_and_clear();
                return Err(HttpError::Sink { url, source });
            }
            total += n as u64;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        Ok(total)
    }
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn read_reply(mut resp: ureq::http::Response<ureq::Body>, url: &str) -> Result<Reply, HttpError> {
    let content_type = header(&resp, "content-type")
        .map(|ct| media_type(&ct).to_ascii_lowercase())
        .unwrap_or_default();
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES)
        .read_to_vec()
        .map_err(|source| HttpError::Read {
            url: url.to_string(),
            source,
        })?;
    Ok(Reply { content_type, body })
}

/// The media type of a `Content-Type` value, without parameters.
pub fn media_type(value: &str) -> &str {
    value.split(';').next().unwrap_or("").trim()
}

/// What the user can do about an error code, where there is something.
fn hint(service: Service, code: ErrorCode, retry_after: Option<&str>) -> Option<String> {
    let retry = retry_after.map(|s| format!("retry in {s} s"));
    match code {
        ErrorCode::Unauthorized => Some(format!("check {}", service.token_setting())),
        ErrorCode::TenantScopeDenied => Some(format!(
            "{} may not act for that tenant",
            service.token_setting()
        )),
        ErrorCode::FunctionNotFound => Some("see `tensor-wasm functions ls`".into()),
        ErrorCode::JobNotFound => Some("see `tensor-wasm jobs ls`".into()),
        ErrorCode::FunctionExists => {
            Some("add --replace to replace it (its id stays the same)".into())
        }
        ErrorCode::RateLimited
        | ErrorCode::ExecutorUnavailable
        | ErrorCode::CapacityExhausted
        | ErrorCode::TenantMoving => retry,
        _ => None,
    }
}

/// A progress bar on stderr for `len` bytes; hidden when `len` is small
/// or stderr is not a terminal.
pub fn progress(len: u64, label: &str) -> ProgressBar {
    if len < PROGRESS_FROM_BYTES {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(label.to_string());
    bar
}

/// A reader that moves a progress bar.
struct Progress {
    inner: Box<dyn Read + Send>,
    bar: ProgressBar,
}

impl Read for Progress {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// Percent-encodes `s` for a path segment or a query value: everything but
/// RFC 3986's unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_everything_but_unreserved() {
        assert_eq!(encode("digits-v1.2_x~"), "digits-v1.2_x~");
        assert_eq!(encode("a b/c?d&e=é"), "a%20b%2Fc%3Fd%26e%3D%C3%A9");
        assert_eq!(encode(".."), "..");
    }

    #[test]
    fn urls_must_be_http() {
        let t = Transport::default();
        assert!(Endpoint::new(Service::Public, "http://127.0.0.1:8080/", None, &t).is_ok());
        let e = Endpoint::new(Service::Admin, "127.0.0.1:9090", None, &t).unwrap_err();
        assert!(e.to_string().contains("TENSOR_WASM_ADMIN_URL"), "{e}");
    }

    #[test]
    fn api_errors_read_as_code_message_and_hint() {
        let e = HttpError::Api {
            status: 404,
            error: ApiError::new(ErrorCode::FunctionNotFound, "no function f-1"),
            request_id: Some("r-7".into()),
            hint: hint(Service::Public, ErrorCode::FunctionNotFound, None),
        };
        assert_eq!(
            e.to_string(),
            "function_not_found: no function f-1 (HTTP 404, request r-7); see `tensor-wasm functions ls`"
        );
        assert_eq!(
            hint(Service::Public, ErrorCode::RateLimited, Some("2")).as_deref(),
            Some("retry in 2 s")
        );
        assert!(
            hint(Service::Admin, ErrorCode::Unauthorized, None)
                .unwrap()
                .contains("TENSOR_WASM_ADMIN_TOKEN")
        );
    }
}
