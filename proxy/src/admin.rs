//! The admin API (`docs/API.md`, "Admin API"): its own listener and token,
//! every call audited.
//!
//! | route | does |
//! |---|---|
//! | `GET /admin/executors` | the executor set, each with its live `/internal/info` |
//! | `POST /admin/executors` | register `{"id", "addr"}` |
//! | `POST /admin/executors/{id}/drain` | move every tenant off, stop placing there |
//! | `POST /admin/executors/{id}/cordon`, `.../uncordon` | stop (resume) placing new tenants there, moving nothing |
//! | `DELETE /admin/executors/{id}` | forget an executor that holds no tenants |
//! | `GET /admin/placements` | tenant → executor |
//! | `POST /admin/tenants/{t}/migrate` | `{"to"}`: a live migration |
//! | `POST /admin/rebalance` | even out tenant counts |
//! | `POST /admin/tenants/{t}/snapshot` | the tenant's snapshot bytes |
//! | `POST /admin/tenants/{t}/restore` | replace its state with the posted snapshot |
//! | `DELETE /admin/tenants/{t}` | purge it everywhere |
//! | `POST /admin/upgrade/overrides/{check}` | records (audited) that an upgrade overrides a pre-flight check |

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use hyper::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tensor_wasm_shared::audit::{AuditRecord, Outcome};
use tensor_wasm_shared::{ApiError, ErrorCode, headers};

use crate::auth::{TokenTable, token_id};
use crate::fleet::{Executor, RegisterError};
use crate::migrate::Orchestrator;
use crate::placement::PlacementError;
use crate::service::{REQUEST_ID_HEADER, Shared};

/// Largest admin request body: a snapshot to restore. The executor checks
/// the snapshot's own limits; this only bounds the proxy's memory.
const MAX_ADMIN_BODY: usize = 4 << 30;
/// The pre-flight checks of `tensor-wasm upgrade` that `--force` may
/// override (`POST /admin/upgrade/overrides/{check}` records it).
const UPGRADE_CHECKS: &[&str] = &["error-budget"];
/// How long `GET /admin/executors` waits for each executor's info.
const INFO_TIMEOUT: Duration = Duration::from_secs(2);

/// The admin application.
#[derive(Debug)]
pub struct AdminApi {
    pub shared: Arc<Shared>,
    pub orchestrator: Arc<Orchestrator>,
    /// `None`: no admin token configured, every call is refused.
    pub token: Option<String>,
}

struct Answer {
    status: u16,
    content_type: &'static str,
    body: Bytes,
}

impl Answer {
    fn json(status: u16, v: serde_json::Value) -> Answer {
        Answer {
            status,
            content_type: "application/json",
            body: Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
        }
    }

    fn error(e: ApiError) -> Answer {
        let status = e.http_status();
        Answer::json(
            status,
            serde_json::to_value(e.into_body()).unwrap_or_default(),
        )
    }
}

#[derive(Deserialize)]
struct RegisterBody {
    id: String,
    addr: String,
}

#[derive(Deserialize)]
struct MigrateBody {
    to: String,
    /// `"stop-and-copy"` forces the protocol before pre-copy (to compare
    /// them, or to move a tenant an older executor would refuse to pull).
    #[serde(default)]
    protocol: Option<String>,
}

impl AdminApi {
    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(expected) = &self.token else {
            return false;
        };
        let presented = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(TokenTable::bearer)
            .unwrap_or("");
        bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
    }

    async fn read_body(session: &mut ServerSession) -> Result<Bytes, ApiError> {
        let mut body = BytesMut::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_ADMIN_BODY {
                        return Err(ApiError::new(
                            ErrorCode::PayloadTooLarge,
                            format!("admin bodies are limited to {MAX_ADMIN_BODY} bytes"),
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body.freeze()),
                Err(e) => {
                    return Err(ApiError::new(
                        ErrorCode::InvalidInput,
                        format!("request body: {e}"),
                    ));
                }
            }
        }
    }

    async fn json_body<T: for<'de> Deserialize<'de>>(
        session: &mut ServerSession,
    ) -> Result<T, ApiError> {
        let body = Self::read_body(session).await?;
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("request body: {e}")))
    }

    async fn executor_entry(&self, exec: &Executor) -> serde_json::Value {
        let fresh = self
            .orchestrator
            .fleet()
            .client(exec)
            .info(INFO_TIMEOUT)
            .await
            .ok();
        if let Some(info) = &fresh {
            exec.set_info(info.clone());
        }
        let tenants = self
            .orchestrator
            .fleet()
            .table()
            .tenants_of(exec.id.as_str());
        let draining = self.orchestrator.fleet().table().is_draining(&exec.id);
        let info = fresh.clone().or_else(|| exec.last_info());
        json!({
            "id": exec.id,
            "addr": exec.addr,
            "version": info.as_ref().map(|i| i.version.clone()).unwrap_or_default(),
            "healthy": exec.is_healthy() && fresh.is_some(),
            "draining": draining,
            "device": info.as_ref().map(|i| serde_json::to_value(&i.device).unwrap_or_default()),
            "tenants": tenants,
            "stats": info.as_ref().map(|i| serde_json::to_value(&i.stats).unwrap_or_default()),
            "snapshot_formats": info.as_ref().and_then(|i| i.snapshot_formats.clone()),
            "guest_abi": info.as_ref().and_then(|i| i.guest_abi.clone()),
            "frozen": info.as_ref().and_then(|i| i.frozen.clone()),
            "tenant_device_bytes": info.as_ref().and_then(|i| i.tenant_device_bytes.clone()),
        })
    }

    async fn handle(&self, session: &mut ServerSession, method: &str, path: &str) -> Answer {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let orch = &self.orchestrator;
        let fleet = orch.fleet();
        match (method, segs.as_slice()) {
            ("GET", ["admin", "executors"]) => {
                let mut out = Vec::new();
                for exec in fleet.executors() {
                    out.push(self.executor_entry(&exec).await);
                }
                Answer::json(200, json!({ "executors": out }))
            }
            ("POST", ["admin", "executors"]) => {
                let body: RegisterBody = match Self::json_body(session).await {
                    Ok(b) => b,
                    Err(e) => return Answer::error(e),
                };
                match fleet.register_proven(&body.id, &body.addr).await {
                    Ok(exec) => {
                        tracing::info!(executor = %exec.id, addr = %exec.addr, "executor registered");
                        Answer::json(201, self.executor_entry(&exec).await)
                    }
                    Err(e) => {
                        let code = match &e {
                            RegisterError::Exists { .. } => ErrorCode::ExecutorExists,
                            RegisterError::Unverified { .. } | RegisterError::Unanswered { .. } => {
                                tracing::warn!(id = %body.id, addr = %body.addr, error = %e, "executor registration refused");
                                ErrorCode::ExecutorUnverified
                            }
                            RegisterError::Placement(_) => ErrorCode::Internal,
                            RegisterError::BadId(_) | RegisterError::BadAddr(..) => {
                                ErrorCode::InvalidInput
                            }
                        };
                        Answer::error(ApiError::new(code, e.to_string()))
                    }
                }
            }
            ("POST", ["admin", "executors", id, "drain"]) => match orch.drain(id).await {
                Ok((moves, failed)) => Answer::json(
                    if failed.is_empty() { 200 } else { 502 },
                    json!({ "executor": id, "moves": moves, "failed": failed }),
                ),
                Err(e) => Answer::error(e.api_error()),
            },
            ("POST", ["admin", "executors", id, action @ ("cordon" | "uncordon")]) => {
                let Some(exec) = fleet.executor(id) else {
                    return Answer::error(ApiError::new(
                        ErrorCode::NotFound,
                        format!("executor {id} is not registered"),
                    ));
                };
                let cordon = *action == "cordon";
                match fleet.table().set_draining(&exec.id, cordon).await {
                    Ok(()) => {
                        tracing::info!(executor = %id, cordon, "executor placement changed");
                        Answer::json(200, json!({ "id": id, "draining": cordon }))
                    }
                    Err(e) => Answer::error(placement_error(e)),
                }
            }
            ("DELETE", ["admin", "executors", id]) => {
                if fleet.executor(id).is_none() {
                    return Answer::error(ApiError::new(
                        ErrorCode::NotFound,
                        format!("executor {id} is not registered"),
                    ));
                }
                let held = fleet.table().tenants_of(id).len();
                if held > 0 {
                    return Answer::error(ApiError::new(
                        ErrorCode::TenantExists,
                        format!("executor {id} still holds {held} tenants; drain it first"),
                    ));
                }
                match fleet.forget(id).await {
                    Ok(()) => {
                        tracing::info!(executor = %id, "executor forgotten");
                        Answer::json(200, json!({ "id": id }))
                    }
                    Err(e) => Answer::error(placement_error(e)),
                }
            }
            ("GET", ["admin", "placements"]) => {
                let p = fleet.table().state();
                Answer::json(
                    200,
                    json!({
                        "placements": p.placements,
                        "moving": p.moving,
                        "proxies": fleet.table().proxies(),
                    }),
                )
            }
            ("POST", ["admin", "tenants", t, "migrate"]) => {
                let body: MigrateBody = match Self::json_body(session).await {
                    Ok(b) => b,
                    Err(e) => return Answer::error(e),
                };
                let stop_and_copy = match body.protocol.as_deref() {
                    None | Some("pre-copy") => false,
                    Some("stop-and-copy") => true,
                    Some(other) => {
                        return Answer::error(ApiError::new(
                            ErrorCode::InvalidInput,
                            format!(
                                "protocol {other:?}: \"pre-copy\" (the default) or \"stop-and-copy\""
                            ),
                        ));
                    }
                };
                match orch.migrate_with(t, &body.to, stop_and_copy).await {
                    Ok(r) => Answer::json(200, serde_json::to_value(r).unwrap_or_default()),
                    Err(e) => Answer::error(e.api_error()),
                }
            }
            ("POST", ["admin", "rebalance"]) => {
                let (moves, failed) = orch.rebalance().await;
                Answer::json(200, json!({ "moves": moves, "failed": failed }))
            }
            ("POST", ["admin", "tenants", t, "snapshot"]) => match orch.snapshot(t).await {
                Ok(bytes) => Answer {
                    status: 200,
                    content_type: "application/octet-stream",
                    body: bytes,
                },
                Err(e) => Answer::error(e.api_error()),
            },
            ("POST", ["admin", "tenants", t, "restore"]) => {
                let body = match Self::read_body(session).await {
                    Ok(b) => b,
                    Err(e) => return Answer::error(e),
                };
                match orch.restore(t, body).await {
                    Ok(exec) => Answer::json(200, json!({ "tenant": t, "executor": exec })),
                    Err(e) => Answer::error(e.api_error()),
                }
            }
            ("DELETE", ["admin", "tenants", t]) => match orch.purge(t).await {
                Ok(()) => Answer::json(200, json!({ "tenant": t, "purged": true })),
                Err(e) => Answer::error(e.api_error()),
            },
            // What it does is its audit record: an upgrade went ahead
            // against a pre-flight check (`tensor-wasm upgrade --force`).
            ("POST", ["admin", "upgrade", "overrides", check]) => {
                if !UPGRADE_CHECKS.contains(check) {
                    return Answer::error(ApiError::new(
                        ErrorCode::InvalidInput,
                        format!(
                            "no pre-flight check {check:?}; the checks are {}",
                            UPGRADE_CHECKS.join(", ")
                        ),
                    ));
                }
                tracing::warn!(check = %check, "an upgrade overrides a pre-flight check");
                Answer::json(200, json!({ "check": check, "overridden": true }))
            }
            _ => Answer::error(ApiError::new(
                ErrorCode::NotFound,
                format!("no admin route {method} {path}"),
            )),
        }
    }
}

/// The audit action of an admin route.
fn action(method: &str, path: &str) -> (&'static str, Option<String>) {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        ("GET", ["admin", "executors"]) => ("admin.executors.list", None),
        ("POST", ["admin", "executors"]) => ("admin.executors.register", None),
        ("POST", ["admin", "executors", _, "drain"]) => ("admin.executors.drain", None),
        ("DELETE", ["admin", "executors", _]) => ("admin.executors.forget", None),
        ("POST", ["admin", "executors", _, "cordon"]) => ("admin.executors.cordon", None),
        ("POST", ["admin", "executors", _, "uncordon"]) => ("admin.executors.uncordon", None),
        ("GET", ["admin", "placements"]) => ("admin.placements.list", None),
        ("POST", ["admin", "rebalance"]) => ("admin.rebalance", None),
        ("POST", ["admin", "tenants", t, "migrate"]) => {
            ("admin.tenants.migrate", Some(t.to_string()))
        }
        ("POST", ["admin", "tenants", t, "snapshot"]) => {
            ("admin.tenants.snapshot", Some(t.to_string()))
        }
        ("POST", ["admin", "tenants", t, "restore"]) => {
            ("admin.tenants.restore", Some(t.to_string()))
        }
        ("DELETE", ["admin", "tenants", t]) => ("admin.tenants.purge", Some(t.to_string())),
        ("POST", ["admin", "upgrade", "overrides", _]) => ("admin.upgrade.override", None),
        _ => ("admin.other", None),
    }
}

#[async_trait]
impl ServeHttp for AdminApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let arrived = Instant::now();
        let arrived_at = SystemTime::now();
        let req = session.req_header();
        let method = req.method.as_str().to_string();
        let path = req.uri.path().to_string();
        // `/healthz` and `/metrics` are answered without a token or an
        // audit record, as on the public listener.
        let quiet = matches!(path.as_str(), "/healthz" | "/metrics");
        let request_id = match req
            .headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| headers::accept_request_id(v.as_bytes()))
        {
            Some(id) => id.to_string(),
            None if quiet => self.shared.next_quiet_id(),
            None => self.shared.next_request_id(),
        };
        let presented = req
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(TokenTable::bearer)
            .map(|t| token_id(t.as_bytes()));

        let answer = if path == "/healthz" {
            Answer {
                status: 200,
                content_type: "text/plain",
                body: Bytes::from_static(b"ok\n"),
            }
        } else if path == "/metrics" {
            Answer {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: Bytes::from(self.shared.metrics.render()),
            }
        } else if !self.authorized(session) {
            let msg = if self.token.is_none() {
                "the admin API is disabled: set TENSOR_WASM_ADMIN_TOKEN"
            } else {
                "a valid admin bearer token is required"
            };
            Answer::error(ApiError::new(ErrorCode::Unauthorized, msg))
        } else {
            self.handle(session, &method, &path).await
        };

        if !quiet && let Some(audit) = &self.shared.audit {
            let (action, tenant) = action(&method, &path);
            audit.record(&AuditRecord {
                time: humantime::format_rfc3339_millis(arrived_at).to_string(),
                request_id: request_id.clone(),
                listener: "admin".into(),
                tenant,
                token_id: presented,
                action: action.into(),
                resource: path.clone(),
                status: answer.status,
                outcome: Outcome::of_status(answer.status),
                latency_ms: arrived.elapsed().as_secs_f64() * 1e3,
                remote: session.client_addr().map(|a| a.to_string()),
                stream: None,
            });
        }
        if answer.status >= 500 {
            tracing::warn!(%method, %path, status = answer.status, "admin call failed");
        }

        let status =
            StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Response::builder()
            .status(status)
            .header("content-type", answer.content_type)
            .header("content-length", answer.body.len())
            .header(REQUEST_ID_HEADER, request_id)
            .body(answer.body.to_vec())
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}

/// The answer to a placement table that refused a change: 503
/// `placement_unavailable` when etcd cannot be reached, else `internal`.
fn placement_error(e: PlacementError) -> ApiError {
    ApiError::new(e.code(), e.to_string())
}
