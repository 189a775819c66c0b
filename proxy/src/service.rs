//! The public listener: pingora's `ProxyHttp` filled with the proxy's
//! decisions.
//!
//! The path of one request (`ARCHITECTURE.md` follows it end to end):
//!
//! 1. `request_filter`: give it a request id; answer `/healthz` and
//!    `/metrics` here; authenticate the bearer token to a tenant (401);
//!    refuse a tenant header the token may not act for (403); apply the
//!    tenant's rate limit (429 with `Retry-After`); answer any path outside
//!    the public API 404 (never forwarded); route it — placing a new
//!    tenant, holding it while it moves, refusing it at once with 503 when
//!    its executor is down.
//! 2. `upstream_peer`: the routed executor, over a pooled keep-alive
//!    connection.
//! 3. `upstream_request_filter`: replace the client's `authorization` with
//!    the internal token, set `x-tensor-wasm-tenant` and `x-request-id`.
//! 4. `response_filter`: add `x-request-id`; `Connection: close` while the
//!    process hands its sockets over.
//! 5. `logging`: metrics and the audit record; the request's lease on its
//!    tenant's gate is released when its context drops, right after.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use tensor_wasm_shared::audit::{AuditRecord, Outcome};
use tensor_wasm_shared::{ApiError, ErrorCode, TenantId, headers};

use crate::audit::AuditLog;
use crate::auth::{TokenTable, token_id};
use crate::fleet::{Fleet, Route};
use crate::metrics::ProxyMetrics;
use crate::ratelimit::RateLimits;
use crate::routes::{RouteName, classify, method_label};

/// The header naming a request's tenant to executors.
pub const TENANT_HEADER: &str = headers::TENANT;
/// The header carrying a request's id.
pub const REQUEST_ID_HEADER: &str = headers::REQUEST_ID;

/// How long to wait for an executor's TCP handshake; on loopback or a LAN
/// a live executor answers in microseconds, so a second means it is gone.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an idle upstream connection stays in the pool.
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

/// What the public listener shares between requests.
#[derive(Debug)]
pub struct Shared {
    pub tokens: RwLock<Arc<TokenTable>>,
    pub limits: RateLimits,
    pub fleet: Arc<Fleet>,
    pub metrics: Arc<ProxyMetrics>,
    pub audit: Option<Arc<AuditLog>>,
    ids: RequestIds,
    /// `Bearer <internal token>`, built once.
    internal_auth: String,
}

impl Shared {
    pub fn new(
        tokens: TokenTable,
        limits: RateLimits,
        fleet: Arc<Fleet>,
        metrics: Arc<ProxyMetrics>,
        audit: Option<Arc<AuditLog>>,
    ) -> Shared {
        let internal_auth = format!("Bearer {}", fleet.internal_token());
        Shared {
            internal_auth,
            tokens: RwLock::new(Arc::new(tokens)),
            limits,
            fleet,
            metrics,
            audit,
            ids: RequestIds::new(),
        }
    }

    /// Replaces the token table (SIGHUP).
    pub fn set_tokens(&self, tokens: TokenTable) {
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tokens);
    }

    fn tokens(&self) -> Arc<TokenTable> {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The id of a request that will have an audit record: the next in
    /// the process's sequence (`docs/AUDIT-LOG.md`, "Request ids").
    pub fn next_request_id(&self) -> String {
        self.ids.next()
    }

    /// The id of a request that has no audit record (health checks and
    /// metrics scrapes): outside the sequence, so that the audited ids stay
    /// gapless.
    pub fn next_quiet_id(&self) -> String {
        self.ids.next_quiet()
    }
}

/// Request ids: a random per-process prefix and a counter, so ids are
/// unique across restarts without a random draw per request. Audited
/// requests take `<prefix><8 hex digits>` from one counter, so that a gap
/// in the audit log's sequence is a lost record; unaudited ones take
/// `<prefix>q<n>` from another.
#[derive(Debug)]
struct RequestIds {
    prefix: u64,
    next: AtomicU64,
    next_quiet: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.write_u32(std::process::id());
        RequestIds {
            prefix: h.finish(),
            next: AtomicU64::new(0),
            next_quiet: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{:08x}", self.prefix, n as u32)
    }

    fn next_quiet(&self) -> String {
        let n = self.next_quiet.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}q{n}", self.prefix)
    }
}

/// Refused connections after which a request is answered 503 even if its
/// hold deadline has not passed.
const MAX_CONNECT_RETRIES: u8 = 8;

/// Times one request is sent again after an executor refused its
/// placement as stale; the hold deadline bounds them too.
const MAX_STALE_RETRIES: u8 = 8;

/// How long a request refused for a stale placement, `refusals` times so
/// far, waits for a newer placement before it is sent again where it was
/// routed: a snapshot pauses its tenant, and so does a move that is then
/// undone, and neither changes the placement. 40 ms, doubling with each
/// refusal: the waits between [`MAX_STALE_RETRIES`] refusals add up to
/// about 5 s, the default hold deadline.
fn stale_patience(refusals: u8) -> Duration {
    Duration::from_millis(40 << refusals.saturating_sub(1).min(6))
}

/// The public proxy service.
#[derive(Debug)]
pub struct PublicProxy {
    pub shared: Arc<Shared>,
}

/// One request's state across the filters.
#[derive(Debug)]
pub struct Ctx {
    arrived: Instant,
    arrived_at: SystemTime,
    request_id: String,
    name: RouteName,
    method: &'static str,
    tenant: Option<TenantId>,
    token_id: Option<String>,
    route: Option<Route>,
    /// The status of an answer the proxy wrote itself.
    status: u16,
    /// Skip the audit record (health and metrics scrapes).
    quiet: bool,
    /// Connections to its executor refused so far (retried while the
    /// executor may be restarting).
    connect_failures: u8,
    /// The client asked for a stream (`docs/API.md`, "Streaming").
    wants_stream: bool,
    /// The answer is a stream: watched to tell how it ends.
    stream: Option<StreamWatch>,
    /// The executor refused the request for a stale placement: the epoch
    /// it was routed by, until the retry routes it again.
    stale: Option<i64>,
    /// Requests refused so, so far: each retry waits for a newer placement.
    stale_refusals: u8,
}

/// What the proxy notes of a streamed answer as it passes: its bytes, and
/// the end of an event stream, where the outcome event is. The chunks pass
/// on at once, unbuffered.
#[derive(Debug, Default)]
struct StreamWatch {
    events: bool,
    bytes: u64,
    /// The last bytes of an event stream.
    tail: Vec<u8>,
    /// The executor's answer ended whole.
    ended: bool,
}

/// Bytes of an event stream's end kept: enough for an error event.
const STREAM_TAIL: usize = 8 << 10;

impl StreamWatch {
    fn saw(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        if self.events {
            self.tail.extend_from_slice(chunk);
            if self.tail.len() > STREAM_TAIL {
                self.tail.drain(..self.tail.len() - STREAM_TAIL);
            }
        }
    }

    /// How the stream ended: `error` is whether proxying failed, and
    /// `client` whether the client's side did.
    fn end(&self, error: Option<&Error>) -> tensor_wasm_shared::audit::StreamEnd {
        let (outcome, code) = match error {
            Some(e) if e.esource() == &ErrorSource::Downstream => ("client_gone", None),
            Some(_) => ("cut", None),
            None if !self.ended => ("cut", None),
            None if !self.events => ("ok", None),
            None => last_event(&self.tail),
        };
        tensor_wasm_shared::audit::StreamEnd {
            outcome: outcome.into(),
            code,
            bytes: self.bytes,
        }
    }
}

/// The outcome an event stream's last event gives: `end` is `ok`, `error`
/// is `error` with its code; anything else, the stream was cut.
fn last_event(tail: &[u8]) -> (&'static str, Option<String>) {
    let text = String::from_utf8_lossy(tail);
    let Some(at) = text.trim_end().rfind("event: ") else {
        return ("cut", None);
    };
    let last = &text[at..];
    if last.starts_with("event: end\n") {
        return ("ok", None);
    }
    if !last.starts_with("event: error\n") {
        return ("cut", None);
    }
    let data: String = last
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect::<Vec<_>>()
        .join("\n");
    let code = serde_json::from_str::<serde_json::Value>(&data)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    ("error", code)
}

impl PublicProxy {
    /// Writes a whole answer from the proxy itself.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        content_type: &str,
        body: Bytes,
        extra: &[(&'static str, String)],
    ) -> Result<()> {
        let mut h = ResponseHeader::build(status, Some(4 + extra.len()))?;
        h.insert_header("content-type", content_type)?;
        h.insert_header("content-length", body.len().to_string())?;
        h.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
        for (k, v) in extra {
            h.insert_header(*k, v.as_str())?;
        }
        ctx.status = status;
        session.write_response_header(Box::new(h), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }

    async fn answer_error(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        error: ApiError,
        extra: &[(&'static str, String)],
    ) -> Result<()> {
        let status = error.http_status();
        let body = serde_json::to_vec(&error.into_body()).unwrap_or_default();
        self.answer(
            session,
            ctx,
            status,
            "application/json",
            Bytes::from(body),
            extra,
        )
        .await
    }

    fn audit(
        &self,
        session: &Session,
        ctx: &Ctx,
        status: u16,
        stream: Option<tensor_wasm_shared::audit::StreamEnd>,
    ) {
        let Some(audit) = &self.shared.audit else {
            return;
        };
        audit.record(&AuditRecord {
            time: humantime::format_rfc3339_millis(ctx.arrived_at).to_string(),
            request_id: ctx.request_id.clone(),
            listener: "public".into(),
            tenant: ctx.tenant.as_ref().map(|t| t.to_string()),
            token_id: ctx.token_id.clone(),
            action: ctx.name.action.into(),
            resource: session.req_header().uri.path().to_string(),
            status,
            outcome: Outcome::of_status(status),
            latency_ms: ctx.arrived.elapsed().as_secs_f64() * 1e3,
            remote: session.client_addr().map(|a| a.to_string()),
            stream,
        });
    }
}

#[async_trait]
impl ProxyHttp for PublicProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            arrived: Instant::now(),
            arrived_at: SystemTime::now(),
            request_id: String::new(),
            name: classify("", ""),
            method: "other",
            tenant: None,
            token_id: None,
            route: None,
            status: 0,
            quiet: false,
            connect_failures: 0,
            wants_stream: false,
            stream: None,
            stale: None,
            stale_refusals: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        crate::conn::header_read(session);
        let shared = &self.shared;
        shared.metrics.in_flight.inc();
        let req = session.req_header();
        ctx.method = method_label(req.method.as_str());
        ctx.name = classify(req.method.as_str(), req.uri.path());
        // Health checks and scrapes are answered below without an audit
        // record.
        ctx.quiet = matches!(ctx.name.template, "/healthz" | "/metrics");
        ctx.request_id = match req
            .headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| headers::accept_request_id(v.as_bytes()))
        {
            Some(id) => id.to_string(),
            None if ctx.quiet => shared.next_quiet_id(),
            None => shared.next_request_id(),
        };
        ctx.wants_stream = req.headers.contains_key(headers::STREAM_HEADER)
            || req
                .headers
                .get_all("accept")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/octet-stream"));
        if self.shared.fleet.handing_off() {
            session.set_keepalive(None);
        }

        match ctx.name.template {
            "/healthz" => {
                self.answer(
                    session,
                    ctx,
                    200,
                    "text/plain",
                    Bytes::from_static(b"ok\n"),
                    &[],
                )
                .await?;
                return Ok(true);
            }
            "/metrics" => {
                let text = shared.metrics.render();
                self.answer(
                    session,
                    ctx,
                    200,
                    "text/plain; version=0.0.4",
                    Bytes::from(text),
                    &[],
                )
                .await?;
                return Ok(true);
            }
            _ => {}
        }

        // Authentication.
        let presented = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(TokenTable::bearer)
            .map(str::to_string);
        let tokens = shared.tokens();
        let who = presented
            .as_deref()
            .and_then(|p| tokens.authenticate(p.as_bytes()))
            .map(|(t, id)| (t.clone(), id.to_string()));
        let Some((tenant, tid)) = who else {
            ctx.token_id = presented.map(|p| token_id(p.as_bytes()));
            let msg = if ctx.token_id.is_some() {
                "the bearer token is not valid"
            } else {
                "a bearer token is required: Authorization: Bearer <token>"
            };
            self.answer_error(
                session,
                ctx,
                ApiError::new(ErrorCode::Unauthorized, msg),
                &[("www-authenticate", "Bearer".to_string())],
            )
            .await?;
            return Ok(true);
        };
        ctx.token_id = Some(tid);
        ctx.tenant = Some(tenant.clone());

        // Scope: a tenant header may only name the token's own tenant.
        if let Some(named) = session.req_header().headers.get(TENANT_HEADER)
            && named.as_bytes() != tenant.as_str().as_bytes()
        {
            self.answer_error(
                session,
                ctx,
                ApiError::new(
                    ErrorCode::TenantScopeDenied,
                    format!("this token acts for tenant {tenant} only"),
                ),
                &[],
            )
            .await?;
            return Ok(true);
        }

        // Rate limit.
        if let Err(wait) = shared.limits.check(&tenant) {
            shared.metrics.rate_limited.inc();
            let secs = RateLimits::retry_after_secs(wait);
            self.answer_error(
                session,
                ctx,
                ApiError::new(
                    ErrorCode::RateLimited,
                    format!("tenant {tenant} is over its rate limit; retry in {secs} s"),
                ),
                &[("retry-after", secs.to_string())],
            )
            .await?;
            return Ok(true);
        }

        // Only the public API goes on to an executor: its internal routes
        // (export, import, drop of any tenant) sit behind the internal token
        // that the proxy itself adds below.
        if ctx.name.template == "other" {
            self.answer_error(
                session,
                ctx,
                ApiError::new(ErrorCode::NotFound, "no such route"),
                &[],
            )
            .await?;
            return Ok(true);
        }

        // Route.
        match shared.fleet.route(&tenant).await {
            Ok(route) => {
                ctx.route = Some(route);
                Ok(false)
            }
            Err(e) => {
                let error = e.api_error();
                let extra = if error.http_status() == 503 {
                    vec![("retry-after", "1".to_string())]
                } else {
                    Vec::new()
                };
                tracing::warn!(tenant = %tenant, request_id = %ctx.request_id, error = %e, "request not routed");
                self.answer_error(session, ctx, error, &extra).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        // A retry after the executor refused a stale placement: wait for a
        // newer one, for a while ([`stale_patience`]) within the hold
        // deadline, and route again (`ARCHITECTURE.md`, "Fencing stale
        // proxies").
        if let Some(epoch) = ctx.stale.take() {
            let fleet = &self.shared.fleet;
            let until = tokio::time::Instant::from_std(ctx.arrived) + fleet.queue.deadline;
            let tenant = ctx
                .tenant
                .clone()
                .ok_or_else(|| Error::explain(InternalError, "a refused request had no tenant"))?;
            // The lease is given back first: a move of the tenant waits
            // for it before its gate closes.
            ctx.route = None;
            let patience =
                until.min(tokio::time::Instant::now() + stale_patience(ctx.stale_refusals));
            fleet.wait_newer(&tenant, epoch, patience).await;
            match fleet.route(&tenant).await {
                Ok(route) => ctx.route = Some(route),
                Err(e) => {
                    ctx.stale = Some(epoch);
                    return Err(Error::explain(
                        HTTPStatus(503),
                        format!("routing again after a stale placement: {e}"),
                    ));
                }
            }
            if tokio::time::Instant::now() >= until {
                ctx.stale = Some(epoch);
                return Err(Error::explain(
                    HTTPStatus(503),
                    "no newer placement within the hold deadline",
                ));
            }
        }
        let Some(route) = &ctx.route else {
            return Err(Error::explain(
                InternalError,
                "request reached upstream selection unrouted",
            ));
        };
        // A retry after a refused connection: the request never reached
        // the executor, so it waits for the executor's restart within the
        // hold deadline, as a moving tenant's requests wait for the move.
        if ctx.connect_failures > 0 {
            let hold = self.shared.fleet.queue.deadline;
            let until = tokio::time::Instant::from_std(ctx.arrived) + hold;
            if !route.executor.wait_recovered(hold, until).await {
                return Err(Error::explain(
                    ConnectRefused,
                    "the tenant's executor did not come back within the hold deadline",
                ));
            }
        }
        let mut peer = HttpPeer::new(route.executor.sock, false, String::new());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let tenant = ctx
            .tenant
            .as_ref()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default();
        upstream.remove_header("authorization");
        // Headers only a proxy or an executor sets, whatever a client
        // sent: a placement epoch of its own would fence its tenant's
        // later requests as stale, and hops would stop them being sent on.
        for internal in [headers::EPOCH, headers::HOPS, headers::MOVED_TO] {
            upstream.remove_header(internal);
        }
        upstream.insert_header("authorization", self.shared.internal_auth.as_str())?;
        upstream.insert_header(TENANT_HEADER, tenant)?;
        upstream.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
        if let Some(epoch) = ctx.route.as_ref().and_then(|r| r.epoch) {
            upstream.insert_header(headers::EPOCH, epoch.to_string())?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // The executor refused a placement it has moved past: nothing ran.
        // The request is sent again once the placement is newer
        // (`upstream_peer`); its answer never reaches the client.
        if upstream.status.as_u16() == ErrorCode::PlacementStale.http_status()
            && let Some(route) = &ctx.route
        {
            let epoch = route.epoch.unwrap_or(0);
            ctx.stale = Some(epoch);
            ctx.stale_refusals = ctx.stale_refusals.saturating_add(1);
            tracing::info!(request_id = %ctx.request_id, executor = %route.executor.id, epoch, "executor refused a stale placement; routing again");
            let mut e = Error::explain(
                HTTPStatus(421),
                format!(
                    "executor {} refused placement epoch {epoch}",
                    route.executor.id
                ),
            );
            e.set_retry(ctx.stale_refusals < MAX_STALE_RETRIES);
            return Err(e);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        response.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
        if self.shared.fleet.handing_off() {
            session.set_keepalive(None);
        }
        // A stream: an event stream, or a raw one (asked for, and of no
        // set length).
        let events = response
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let raw = ctx.wants_stream
            && response.status == 200
            && !response.headers.contains_key("content-length");
        if events || raw {
            ctx.stream = Some(StreamWatch {
                events,
                ..StreamWatch::default()
            });
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let Some(w) = &mut ctx.stream {
            if let Some(b) = body {
                w.saw(b);
            }
            w.ended |= end_of_stream;
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // A refused or timed-out handshake means the executor is gone: mark
        // it down now so its other tenants get 503 without trying, until
        // the health probe sees it again.
        if let Some(route) = &ctx.route
            && route.executor.set_healthy(false)
        {
            tracing::warn!(executor = %route.executor.id, peer = %peer, error = %e, "executor unreachable; marked down");
        }
        // Nothing reached the executor: try again once it is back
        // (`upstream_peer` waits for that, within the hold deadline).
        ctx.connect_failures = ctx.connect_failures.saturating_add(1);
        e.set_retry(ctx.connect_failures < MAX_CONNECT_RETRIES);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        // As pingora decides, but for every method: a request that failed
        // on a pooled connection before any answer (the executor closed
        // it, or died since it was pooled) is sent again on a fresh one,
        // where a refusal waits for the executor's restart
        // (`fail_to_connect`). Invocations are not idempotent, but an
        // executor that died with the request read lost what it did with
        // it: nothing is durable before a reply. (Once replies can follow
        // durable effects, such a resend needs an idempotency key.)
        let mut e = e.more_context(format!("Peer: {peer}"));
        if ctx.stale.is_some() {
            // Refused before it ran: sent again if its body can be.
            let again = ctx.stale_refusals < MAX_STALE_RETRIES
                && !session.as_ref().retry_buffer_truncated();
            e.set_retry(again);
        } else if session.as_ref().retry_buffer_truncated() {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy
    where
        Ctx: Send + Sync,
    {
        let code = match e.esource() {
            // Refused for a stale placement and not sent again (a body past
            // the retry buffer, or no newer placement in time): nothing
            // ran, so the client may send it again. The executor refuses
            // so for a move and for a snapshot's pause alike.
            _ if ctx.stale.is_some() => Some(ApiError::new(
                ErrorCode::TenantMoving,
                "the tenant was paused for a move or a snapshot and did not run again within the hold deadline; nothing ran, the request may be sent again",
            )),
            ErrorSource::Upstream => Some(ApiError::new(
                ErrorCode::ExecutorUnavailable,
                "the tenant's executor did not answer",
            )),
            ErrorSource::Downstream => match e.etype() {
                WriteError | ReadError | ConnectionClosed => None,
                _ => Some(ApiError::new(ErrorCode::InvalidInput, "malformed request")),
            },
            _ => match e.etype() {
                ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError => {
                    Some(ApiError::new(
                        ErrorCode::ExecutorUnavailable,
                        "the tenant's executor is unreachable",
                    ))
                }
                _ => Some(ApiError::new(ErrorCode::Internal, "the proxy failed")),
            },
        };
        let mut error_code = 0;
        if let Some(error) = &code {
            tracing::warn!(request_id = %ctx.request_id, error = %e, code = %error.code.as_str(), "request failed");
        }
        if let Some(error) = code {
            error_code = error.http_status();
            // The connection is not reused after a failure: say so, or a
            // client would send its next request into a closed socket.
            let mut extra = vec![("connection", "close".to_string())];
            if error_code == 503 {
                extra.push(("retry-after", "1".to_string()));
            }
            session.set_keepalive(None);
            if session.response_written().is_none()
                && let Err(we) = self.answer_error(session, ctx, error, &extra).await
            {
                tracing::debug!(error = %we, "error answer not written");
            }
        }
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        crate::conn::request_done(session);
        let m = &self.shared.metrics;
        m.in_flight.dec();
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(ctx.status);
        let buf = itoa_status(status);
        let status_label = std::str::from_utf8(&buf).unwrap_or("0");
        m.requests
            .with_label_values(&[ctx.method, ctx.name.template, status_label])
            .inc();
        let took = ctx.arrived.elapsed().as_secs_f64();
        m.duration
            .with_label_values(&[ctx.name.template])
            .observe(took);
        if let Some(route) = &ctx.route {
            let executor = route.executor.id.as_str();
            m.upstream_requests
                .with_label_values(&[executor, status_label])
                .inc();
            m.upstream_duration
                .with_label_values(&[executor])
                .observe(took);
        }
        let stream = ctx.stream.as_ref().map(|w| w.end(e));
        if let Some(end) = &stream {
            m.streams.with_label_values(&[end.outcome.as_str()]).inc();
            m.stream_duration.observe(took);
        }
        if !ctx.quiet {
            self.audit(session, ctx, status, stream);
        }
        ctx.route = None;
    }
}

/// A status code as three ASCII digits without allocating.
fn itoa_status(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}
