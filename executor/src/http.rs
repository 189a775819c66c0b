//! The executor's HTTP API (`docs/API.md`, "Internal API"): the public
//! routes scoped by `x-tensor-wasm-tenant`, the internal routes, `/healthz`
//! and `/metrics`.
//!
//! Every route but `/healthz` and `/metrics` needs the internal token; the
//! proxy is the only intended caller. Every response carries `x-request-id`
//! (the caller's, if `headers::accept_request_id` of tensor-wasm-shared
//! keeps it, else a fresh one), and every error is the JSON body
//! `{"error": {"code", "message"}}` with the status its code fixes.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tensor_wasm_shared::TenantId;
use tensor_wasm_shared::api::{
    DeviceDescription, ExecutorInfo, ExecutorStats, FunctionConfig, FunctionInfo, FunctionList,
    JobInfo, JobList, JobStatus,
};
use tensor_wasm_shared::identity::{self, Challenge, Identity};
use tensor_wasm_shared::{ErrorCode, headers};

use crate::assets::{AssetError, StagedAsset};
use crate::body::{self, RequestBody, media_type};
use crate::error::ExecError;
use crate::metrics::Metrics;
use crate::registry::{Registry, Target};
use crate::state::{AssetSource, Registration};
use tensor_wasm_shared::snapshot::stream::StreamKind;

/// Header naming the tenant a request acts for.
pub const TENANT_HEADER: &str = headers::TENANT;
/// Header carrying the request id.
pub const REQUEST_ID_HEADER: &str = headers::REQUEST_ID;
/// Slack over the body quota for a multipart envelope's own bytes: 64 KiB.
const MULTIPART_OVERHEAD: usize = 64 << 10;

/// What the HTTP layer serves from.
#[derive(Debug)]
pub struct App {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub internal_token: String,
    pub id: String,
    pub addr: String,
    pub version: String,
    pub device: DeviceDescription,
    /// Placement epochs of the tenants routed here.
    pub fences: crate::fence::Fences,
    /// Sends requests of tenants that left on to where they went.
    pub forwarder: crate::peer::Forwarder,
}

impl IntoResponse for ExecError {
    fn into_response(self) -> Response {
        let api = self.to_api();
        let status =
            StatusCode::from_u16(api.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let code = api.code;
        let mut resp = (status, axum::Json(api.into_body())).into_response();
        // For middleware that acts on what went wrong (`fence`).
        resp.extensions_mut().insert(code);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A query string, refused with a typed `invalid_input` error (axum's own
/// rejection is plain text).
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ExecError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| ExecError::InvalidInput(format!("query string: {}", e.body_text())))
    }
}

/// A path parameter, refused with a typed `invalid_input` error.
#[derive(Debug, Clone)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ExecError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| ApiPath(p))
            .map_err(|e| ExecError::InvalidInput(format!("path: {}", e.body_text())))
    }
}

/// The tenant of a request, from `x-tensor-wasm-tenant`.
#[derive(Debug, Clone)]
pub struct Tenant(pub TenantId);

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ExecError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Tenant::from_headers(&parts.headers)
    }
}

impl Tenant {
    fn from_headers(headers: &HeaderMap) -> Result<Tenant, ExecError> {
        let raw = headers
            .get(TENANT_HEADER)
            .ok_or_else(|| ExecError::InvalidInput(format!("missing {TENANT_HEADER}")))?;
        let s = raw
            .to_str()
            .map_err(|_| ExecError::InvalidInput(format!("{TENANT_HEADER} is not text")))?;
        TenantId::new(s)
            .map(Tenant)
            .map_err(|e| ExecError::InvalidInput(format!("{TENANT_HEADER}: {e}")))
    }
}

/// The routes, with auth and request ids.
pub fn router(app: Arc<App>) -> Router {
    let authed = Router::new()
        .route("/functions", post(register).get(list))
        .route("/functions/{id}", get(show).delete(remove))
        .route("/functions/{id}/logs", get(logs))
        .route("/functions/{id}/invoke", post(invoke))
        .route("/functions/{id}/invoke-async", post(invoke_async))
        .route("/jobs", get(list_jobs))
        .route("/jobs/{id}", get(get_job).delete(delete_job))
        .route_layer(middleware::from_fn_with_state(app.clone(), fence));
    let internal = Router::new()
        .route("/internal/info", get(info))
        .route("/internal/tenants/{tenant}/export", post(export_tenant))
        .route("/internal/tenants/{tenant}/import", post(import_tenant))
        .route("/internal/tenants/{tenant}/thaw", post(thaw_tenant))
        .route("/internal/tenants/{tenant}/modules", get(tenant_modules))
        .route(
            "/internal/tenants/{tenant}/modules/{id}",
            get(tenant_module),
        )
        .route("/internal/modules", post(precompile))
        .route("/internal/tenants/{tenant}/outbound", post(start_outbound))
        .route(
            "/internal/outbound/{session}",
            get(outbound_manifest).delete(end_outbound),
        )
        .route("/internal/outbound/{session}/round", get(outbound_round))
        .route("/internal/outbound/{session}/final", post(outbound_final))
        .route(
            "/internal/tenants/{tenant}/assets/{sha256}",
            get(tenant_assets),
        )
        .route(
            "/internal/tenants/{tenant}/inbound",
            post(pull_inbound).delete(discard_inbound),
        )
        .route(
            "/internal/tenants/{tenant}/inbound/commit",
            post(commit_inbound),
        )
        .route(
            "/internal/tenants/{tenant}",
            axum::routing::delete(drop_tenant),
        )
        .route_layer(middleware::from_fn(refuse_tenant_traffic));
    let authed = authed
        .merge(internal)
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/internal/identity", post(identity))
        .merge(authed)
        .fallback(|| async { ExecError::NotFound("route".into()) })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ExecError::MethodNotAllowed(method.to_string())
        })
        .layer(middleware::from_fn(request_id))
        .with_state(app)
}

async fn request_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .filter(|v| headers::accept_request_id(v.as_bytes()).is_some())
        .cloned()
        .unwrap_or_else(|| {
            let mut b = [0u8; 8];
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
            HeaderValue::from_str(&hex::encode(b)).unwrap_or(HeaderValue::from_static("0"))
        });
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(REQUEST_ID_HEADER, id);
    resp
}

/// The internal routes are the control plane's (the proxy's migrations and
/// probes, operators' tools). A request naming a tenant in
/// `x-tensor-wasm-tenant` is tenant traffic that the proxy forwarded; it
/// never reaches them, even if a proxy were to forward such a path.
async fn refuse_tenant_traffic(req: Request, next: Next) -> Response {
    if req.headers().contains_key(TENANT_HEADER) {
        return ExecError::NotFound("route".into()).into_response();
    }
    next.run(req).await
}

/// Refuses tenant traffic routed by a stale placement (`crate::fence`).
///
/// A tenant frozen after the request was admitted here (a snapshot or a
/// move began meanwhile) refuses it with `tenant_frozen` before it runs;
/// that too is answered `placement_stale`, so that the proxy sends it
/// again once the tenant runs, here or where it moved, rather than fail it.
///
/// A request of a tenant that left here by a newer placement is sent on,
/// its body unread, to the executor the tenant moved to ([`send_on`]),
/// when the drop named it.
///
/// A request whose body the proxy may not have kept to send again (past
/// [`headers::RESEND_BODY_LIMIT`], or of no stated length) is not refused
/// for its tenant's pause: it waits, its body unread, for at most
/// [`HOLD_LIMIT`], until the tenant runs here again (a snapshot's end, a
/// move undone), and runs; or until the tenant has left, and is then sent
/// on. An invocation whose tenant froze after it was let in is handled
/// alike once its body is read ([`ReadRequest::run`]).
///
/// The request carries on its epoch ([`RoutedBy`]) for the handlers that
/// may make the tenant here, which ask the fence again then.
async fn fence(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let Some(epoch) = req.headers().get(headers::EPOCH) else {
        return next.run(req).await;
    };
    let routed = epoch_of(epoch).and_then(|epoch| {
        let tenant = Tenant::from_headers(req.headers())?.0;
        Ok((tenant, epoch))
    });
    let (tenant, epoch) = match routed {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Err(refused) = admit_routed(&app, &tenant, epoch) {
        // The tenant left by a newer placement: whatever its body, the
        // request goes on to where it went, so that a proxy whose table
        // is behind (cut off from etcd) still serves it.
        if let Some((to, epoch)) = app.fences.moved_to(&tenant, epoch) {
            return send_on(&app, req, &tenant, &to, epoch).await;
        }
        if resendable(req.headers()) {
            return refused.into_response();
        }
        match hold(&app, &tenant, epoch, refused).await {
            Held::Runs => {}
            Held::Moved { to, epoch } => return send_on(&app, req, &tenant, &to, epoch).await,
            Held::Refused(e) => return e.into_response(),
        }
    }
    req.extensions_mut().insert(RoutedBy(epoch));
    let resp = next.run(req).await;
    if resp.extensions().get::<ErrorCode>() == Some(&ErrorCode::TenantFrozen) {
        return ExecError::PlacementStale(format!(
            "tenant {tenant}: it was frozen here before this request ran"
        ))
        .into_response();
    }
    resp
}

/// Longest a routed request whose body cannot be sent again waits for its
/// tenant's pause to end here: 5 s, the proxy's default hold deadline
/// (`--queue-deadline-ms`, `docs/CONFIG.md`).
const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The fence's verdict on a request of `tenant` routed by `epoch`.
fn admit_routed(app: &App, tenant: &TenantId, epoch: i64) -> Result<(), ExecError> {
    let frozen = app
        .registry
        .existing_tenant(tenant)
        .is_some_and(|t| t.is_frozen());
    app.fences.admit(tenant, epoch, frozen)
}

/// Whether the proxy kept the whole body of a request it forwarded, to
/// send it again: none, or a stated length within
/// [`headers::RESEND_BODY_LIMIT`].
fn resendable(h: &HeaderMap) -> bool {
    if h.contains_key(header::TRANSFER_ENCODING) {
        return false;
    }
    match h.get(header::CONTENT_LENGTH) {
        None => true,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n <= headers::RESEND_BODY_LIMIT),
    }
}

/// What became of a routed request held through its tenant's pause.
enum Held {
    /// The tenant runs here again, and the fence let the request in.
    Runs,
    /// The tenant left for the executor at `to`, placed there by `epoch`.
    Moved { to: String, epoch: i64 },
    /// Refused as the fence first refused it: the tenant neither ran again
    /// nor left for a named executor within [`HOLD_LIMIT`], or the request
    /// was stale for another reason (a newer epoch seen here).
    Refused(ExecError),
}

/// Holds a request of `tenant` routed by `epoch`, which the fence refused
/// (`refused`), until the fence lets it in or its tenant has left for a
/// named executor, for at most [`HOLD_LIMIT`]; counted and logged.
async fn hold(app: &App, tenant: &TenantId, epoch: i64, refused: ExecError) -> Held {
    let started = Instant::now();
    let held = hold_until(app, tenant, epoch, refused).await;
    let outcome = match held {
        Held::Runs => "ran",
        Held::Moved { .. } => "sent_on",
        Held::Refused(_) => "refused",
    };
    app.metrics
        .held_requests
        .with_label_values(&[outcome])
        .inc();
    if matches!(held, Held::Runs) {
        let waited_ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::info!(%tenant, epoch, waited_ms, "a request held through its tenant's pause was let in");
    }
    held
}

/// [`hold`], uncounted.
async fn hold_until(app: &App, tenant: &TenantId, epoch: i64, mut refused: ExecError) -> Held {
    let deadline = tokio::time::Instant::now() + HOLD_LIMIT;
    loop {
        if let Some((to, epoch)) = app.fences.moved_to(tenant, epoch) {
            return Held::Moved { to, epoch };
        }
        let paused = app
            .registry
            .existing_tenant(tenant)
            .filter(|t| t.is_frozen() && !t.is_removed());
        let Some(t) = paused else {
            // Not paused here: stale for a reason a wait does not end.
            return Held::Refused(refused);
        };
        if !t.wait_unfrozen(deadline).await {
            return Held::Refused(refused);
        }
        match admit_routed(app, tenant, epoch) {
            Ok(()) => return Held::Runs,
            Err(e) => refused = e,
        }
        if tokio::time::Instant::now() >= deadline {
            return Held::Refused(refused);
        }
    }
}

/// Sends `req` of a tenant that left here on to the executor at `to`
/// where the placement of `epoch` put the tenant, and answers what it
/// answers. A request sent on [`headers::MAX_HOPS`] times already, or that
/// cannot reach `to`, is refused as stale: nothing ran.
async fn send_on(app: &App, req: Request, tenant: &TenantId, to: &str, epoch: i64) -> Response {
    let hops = req
        .headers()
        .get(headers::HOPS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    let stale = |why: String| ExecError::PlacementStale(format!("tenant {tenant}: {why}"));
    let count = |outcome: &str| {
        app.metrics
            .sent_on_requests
            .with_label_values(&[outcome])
            .inc();
    };
    if hops >= headers::MAX_HOPS {
        count("refused");
        return stale(format!(
            "it moved to {to}, and this request was sent on {hops} times already"
        ))
        .into_response();
    }
    let request_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    match app.forwarder.send_on(to, req, epoch, hops + 1).await {
        Ok(resp) => {
            count("answered");
            // Every request of a proxy cut off from etcd may come this
            // way: one line each at debug, the metric counts them.
            tracing::debug!(%tenant, to, epoch, request_id, status = resp.status().as_u16(), "a request of a tenant that left was sent on to where its tenant moved");
            resp.map(Body::new)
        }
        Err(e) => {
            count("refused");
            tracing::warn!(%tenant, to, epoch, request_id, error = %e, "a request of a tenant that left could not be sent on");
            stale(format!(
                "it moved to {to}, which this request could not reach: {e}"
            ))
            .into_response()
        }
    }
}

/// The placement epoch a request was routed by, as the fence admitted it.
#[derive(Clone, Copy, Debug)]
struct RoutedBy(i64);

/// The check a handler that may make `tenant` here asks just before it
/// does (`Registry::tenant_or_create_fenced`): the tenant may have moved
/// away since the request was let in, while its body arrived.
fn fence_again(
    app: &Arc<App>,
    tenant: &TenantId,
    routed: Option<RoutedBy>,
) -> impl Fn() -> Result<(), ExecError> + Clone + Send + 'static {
    let app = app.clone();
    let tenant = tenant.clone();
    move || match routed {
        Some(RoutedBy(epoch)) => app.fences.admit(&tenant, epoch, false),
        None => Ok(()),
    }
}

/// `tenant` arrived here: its fence no longer applies (`Fences::arrived`,
/// on the blocking pool, as it may write to disk).
async fn arrived(app: &Arc<App>, tenant: &TenantId) {
    let (app, tenant) = (app.clone(), tenant.clone());
    let _ = tokio::task::spawn_blocking(move || app.fences.arrived(&tenant)).await;
}

fn epoch_of(v: &HeaderValue) -> Result<i64, ExecError> {
    v.to_str()
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|e| *e >= 0)
        .ok_or_else(|| ExecError::InvalidInput(format!("{} is not an epoch", headers::EPOCH)))
}

async fn require_token(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(presented.as_bytes().ct_eq(app.internal_token.as_bytes())) {
        return ExecError::Unauthorized.into_response();
    }
    next.run(req).await
}

async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ExecError> {
    let too_large = || ExecError::PayloadTooLarge(format!("bodies are limited to {limit} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit)).await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ExecError::InvalidInput(format!(
            "cannot read the body: {e}"
        ))),
    }
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

#[derive(Debug, Deserialize)]
struct RegisterQuery {
    name: Option<String>,
    #[serde(default)]
    replace: bool,
}

async fn register(
    State(app): State<Arc<App>>,
    Tenant(tenant): Tenant,
    ApiQuery(q): ApiQuery<RegisterQuery>,
    routed: Option<Extension<RoutedBy>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ExecError> {
    let routed = routed.map(|Extension(r)| r);
    let fence = fence_again(&app, &tenant, routed);
    let ct = content_type(&headers).unwrap_or("").to_string();
    // A multipart registration (which may stream assets to disk) waits
    // for the tenant's one upload at a time, until it is registered.
    let mut _upload = None;
    let mut reg = match media_type(&ct).as_str() {
        // A module alone is read whole: held through its tenant's pause,
        // or sent on to where its tenant went, as an invocation is.
        "application/wasm" => {
            let wasm = read_body(&headers, body, app.registry.limits.max_module_bytes).await?;
            let read = ReadRequest {
                routed,
                uri,
                headers: &headers,
            };
            let name = q.name.unwrap_or_else(|| default_name(&wasm));
            let ran = read
                .run(&app, &tenant, &wasm, || {
                    let reg = Registration {
                        name: name.clone(),
                        wasm: wasm.to_vec(),
                        assets: None,
                        config: FunctionConfig::default(),
                        replace: q.replace,
                    };
                    register_blocking(&app, &tenant, reg, fence.clone())
                })
                .await?;
            return Ok(match ran {
                Ran::Here(info) => registered(info),
                Ran::SentOn(resp) => resp,
            });
        }
        "multipart/form-data" => {
            let cap = app.registry.quotas.asset_cap();
            let limit = (app.registry.limits.max_module_bytes + MULTIPART_OVERHEAD) as u64 + cap;
            let declared = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > limit) {
                return Err(ExecError::PayloadTooLarge(format!(
                    "a registration is limited to {limit} bytes: a module of at most {} and \
                     assets of at most {cap}",
                    app.registry.limits.max_module_bytes
                )));
            }
            let t = app.registry.tenant_or_create_fenced(&tenant, &fence)?;
            _upload = Some(
                t.uploads
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ExecError::Internal("the tenant's uploads closed".into()))?,
            );
            parse_multipart(&app, &tenant, &ct, body, q.replace).await?
        }
        other => {
            return Err(ExecError::UnsupportedMediaType(format!(
                "register with application/wasm or multipart/form-data, not {other:?}"
            )));
        }
    };
    reg.name = match (q.name, reg.name.is_empty()) {
        (Some(n), _) => n,
        (None, false) => reg.name,
        (None, true) => default_name(&reg.wasm),
    };
    Ok(registered(
        register_blocking(&app, &tenant, reg, fence).await?,
    ))
}

/// The name of a function registered without one: `fn-` and the first 12
/// hex digits of its module's SHA-256.
fn default_name(wasm: &[u8]) -> String {
    use sha2::Digest;
    format!("fn-{}", &hex::encode(sha2::Sha256::digest(wasm))[..12])
}

/// Registers `reg` for `tenant`, the fence asked again just before the
/// tenant is made here, on a blocking thread.
async fn register_blocking(
    app: &App,
    tenant: &TenantId,
    reg: Registration,
    fence: impl Fn() -> Result<(), ExecError> + Send + 'static,
) -> Result<FunctionInfo, ExecError> {
    let registry = app.registry.clone();
    let tenant = tenant.clone();
    tokio::task::spawn_blocking(move || registry.register_fenced(&tenant, reg, &fence))
        .await
        .map_err(ExecError::task("registration"))?
}

/// A registration's answer: 201 and the function.
fn registered(info: FunctionInfo) -> Response {
    tracing::info!(function = %info.id, name = %info.name, assets = info.assets_sha256.as_deref().unwrap_or("none"), "function registered");
    (StatusCode::CREATED, axum::Json(info)).into_response()
}

/// A `config` part: a JSON object of the known fields (serde would also
/// take an array, by position).
fn parse_config(data: &[u8]) -> Result<FunctionConfig, ExecError> {
    let bad = |e: serde_json::Error| ExecError::InvalidJson(format!("config part: {e}"));
    let value: serde_json::Value = serde_json::from_slice(data).map_err(bad)?;
    if !value.is_object() {
        return Err(ExecError::InvalidJson(
            "config part: expected a JSON object".into(),
        ));
    }
    serde_json::from_value(value).map_err(bad)
}

/// Largest `config` or `name` part: 64 KiB.
const SMALL_PART_BYTES: usize = 64 << 10;

/// Reads a multipart registration as it arrives: the module, config and
/// name into memory (each under its cap), the assets straight to the
/// tenant's assets store, never whole in memory.
async fn parse_multipart(
    app: &App,
    tenant: &TenantId,
    ct: &str,
    body: Body,
    replace: bool,
) -> Result<Registration, ExecError> {
    let boundary = multer::parse_boundary(ct)
        .map_err(|e| ExecError::InvalidInput(format!("multipart boundary: {e}")))?;
    let mut mp = multer::Multipart::new(body.into_data_stream(), boundary);
    let mut reg = Registration {
        name: String::new(),
        wasm: Vec::new(),
        assets: None,
        config: FunctionConfig::default(),
        replace,
    };
    let mut have_module = false;
    let bad = |e: multer::Error| ExecError::InvalidInput(format!("multipart body: {e}"));
    while let Some(mut field) = mp.next_field().await.map_err(bad)? {
        if let Err(e) = read_field(app, tenant, &mut field, &mut reg, &mut have_module).await {
            // Refused for its size while the client still sends: read the
            // rest before answering, so that it sees the refusal rather
            // than a connection reset.
            if matches!(
                e.code(),
                ErrorCode::PayloadTooLarge | ErrorCode::QuotaExceeded
            ) {
                linger(&mut mp, field).await;
            }
            return Err(e);
        }
    }
    if !have_module {
        return Err(ExecError::InvalidInput(
            "multipart body lacks a `module` part".into(),
        ));
    }
    Ok(reg)
}

/// Reads one part of a registration into `reg`.
async fn read_field(
    app: &App,
    tenant: &TenantId,
    field: &mut multer::Field<'_>,
    reg: &mut Registration,
    have_module: &mut bool,
) -> Result<(), ExecError> {
    let name = field.name().unwrap_or("").to_string();
    match name.as_str() {
        "module" => {
            let limit = app.registry.limits.max_module_bytes;
            reg.wasm = read_part(field, limit, "module").await?;
            *have_module = true;
        }
        "assets" => {
            if reg.assets.is_some() {
                return Err(ExecError::InvalidInput(
                    "multipart body has two `assets` parts".into(),
                ));
            }
            let staged = receive_assets(app, tenant, field).await?;
            reg.assets = Some(AssetSource::Staged(staged));
        }
        "config" => {
            reg.config = parse_config(&read_part(field, SMALL_PART_BYTES, "config").await?)?
        }
        "name" => {
            let data = read_part(field, SMALL_PART_BYTES, "name").await?;
            reg.name = String::from_utf8(data)
                .map_err(|_| ExecError::InvalidInput("name part is not UTF-8".into()))?
        }
        other => {
            return Err(ExecError::InvalidInput(format!(
                "unknown part {other:?}; expected module, assets, config"
            )));
        }
    }
    Ok(())
}

/// Longest a refused registration's remaining bytes are read (and
/// discarded) before the refusal is sent: 10 s.
const LINGER: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and discards the rest of a multipart body, `field` first, for at
/// most [`LINGER`].
async fn linger<'r>(mp: &mut multer::Multipart<'r>, field: multer::Field<'r>) {
    let _ = tokio::time::timeout(LINGER, async {
        let mut field = Some(field);
        while let Some(mut f) = field.take() {
            while let Ok(Some(_)) = f.chunk().await {}
            drop(f);
            field = mp.next_field().await.ok().flatten();
        }
    })
    .await;
}

/// One part read into memory, refused past `limit` bytes.
async fn read_part(
    field: &mut multer::Field<'_>,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, ExecError> {
    let mut data = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| ExecError::InvalidInput(format!("multipart body: {e}")))?
    {
        if data.len() + chunk.len() > limit {
            return Err(ExecError::PayloadTooLarge(format!(
                "the {what} part is limited to {limit} bytes"
            )));
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

/// Chunks of an `assets` part in memory at once, between the request and
/// the thread that writes them: 16 (a few MiB at most).
const ASSET_CHUNKS_IN_FLIGHT: usize = 16;

/// Streams an `assets` part to a new file of the tenant's assets store,
/// written and hashed on a blocking thread. Past the operator's cap it is
/// 413 at once; past what the tenant's device-memory quota could still
/// hold, nothing more is written and it is 422 once the part has been read
/// (unless it turns out to be over the cap too).
async fn receive_assets(
    app: &App,
    tenant: &TenantId,
    field: &mut multer::Field<'_>,
) -> Result<StagedAsset, ExecError> {
    let cap = app.registry.quotas.asset_cap();
    let headroom = app.registry.asset_headroom(tenant);
    let upload = app.registry.asset_store().upload(tenant.as_str(), cap)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(ASSET_CHUNKS_IN_FLIGHT);
    let writer = tokio::task::spawn_blocking(move || -> Result<StagedAsset, AssetError> {
        let mut upload = upload;
        while let Some(chunk) = rx.blocking_recv() {
            upload.write(&chunk)?;
        }
        upload.finish()
    });
    let mut received = 0u64;
    let mut tx = Some(tx);
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| ExecError::InvalidInput(format!("multipart body: {e}")))?
    {
        received += chunk.len() as u64;
        if received > cap {
            return Err(AssetError::TooLarge { limit: cap }.into());
        }
        if received > headroom {
            // Nothing more is written; the part is still read to the end,
            // to tell "over the cap" (413) from "over the quota" (422).
            tx = None;
        }
        if let Some(sender) = &tx
            && sender.send(chunk).await.is_err()
        {
            break; // the writer failed: its error is below
        }
    }
    if received > headroom {
        return Err(AssetError::Quota(format!(
            "the assets are {received} bytes; the tenant's device-memory quota has room for \
             {headroom}"
        ))
        .into());
    }
    drop(tx);
    Ok(writer.await.map_err(ExecError::task("assets upload"))??)
}

async fn list(State(app): State<Arc<App>>, Tenant(tenant): Tenant) -> axum::Json<FunctionList> {
    axum::Json(FunctionList {
        functions: app.registry.functions(&tenant),
    })
}

async fn show(
    State(app): State<Arc<App>>,
    Tenant(tenant): Tenant,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ExecError> {
    Ok(axum::Json(app.registry.function(&tenant, &id)?.info.clone()).into_response())
}

async fn remove(
    State(app): State<Arc<App>>,
    Tenant(tenant): Tenant,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ExecError> {
    let (registry, t, f) = (app.registry.clone(), tenant.clone(), id.clone());
    tokio::task::spawn_blocking(move || registry.delete(&t, &f))
        .await
        .map_err(ExecError::task("delete"))??;
    tracing::info!(%tenant, function = %id, "function deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn logs(
    State(app): State<Arc<App>>,
    Tenant(tenant): Tenant,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ExecError> {
    let f = app.registry.function(&tenant, &id)?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        f.log.contents(),
    )
        .into_response())
}

async fn invoke(
    State(app): State<Arc<App>>,
    Tenant(tenant): Tenant,
    ApiPath(id): ApiPath<String>,
    routed: Option<Extension<RoutedBy>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ExecError> {
    let start = Instant::now();
    let result = match crate::stream::Mode::of(&headers) {
        Some(mode) => invoke_streamed(&app, mode, &tenant, &id, &headers, body).await,
        None => {
            let read = ReadRequest {
                routed: routed.map(|Extension(r)| r),
                uri,
                headers: &headers,
            };
            invoke_inner(&app, &tenant, &id, read, body).await
        }
    };
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => e.code().as_str(),
    };
    app.metrics.invocations.with_label_values(&[label]).inc();
    app.metrics
        .invoke_duration
        .observe(start.elapsed().as_secs_f64());
    result
}

/// What an invocation needs of its request: the function, resolved once
/// (an unknown one answers 404 before the body is read), the body, and
/// the `Accept` header.
async fn invocation(
    app: &App,
    tenant: &TenantId,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Target, RequestBody, Option<String>), ExecError> {
    let target = app.registry.resolve(tenant, id)?;
    let request = RequestBody {
        content_type: content_type(headers).map(str::to_string),
        body: read_body(headers, body, app.registry.quotas.max_body_bytes).await?,
    };
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((target, request, accept))
}

async fn invoke_inner(
    app: &App,
    tenant: &TenantId,
    id: &str,
    read: ReadRequest<'_>,
    body: Body,
) -> Result<Response, ExecError> {
    let (target, request, accept) = invocation(app, tenant, id, read.headers, body).await?;
    let ran = read
        .run(app, tenant, &request.body, || {
            let accept = accept.clone();
            app.registry
                .invoke(&target, request.clone(), move |response, backend| {
                    body::encode_response(accept.as_deref(), response, backend)
                })
        })
        .await?;
    Ok(match ran {
        Ran::Here(encoded) => {
            ([(header::CONTENT_TYPE, encoded.content_type)], encoded.body).into_response()
        }
        Ran::SentOn(resp) => resp,
    })
}

/// A routed request whose body this executor has read, for what follows
/// a refusal that came before it ran: `tenant_frozen`, or, for a
/// registration, `placement_stale` (its tenant left while its body
/// arrived).
struct ReadRequest<'a> {
    routed: Option<RoutedBy>,
    uri: axum::http::Uri,
    headers: &'a HeaderMap,
}

/// Times a request whose body was read is held through its tenant's
/// pauses before it is refused: 3.
const HOLDS_AFTER_READ: u32 = 3;

/// What came of a request run by [`ReadRequest::run`].
enum Ran<T> {
    /// It ran here, and gave this.
    Here(T),
    /// Its tenant moved while it was held: sent on, with this answer.
    SentOn(Response),
}

impl ReadRequest<'_> {
    /// Runs `attempt` (the request, whose body is `body`), and again after
    /// each `tenant_frozen` refusal, which comes before anything runs: as
    /// the fence does for a request whose body the proxy cannot send
    /// again, it is held through the pause ([`hold`], at most
    /// [`HOLDS_AFTER_READ`] times), and runs again or is sent on to where
    /// the tenant moved. A routed request refused so, or as stale, whose
    /// tenant has left for a named executor is sent on there, whatever its
    /// body. Otherwise a request the proxy can send again, or one without
    /// a placement epoch, is refused (the fence answers it
    /// `placement_stale`).
    async fn run<T, F, Fut>(
        &self,
        app: &App,
        tenant: &TenantId,
        body: &Bytes,
        mut attempt: F,
    ) -> Result<Ran<T>, ExecError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ExecError>>,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            let refused = match attempt().await {
                Err(refused @ (ExecError::TenantFrozen(_) | ExecError::PlacementStale(_))) => {
                    refused
                }
                other => return other.map(Ran::Here),
            };
            let Some(RoutedBy(epoch)) = self.routed else {
                return Err(refused);
            };
            if let Some((to, epoch)) = app.fences.moved_to(tenant, epoch) {
                let req = self.rebuilt(body.clone());
                return Ok(Ran::SentOn(send_on(app, req, tenant, &to, epoch).await));
            }
            let frozen = matches!(refused, ExecError::TenantFrozen(_));
            if !frozen || resendable(self.headers) || tries > HOLDS_AFTER_READ {
                return Err(refused);
            }
            match hold(app, tenant, epoch, refused).await {
                Held::Runs => {}
                Held::Moved { to, epoch } => {
                    let req = self.rebuilt(body.clone());
                    return Ok(Ran::SentOn(send_on(app, req, tenant, &to, epoch).await));
                }
                Held::Refused(e) => return Err(e),
            }
        }
    }

    /// The request again, with `body`, the body it arrived with, to send on.
    fn rebuilt(&self, body: Bytes) -> Request {
        let mut headers = self.headers.clone();
        headers.remove(header::TRANSFER_ENCODING);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let mut req = Request::new(Body::from(body));
        *req.method_mut() = axum::http::Method::POST;
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = headers;
        req
    }
}

/// A streamed invocation (`docs/API.md`, "Streaming"): it runs on a task
/// of its own, and the answer carries its chunks as they come
/// ([`crate::stream::answer`]). The client's going away (the answer
/// dropped) cancels it.
async fn invoke_streamed(
    app: &Arc<App>,
    mode: crate::stream::Mode,
    tenant: &TenantId,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ExecError> {
    let (target, request, accept) = invocation(app, tenant, id, headers, body).await?;
    let limits = &app.registry.limits;
    let gone = crate::registry::ClientGone::default();
    let stream = crate::stream::Stream::open(mode, limits.max_stream_chunk_bytes, gone.flag());
    let (sink, outcome, cancel) = (stream.sink().clone(), stream.outcome(), gone.flag());
    let app2 = app.clone();
    tokio::spawn(async move {
        let finish = sink.clone();
        let result = app2
            .registry
            .invoke_linked(&target, request, cancel, Some(sink), move |r, backend| {
                finish.finish(accept.as_deref(), r, backend)
            })
            .await;
        outcome.send(result).await;
    });
    crate::stream::answer(
        stream,
        limits.stream_idle_timeout,
        app.metrics.clone(),
        gone,
    )
    .await
}

async fn invoke_async(
    State(app): State<Arc<App>>,
    Tenant(tenant): Tenant,
    ApiPath(id): ApiPath<String>,
    routed: Option<Extension<RoutedBy>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ExecError> {
    let read = ReadRequest {
        routed: routed.map(|Extension(r)| r),
        uri,
        headers: &headers,
    };
    let target = app.registry.resolve(&tenant, &id)?;
    let bytes = read_body(&headers, body, app.registry.quotas.max_body_bytes).await?;
    let ct = content_type(&headers).map(str::to_string);
    // A malformed body is refused now, as a synchronous invoke refuses it,
    // not accepted as a job bound to fail.
    let limits = *target.tenant.backend.limits();
    let (ct, bytes) = tokio::task::spawn_blocking(move || {
        body::check_request(ct.as_deref(), &bytes, &limits).map(|()| (ct, bytes))
    })
    .await
    .map_err(ExecError::task("body check"))??;
    let request = RequestBody {
        content_type: ct,
        body: bytes,
    };
    let ran = read
        .run(&app, &tenant, &request.body, || {
            app.registry.submit_job(target.clone(), request.clone())
        })
        .await?;
    Ok(match ran {
        Ran::Here(accepted) => (StatusCode::ACCEPTED, axum::Json(accepted)).into_response(),
        Ran::SentOn(resp) => resp,
    })
}

#[derive(Debug, Deserialize)]
struct JobsQuery {
    status: Option<JobStatus>,
}

async fn list_jobs(
    State(app): State<Arc<App>>,
    Tenant(tenant): Tenant,
    ApiQuery(q): ApiQuery<JobsQuery>,
) -> axum::Json<JobList> {
    axum::Json(JobList {
        jobs: app.registry.jobs(&tenant, q.status),
    })
}

async fn get_job(
    State(app): State<Arc<App>>,
    Tenant(tenant): Tenant,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<JobInfo>, ExecError> {
    app.registry.job(&tenant, &id).map(axum::Json)
}

async fn delete_job(
    State(app): State<Arc<App>>,
    Tenant(tenant): Tenant,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ExecError> {
    app.registry.delete_job(&tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn path_tenant(raw: &str) -> Result<TenantId, ExecError> {
    TenantId::new(raw).map_err(|e| ExecError::InvalidInput(format!("tenant: {e}")))
}

/// `?move=<id>`: the snapshot is made for that move, sealed to it.
#[derive(Debug, Default, serde::Deserialize)]
struct ExportQuery {
    #[serde(default, rename = "move")]
    move_id: Option<String>,
}

/// A `move` query parameter, checked: 1–64 bytes of `A-Z a-z 0-9 -`.
fn move_id(id: Option<String>) -> Result<Option<String>, ExecError> {
    match id {
        Some(id)
            if id.is_empty()
                || id.len() > 64
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
        {
            Err(ExecError::InvalidInput(
                "move: 1-64 letters, digits or dashes".into(),
            ))
        }
        id => Ok(id),
    }
}

async fn export_tenant(
    State(app): State<Arc<App>>,
    ApiPath(tenant): ApiPath<String>,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> Result<Response, ExecError> {
    let tenant = path_tenant(&tenant)?;
    let started = Instant::now();
    let bytes = app
        .registry
        .export_for(&tenant, move_id(q.move_id)?)
        .await?;
    tracing::info!(%tenant, bytes = bytes.len(), ms = started.elapsed().as_millis() as u64, "tenant exported and frozen");
    Ok(([(header::CONTENT_TYPE, body::OCTET_STREAM)], bytes).into_response())
}

/// `?replace=true`: an admin restore, which swaps the tenant's state for
/// the snapshot's instead of refusing a tenant that is here. `?move=<id>`:
/// the snapshot of that move (its seal must say so).
#[derive(Debug, Default, serde::Deserialize)]
struct ImportQuery {
    #[serde(default)]
    replace: bool,
    #[serde(default, rename = "move")]
    move_id: Option<String>,
}

async fn import_tenant(
    State(app): State<Arc<App>>,
    ApiPath(tenant): ApiPath<String>,
    ApiQuery(q): ApiQuery<ImportQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ExecError> {
    let tenant = path_tenant(&tenant)?;
    let limit = usize::try_from(crate::snapshot::MAX_SNAPSHOT_BYTES).unwrap_or(usize::MAX);
    let bytes = read_body(&headers, body, limit).await?;
    let started = Instant::now();
    match (q.replace, move_id(q.move_id)?) {
        (true, Some(_)) => {
            return Err(ExecError::InvalidInput(
                "a move's snapshot is imported, not restored over a tenant".into(),
            ));
        }
        (true, None) => app.registry.import_replacing(&tenant, bytes).await?,
        (false, bound) => app.registry.import_for(&tenant, bytes, bound).await?,
    }
    arrived(&app, &tenant).await;
    let functions = app.registry.functions(&tenant).len();
    tracing::info!(%tenant, functions, replace = q.replace, ms = started.elapsed().as_millis() as u64, "tenant imported");
    Ok(axum::Json(serde_json::json!({"tenant": tenant, "functions": functions})).into_response())
}

async fn thaw_tenant(
    State(app): State<Arc<App>>,
    ApiPath(tenant): ApiPath<String>,
) -> Result<StatusCode, ExecError> {
    let tenant = path_tenant(&tenant)?;
    app.registry.thaw_tenant(&tenant)?;
    tracing::info!(%tenant, "tenant thawed");
    Ok(StatusCode::NO_CONTENT)
}

/// `{"modules": [function id, ...]}`: what a migration destination
/// fetches and compiles before the tenant pauses.
async fn tenant_modules(
    State(app): State<Arc<App>>,
    ApiPath(tenant): ApiPath<String>,
) -> Result<Response, ExecError> {
    let tenant = path_tenant(&tenant)?;
    let ids = app.registry.module_ids(&tenant)?;
    Ok(axum::Json(serde_json::json!({ "modules": ids })).into_response())
}

/// One function's module, as registered.
async fn tenant_module(
    State(app): State<Arc<App>>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> Result<Response, ExecError> {
    let tenant = path_tenant(&tenant)?;
    let wasm = app.registry.module(&tenant, &id)?;
    Ok(([(header::CONTENT_TYPE, "application/wasm")], wasm.to_vec()).into_response())
}

/// Compiles a module into the cache, registering nothing.
async fn precompile(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ExecError> {
    let wasm = read_body(&headers, body, app.registry.limits.max_module_bytes).await?;
    let started = Instant::now();
    let bytes = wasm.len();
    app.registry.precompile(wasm).await?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(bytes, ms, "module precompiled");
    Ok(axum::Json(serde_json::json!({ "bytes": bytes, "ms": ms })).into_response())
}

/// Drops a tenant; with `x-tensor-wasm-epoch`, the epoch of the placement
/// that moved it elsewhere, below which its requests are refused here.
async fn drop_tenant(
    State(app): State<Arc<App>>,
    ApiPath(tenant): ApiPath<String>,
    request_headers: HeaderMap,
) -> Result<StatusCode, ExecError> {
    let tenant = path_tenant(&tenant)?;
    let epoch = request_headers
        .get(headers::EPOCH)
        .map(epoch_of)
        .transpose()?;
    let to = request_headers
        .get(headers::MOVED_TO)
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|s| !s.is_empty() && s.len() <= 255 && !s.contains('/'))
                .ok_or_else(|| {
                    ExecError::InvalidInput(format!("{} is not a host:port", headers::MOVED_TO))
                })
        })
        .transpose()?;
    // On the blocking pool: the fence is kept on disk (synced) before
    // the tenant goes, and a large tenant's files and memory take a while
    // to free, and the runtime's workers answer `/healthz` meanwhile.
    let app2 = app.clone();
    let (t, to) = (tenant.clone(), to.map(str::to_string));
    tokio::task::spawn_blocking(move || {
        if let Some(epoch) = epoch {
            app2.fences.left(&t, epoch, to.as_deref())?;
        }
        app2.registry.drop_tenant(&t)
    })
    .await
    .map_err(ExecError::task("dropping a tenant"))??;
    tracing::info!(%tenant, ?epoch, "tenant dropped");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /internal/identity`: this executor's proof that it holds the
/// internal token, for the nonce the caller sent (`docs/API.md`,
/// "Executor identity"). It needs no token: the proxy asks it before it
/// trusts an address with one.
async fn identity(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<Identity>, ExecError> {
    let body = read_body(&headers, body, 1024).await?;
    let challenge: Challenge = serde_json::from_slice(&body)
        .map_err(|e| ExecError::InvalidInput(format!("identity challenge: {e}")))?;
    let nonce = hex::decode(&challenge.nonce)
        .ok()
        .filter(|n| n.len() == identity::NONCE_LEN)
        .ok_or_else(|| {
            ExecError::InvalidInput(format!(
                "the nonce must be {} bytes of hex",
                identity::NONCE_LEN
            ))
        })?;
    Ok(axum::Json(identity::prove(
        &app.internal_token,
        &app.id,
        &nonce,
    )))
}

async fn info(State(app): State<Arc<App>>) -> axum::Json<ExecutorInfo> {
    axum::Json(executor_info(&app))
}

/// This executor's description, as `/internal/info` answers it.
pub fn executor_info(app: &App) -> ExecutorInfo {
    let mut device = app.device.clone();
    device.memory_used = app.registry.device_bytes();
    let states = app.registry.tenant_states();
    ExecutorInfo {
        id: app.id.clone(),
        addr: app.addr.clone(),
        version: app.version.clone(),
        healthy: true,
        device,
        tenants: app
            .registry
            .tenant_ids()
            .into_iter()
            .map(String::from)
            .collect(),
        stats: ExecutorStats {
            active_instances: app.registry.active_instances(),
            jobs_in_flight: app.registry.jobs_in_flight(),
            kernel_dispatches_total: app.metrics.dispatches_total(),
        },
        snapshot_formats: Some(tensor_wasm_shared::build::SnapshotFormats::this_build()),
        guest_abi: Some(tensor_wasm_shared::build::GUEST_ABI.to_vec()),
        guest_abi_used: Some(app.registry.guest_abi_used()),
        frozen: Some(
            states
                .iter()
                .filter(|(_, frozen, _)| *frozen)
                .map(|(t, _, _)| t.as_str().to_string())
                .collect(),
        ),
        tenant_device_bytes: Some(
            states
                .into_iter()
                .map(|(t, _, bytes)| (t.as_str().to_string(), bytes))
                .collect(),
        ),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let r = &app.registry;
    let m = &app.metrics;
    m.active_instances.set(r.active_instances() as i64);
    m.jobs_in_flight.set(r.jobs_in_flight() as i64);
    m.invocations_waiting.set(r.invocations_waiting() as i64);
    m.device_memory
        .with_label_values(&[&app.id])
        .set(r.device_bytes() as i64);
    let (host, host_limit) = r.host_memory();
    m.host_memory.set(host as i64);
    m.host_memory_limit.set(host_limit as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
        .into_response()
}

/// Step 1 of a move, on the source: an outbound session for the tenant,
/// answered with its manifest.
async fn start_outbound(
    State(app): State<Arc<App>>,
    ApiPath(tenant): ApiPath<String>,
) -> Result<Response, ExecError> {
    let tenant = path_tenant(&tenant)?;
    let session = app.registry.start_outbound(&tenant)?;
    tracing::info!(%tenant, session = %session.id, tracking = app.registry.page_tracking().name(), "outbound session started");
    Ok(axum::Json(manifest(&app, &session)).into_response())
}

fn manifest(app: &App, s: &crate::outbound::Outbound) -> crate::moves::Manifest {
    crate::moves::Manifest {
        session: s.id.clone(),
        tenant: s.tenant_id().to_string(),
        page_tracking: app.registry.page_tracking().name().to_string(),
        functions: s
            .tenant
            .function_list()
            .iter()
            .map(|f| f.info.clone())
            .collect(),
    }
}

async fn outbound_manifest(
    State(app): State<Arc<App>>,
    ApiPath(session): ApiPath<String>,
) -> Result<Response, ExecError> {
    let s = app.registry.outbound_session(&session)?;
    Ok(axum::Json(manifest(&app, &s)).into_response())
}

/// Ends a session without a move: the tenant thaws if the final round froze
/// it.
async fn end_outbound(
    State(app): State<Arc<App>>,
    ApiPath(session): ApiPath<String>,
) -> Result<StatusCode, ExecError> {
    app.registry.end_outbound(&session)?;
    tracing::info!(%session, "outbound session ended; the tenant stays");
    Ok(StatusCode::NO_CONTENT)
}

/// Streams one round of `s`, written on the blocking pool as it is sent.
fn round_response(s: Arc<crate::outbound::Outbound>, kind: StreamKind) -> Response {
    let (mut w, stream) = crate::pipe::chunk_pipe();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        match s.round(kind, &mut w) {
            Ok(stats) => {
                // Its last bytes go to the response before it says so.
                drop(w);
                let ms = started.elapsed().as_secs_f64() * 1e3;
                if kind == StreamKind::Final {
                    tracing::info!(tenant = %s.tenant_id(), session = %s.id, bytes = stats.bytes, pages = stats.page_bytes, tensors = stats.tensor_bytes, ms, "final round sent");
                } else {
                    tracing::debug!(tenant = %s.tenant_id(), session = %s.id, bytes = stats.bytes, pages = stats.page_bytes, tensors = stats.tensor_bytes, ms, "round sent");
                }
            }
            Err(e) => {
                tracing::warn!(tenant = %s.tenant_id(), session = %s.id, error = %e, "round failed");
                w.fail(std::io::Error::other(e.to_string()));
            }
        }
    });
    (
        [(header::CONTENT_TYPE, body::OCTET_STREAM)],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn outbound_round(
    State(app): State<Arc<App>>,
    ApiPath(session): ApiPath<String>,
) -> Result<Response, ExecError> {
    let s = app.registry.outbound_session(&session)?;
    Ok(round_response(s, StreamKind::Round))
}

/// Freezes the tenant, waits for its work to finish, and streams the
/// final round. The tenant stays frozen.
async fn outbound_final(
    State(app): State<Arc<App>>,
    ApiPath(session): ApiPath<String>,
) -> Result<Response, ExecError> {
    let s = app.registry.outbound_session(&session)?;
    if !s.freeze(crate::snapshot::DRAIN_TIMEOUT).await {
        return Err(ExecError::Capacity(format!(
            "tenant {} still had work in flight after {:?}",
            s.tenant_id(),
            crate::snapshot::DRAIN_TIMEOUT
        )));
    }
    tracing::info!(tenant = %s.tenant_id(), session = %s.id, "tenant frozen for its final round");
    Ok(round_response(s, StreamKind::Final))
}

/// A tenant's assets file, by SHA-256, as a stream.
async fn tenant_assets(
    State(app): State<Arc<App>>,
    ApiPath((tenant, sha)): ApiPath<(String, String)>,
) -> Result<Response, ExecError> {
    let tenant = path_tenant(&tenant)?;
    app.registry.tenant_here(&tenant)?;
    if !app.registry.asset_store().contains(tenant.as_str(), &sha) {
        return Err(ExecError::MoveNotFound(format!("assets file {sha}")));
    }
    let store = app.registry.asset_store();
    let path = store.path(tenant.as_str(), &sha);
    let blake3 = store.blake3(tenant.as_str(), &sha);
    // Mapped, and sent as slices of the mapping: no copy in this process.
    let mapped = tokio::task::spawn_blocking(move || crate::assets::map(&path))
        .await
        .map_err(ExecError::task("mapping assets"))??;
    let len = (*mapped).as_ref().len();
    let whole = Bytes::from_owner(MappedBytes(mapped));
    let stream =
        futures_util::stream::iter((0..len).step_by(crate::pipe::CHUNK).map(move |at| {
            Ok::<_, std::io::Error>(whole.slice(at..len.min(at + crate::pipe::CHUNK)))
        }));
    let mut response = (
        [
            (header::CONTENT_TYPE, body::OCTET_STREAM.to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response();
    if let Some(digest) = blake3.and_then(|d| HeaderValue::from_str(&d).ok()) {
        response
            .headers_mut()
            .insert(crate::peer::ASSETS_BLAKE3, digest);
    }
    Ok(response)
}

/// What a destination is asked to pull.
#[derive(Debug, Deserialize)]
struct PullRequest {
    /// The source's `host:port`.
    source: String,
    session: String,
    #[serde(flatten)]
    options: crate::moves::PullOptions,
}

/// Step 2 of a move, on the destination: pulls the tenant while it runs.
async fn pull_inbound(
    State(app): State<Arc<App>>,
    ApiPath(tenant): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ExecError> {
    let tenant = path_tenant(&tenant)?;
    let bytes = read_body(&headers, body, SMALL_PART_BYTES).await?;
    let req: PullRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ExecError::InvalidJson(format!("pull request: {e}")))?;
    let peer = crate::peer::Peer::new(&req.source, &app.internal_token);
    let report =
        crate::moves::pull(&app.registry, peer, &tenant, &req.session, req.options).await?;
    let bytes: u64 = report.rounds.iter().map(|r| r.applied.bytes).sum();
    tracing::info!(%tenant, source = %req.source, rounds = report.rounds.len(), bytes, blob_bytes = report.blob_bytes, blob_ms = report.blob_ms, ms = report.ms, "tenant pulled while it runs");
    Ok(axum::Json(report).into_response())
}

/// Step 4 of a move, on the destination: the final round, then the tenant
/// is published here.
async fn commit_inbound(
    State(app): State<Arc<App>>,
    ApiPath(tenant): ApiPath<String>,
) -> Result<Response, ExecError> {
    let tenant = path_tenant(&tenant)?;
    let report = crate::moves::commit(&app.registry, &tenant).await?;
    arrived(&app, &tenant).await;
    tracing::info!(%tenant, bytes = report.applied.bytes, ms = report.ms, "tenant committed here");
    Ok(axum::Json(report).into_response())
}

/// Undo: discards what was staged, unless it was committed; says which.
async fn discard_inbound(
    State(app): State<Arc<App>>,
    ApiPath(tenant): ApiPath<String>,
) -> Result<Response, ExecError> {
    let tenant = path_tenant(&tenant)?;
    let state = app.registry.discard_inbound(&tenant).await;
    tracing::info!(%tenant, ?state, "inbound move discarded");
    Ok(axum::Json(serde_json::json!({ "state": state })).into_response())
}

/// A mapped file as the owner of a [`Bytes`].
struct MappedBytes(tensor_wasm_kernels::SharedBytes);

impl AsRef<[u8]> for MappedBytes {
    fn as_ref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}
