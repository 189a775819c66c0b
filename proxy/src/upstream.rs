//! The proxy's own calls to executors: health probes, `/internal/info`, and
//! the steps of a migration, pre-copy (outbound, pull, commit, discard) and
//! stop-and-copy (prewarm, export, import, thaw), and drop.
//!
//! Every such call goes through [`ExecutorApi`], one typed method per call
//! of the executor's internal API (executor/src/http.rs), so that the
//! migration code in [`crate::migrate`] reads as its protocol and unit tests
//! can stand an in-memory executor in for a real one. [`ExecutorClient`] is
//! the HTTP implementation; [`Connector`] makes one per executor address,
//! and [`crate::fleet::Fleet::client`] hands them out.
//!
//! Client traffic never goes through here (pingora forwards it). These
//! calls are few, so each opens its own HTTP/1.1 connection: no pool means
//! no connection tied to one runtime, and a dead executor is seen at once
//! as a refused connection rather than as a stale pooled socket.
//!
//! Each method bounds its own wait: transfers of state or modules get
//! [`TRANSFER_TIMEOUT`], control calls [`CONTROL_TIMEOUT`], health probes
//! [`PROBE_TIMEOUT`]; `info` takes its bound from the caller, as an admin
//! listing and a recovery wait differently long.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use tensor_wasm_shared::api::ExecutorInfo;
use tensor_wasm_shared::error::ErrorBody;
use tensor_wasm_shared::identity::{Challenge, Identity};
use tensor_wasm_shared::{ErrorCode, TenantId};

/// Longest an export, import, module fetch or precompile may take; a
/// multi-GiB tenant on a slow disk still fits, and a wedged executor does
/// not hold a move forever.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a thaw, drop or module list may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a health probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[cfg(test)]
pub(crate) mod scripted;

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
    /// A 2xx answer whose body is not what the call returns.
    #[error("executor at {addr} sent a bad answer: {source}")]
    BadAnswer {
        addr: String,
        #[source]
        source: serde_json::Error,
    },
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
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::Http { .. }
                | UpstreamError::Timeout { .. }
        )
    }
}

/// The calls the proxy makes to one executor, each named for what it asks.
///
/// Errors are the executor's answer ([`UpstreamError::Status`] with its
/// typed code) or the reason there was none. In particular a tenant the
/// executor does not hold is [`ErrorCode::TenantNotHere`], and a route it
/// does not have is [`ErrorCode::NotFound`]; callers must tell them apart.
#[async_trait::async_trait]
pub trait ExecutorApi: Send + Sync + fmt::Debug {
    /// `GET /healthz`: the upkeep's health probe, every tick, per executor.
    /// Sent without the internal token.
    async fn health(&self) -> Result<(), UpstreamError>;

    /// `POST /internal/identity`: the executor's proof, for `nonce`, that it
    /// holds the internal token ([`tensor_wasm_shared::identity`]). Sent
    /// without the token: the fleet asks it before it trusts an address
    /// that the admin API or DNS named.
    async fn identity(&self, nonce: &[u8]) -> Result<Identity, UpstreamError>;

    /// `GET /internal/info`: the executor's id, device, tenants and stats.
    /// Asked by the admin listing, by DNS discovery of an address not yet
    /// registered, and by recovery (does the destination hold the tenant
    /// already?). A body that is not an [`ExecutorInfo`] is
    /// [`UpstreamError::BadAnswer`].
    async fn info(&self, within: Duration) -> Result<ExecutorInfo, UpstreamError>;

    /// `GET /internal/tenants/{t}/modules`: ids of the tenant's modules
    /// (migration step 0, on the source). A body without a `modules` list
    /// is an empty list.
    async fn modules(&self, tenant: &TenantId) -> Result<Vec<String>, UpstreamError>;

    /// `GET /internal/tenants/{t}/modules/{id}`: one module's wasm (step 0,
    /// on the source).
    async fn module(&self, tenant: &TenantId, id: &str) -> Result<Bytes, UpstreamError>;

    /// `POST /internal/modules`: compiles `wasm` into the executor's module
    /// cache without installing it anywhere (step 0, on the destination).
    async fn precompile(&self, wasm: Bytes) -> Result<(), UpstreamError>;

    /// `POST /internal/tenants/{t}/export`: lets running jobs finish,
    /// freezes the tenant and returns its snapshot (step 3 on the source;
    /// also a snapshot, and the saving of the old state in a restore).
    async fn export(&self, tenant: &TenantId) -> Result<Bytes, UpstreamError>;

    /// `POST /internal/tenants/{t}/import`: installs the tenant from a
    /// snapshot (step 4 on the destination, recovery, restore).
    async fn import(&self, tenant: &TenantId, snapshot: Bytes) -> Result<(), UpstreamError>;

    /// `POST /internal/tenants/{t}/export?move=<id>`: as
    /// [`export`](Self::export), the snapshot sealed to the move `id`
    /// (`docs/SNAPSHOT-COMPATIBILITY.md`, "The seal"). An executor of an
    /// earlier release ignores `move` and answers an unsealed one.
    async fn export_sealed(&self, tenant: &TenantId, id: &str) -> Result<Bytes, UpstreamError> {
        let _ = id;
        self.export(tenant).await
    }

    /// `POST /internal/tenants/{t}/import?move=<id>`: as
    /// [`import`](Self::import); with `seal`, of a snapshot sealed to that
    /// move id, which the executor checks.
    async fn import_sealed(
        &self,
        tenant: &TenantId,
        snapshot: Bytes,
        seal: Option<&str>,
    ) -> Result<(), UpstreamError> {
        let _ = seal;
        self.import(tenant, snapshot).await
    }

    /// `POST /internal/tenants/{t}/import?replace=true`: replaces the
    /// tenant's state with the snapshot's in one step, the tenant left as
    /// it was on any failure (an admin restore); a tenant not there is
    /// imported. An executor of an older release ignores `replace` and
    /// answers `tenant_exists` for a tenant it holds.
    async fn import_replacing(
        &self,
        tenant: &TenantId,
        snapshot: Bytes,
    ) -> Result<(), UpstreamError>;

    /// `POST /internal/tenants/{t}/thaw`: unfreezes a tenant an export froze
    /// (a move or snapshot that ends with the tenant where it was).
    async fn thaw(&self, tenant: &TenantId) -> Result<(), UpstreamError>;

    /// `DELETE /internal/tenants/{t}`: forgets the tenant and its state
    /// (step 5 on the source, restore, purge).
    async fn drop_tenant(&self, tenant: &TenantId) -> Result<(), UpstreamError>;

    /// [`drop_tenant`](Self::drop_tenant) of a tenant that the placement of
    /// `epoch` moved to the executor at `to` (`host:port`): the executor
    /// sends requests routed by older placements (`x-tensor-wasm-epoch`)
    /// on to `to` (`x-tensor-wasm-moved-to`), or refuses them without
    /// one.
    async fn drop_moved(
        &self,
        tenant: &TenantId,
        epoch: i64,
        to: Option<&str>,
    ) -> Result<(), UpstreamError> {
        let _ = (epoch, to);
        self.drop_tenant(tenant).await
    }

    /// `POST /internal/tenants/{t}/outbound`: starts tracking what the
    /// tenant changes and answers the session id (pre-copy step 1, on the
    /// source). An executor without the route answers
    /// [`ErrorCode::NotFound`]: it moves tenants by stop-and-copy only.
    async fn start_outbound(&self, tenant: &TenantId) -> Result<String, UpstreamError>;

    /// `DELETE /internal/outbound/{s}`: ends a session without a move; the
    /// tenant thaws if its final round froze it (undo, on the source).
    async fn end_outbound(&self, session: &str) -> Result<(), UpstreamError>;

    /// `POST /internal/tenants/{t}/inbound`: pulls the tenant from
    /// `source`'s session while it runs there (pre-copy step 2, on the
    /// destination); answers what it copied.
    async fn pull(
        &self,
        tenant: &TenantId,
        source: &str,
        session: &str,
    ) -> Result<Transfer, UpstreamError>;

    /// `POST /internal/tenants/{t}/inbound/commit`: takes the final round
    /// (the source freezes the tenant) and publishes the tenant (pre-copy
    /// step 4, on the destination); answers what crossed in the pause.
    async fn commit(&self, tenant: &TenantId) -> Result<Transfer, UpstreamError>;

    /// `DELETE /internal/tenants/{t}/inbound`: discards what the
    /// destination staged, unless it committed; answers which (undo and
    /// recovery, on the destination).
    async fn discard(&self, tenant: &TenantId) -> Result<InboundState, UpstreamError>;
}

/// Bytes a pull or commit moved, as the destination counted them.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Deserialize)]
pub struct Transfer {
    /// Bytes of the streams.
    pub bytes: u64,
    /// Bytes of modules and assets files fetched (a pull).
    pub blob_bytes: u64,
    /// Rounds (a pull).
    pub rounds: u32,
    /// How long it took on the destination, in ms.
    pub ms: f64,
    /// How long its last round took, in ms (a pull).
    pub last_round_ms: f64,
}

pub use tensor_wasm_shared::api::InboundState;

/// Makes the [`ExecutorApi`] of the executor at an address; the fleet's
/// seam, replaced in unit tests by in-memory executors.
pub trait Connector: Send + Sync + fmt::Debug {
    /// The executor at `addr` (`host:port`, as registered or discovered).
    fn connect(&self, addr: &str) -> Arc<dyn ExecutorApi>;
}

/// [`ExecutorClient`]s that present the internal token.
#[derive(Clone)]
pub struct HttpConnector {
    token: String,
}

impl HttpConnector {
    pub fn new(internal_token: &str) -> HttpConnector {
        HttpConnector {
            token: internal_token.to_string(),
        }
    }
}

impl fmt::Debug for HttpConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConnector").finish_non_exhaustive()
    }
}

impl Connector for HttpConnector {
    fn connect(&self, addr: &str) -> Arc<dyn ExecutorApi> {
        Arc::new(ExecutorClient::new(addr, &self.token))
    }
}

/// One executor, as the proxy calls it.
#[derive(Clone)]
pub struct ExecutorClient {
    pub addr: String,
    token: String,
}

/// Without the internal token: the fleet holds clients as `dyn
/// ExecutorApi`, which is `Debug`, and a debug print must not leak it.
impl fmt::Debug for ExecutorClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecutorClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ExecutorClient {
    pub fn new(addr: &str, internal_token: &str) -> ExecutorClient {
        ExecutorClient {
            addr: addr.to_string(),
            token: internal_token.to_string(),
        }
    }

    /// `GET path`, the body of a 2xx answer.
    async fn get(&self, path: &str, timeout: Duration) -> Result<Bytes, UpstreamError> {
        self.call("GET", path, Bytes::new(), timeout).await
    }

    /// `method path` with `body` and no credential: for the calls that an
    /// executor answers to anyone, made to addresses not trusted yet.
    async fn call_anonymous(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, UpstreamError> {
        self.call_within(method, path, body, timeout, false, &[])
            .await
    }

    /// `POST path` with `body`, the body of a 2xx answer.
    async fn post(
        &self,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, UpstreamError> {
        self.call("POST", path, body, timeout).await
    }

    /// `DELETE path`.
    async fn delete(&self, path: &str, timeout: Duration) -> Result<Bytes, UpstreamError> {
        self.call("DELETE", path, Bytes::new(), timeout).await
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, UpstreamError> {
        self.call_within(method, path, body, timeout, true, &[])
            .await
    }

    async fn call_within(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
        timeout: Duration,
        with_token: bool,
        headers: &[(&'static str, String)],
    ) -> Result<Bytes, UpstreamError> {
        let call = self.call_inner(method, path, body, with_token, headers);
        match tokio::time::timeout(timeout, call).await {
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
        with_token: bool,
        headers: &[(&'static str, String)],
    ) -> Result<Bytes, UpstreamError> {
        let http = |e: &dyn fmt::Display| UpstreamError::Http {
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
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.addr)
            .header(CONTENT_TYPE, "application/octet-stream");
        if with_token {
            request = request.header(AUTHORIZATION, format!("Bearer {}", self.token));
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request.body(Full::new(body)).map_err(|e| http(&e))?;
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

fn tenant_path(tenant: &TenantId, op: &str) -> String {
    format!("/internal/tenants/{tenant}/{op}")
}

#[async_trait::async_trait]
impl ExecutorApi for ExecutorClient {
    async fn health(&self) -> Result<(), UpstreamError> {
        self.call_anonymous("GET", "/healthz", Bytes::new(), PROBE_TIMEOUT)
            .await
            .map(drop)
    }

    async fn identity(&self, nonce: &[u8]) -> Result<Identity, UpstreamError> {
        let challenge = Challenge {
            nonce: hex::encode(nonce),
        };
        let body = serde_json::to_vec(&challenge).expect("a challenge serializes");
        let body = self
            .call_anonymous("POST", "/internal/identity", body.into(), PROBE_TIMEOUT)
            .await?;
        serde_json::from_slice(&body).map_err(|source| UpstreamError::BadAnswer {
            addr: self.addr.clone(),
            source,
        })
    }

    async fn info(&self, within: Duration) -> Result<ExecutorInfo, UpstreamError> {
        let body = self.get("/internal/info", within).await?;
        serde_json::from_slice(&body).map_err(|source| UpstreamError::BadAnswer {
            addr: self.addr.clone(),
            source,
        })
    }

    async fn modules(&self, tenant: &TenantId) -> Result<Vec<String>, UpstreamError> {
        let body = self
            .get(&tenant_path(tenant, "modules"), CONTROL_TIMEOUT)
            .await?;
        let list = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
        Ok(list["modules"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn module(&self, tenant: &TenantId, id: &str) -> Result<Bytes, UpstreamError> {
        self.get(
            &format!("/internal/tenants/{tenant}/modules/{id}"),
            TRANSFER_TIMEOUT,
        )
        .await
    }

    async fn precompile(&self, wasm: Bytes) -> Result<(), UpstreamError> {
        self.post("/internal/modules", wasm, TRANSFER_TIMEOUT)
            .await
            .map(drop)
    }

    async fn export(&self, tenant: &TenantId) -> Result<Bytes, UpstreamError> {
        self.post(
            &tenant_path(tenant, "export"),
            Bytes::new(),
            TRANSFER_TIMEOUT,
        )
        .await
    }

    async fn import(&self, tenant: &TenantId, snapshot: Bytes) -> Result<(), UpstreamError> {
        self.post(&tenant_path(tenant, "import"), snapshot, TRANSFER_TIMEOUT)
            .await
            .map(drop)
    }

    async fn export_sealed(&self, tenant: &TenantId, id: &str) -> Result<Bytes, UpstreamError> {
        self.post(
            &tenant_path(tenant, &format!("export?move={id}")),
            Bytes::new(),
            TRANSFER_TIMEOUT,
        )
        .await
    }

    async fn import_sealed(
        &self,
        tenant: &TenantId,
        snapshot: Bytes,
        seal: Option<&str>,
    ) -> Result<(), UpstreamError> {
        let Some(id) = seal else {
            return self.import(tenant, snapshot).await;
        };
        self.post(
            &tenant_path(tenant, &format!("import?move={id}")),
            snapshot,
            TRANSFER_TIMEOUT,
        )
        .await
        .map(drop)
    }

    async fn import_replacing(
        &self,
        tenant: &TenantId,
        snapshot: Bytes,
    ) -> Result<(), UpstreamError> {
        self.post(
            &tenant_path(tenant, "import?replace=true"),
            snapshot,
            TRANSFER_TIMEOUT,
        )
        .await
        .map(drop)
    }

    async fn thaw(&self, tenant: &TenantId) -> Result<(), UpstreamError> {
        self.post(&tenant_path(tenant, "thaw"), Bytes::new(), CONTROL_TIMEOUT)
            .await
            .map(drop)
    }

    async fn drop_tenant(&self, tenant: &TenantId) -> Result<(), UpstreamError> {
        self.delete(&format!("/internal/tenants/{tenant}"), CONTROL_TIMEOUT)
            .await
            .map(drop)
    }

    async fn drop_moved(
        &self,
        tenant: &TenantId,
        epoch: i64,
        to: Option<&str>,
    ) -> Result<(), UpstreamError> {
        let mut headers = vec![(tensor_wasm_shared::headers::EPOCH, epoch.to_string())];
        if let Some(to) = to {
            headers.push((tensor_wasm_shared::headers::MOVED_TO, to.to_string()));
        }
        self.call_within(
            "DELETE",
            &format!("/internal/tenants/{tenant}"),
            Bytes::new(),
            CONTROL_TIMEOUT,
            true,
            &headers,
        )
        .await
        .map(drop)
    }

    async fn start_outbound(&self, tenant: &TenantId) -> Result<String, UpstreamError> {
        let body = self
            .post(
                &tenant_path(tenant, "outbound"),
                Bytes::new(),
                CONTROL_TIMEOUT,
            )
            .await?;
        let v: serde_json::Value = self.json(&body)?;
        v["session"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| self.bad_answer("no session in the answer"))
    }

    async fn end_outbound(&self, session: &str) -> Result<(), UpstreamError> {
        self.delete(&format!("/internal/outbound/{session}"), CONTROL_TIMEOUT)
            .await
            .map(drop)
    }

    async fn pull(
        &self,
        tenant: &TenantId,
        source: &str,
        session: &str,
    ) -> Result<Transfer, UpstreamError> {
        let req = serde_json::json!({ "source": source, "session": session }).to_string();
        let body = self
            .post(
                &tenant_path(tenant, "inbound"),
                Bytes::from(req),
                TRANSFER_TIMEOUT,
            )
            .await?;
        let v: serde_json::Value = self.json(&body)?;
        let rounds = v["rounds"].as_array().map_or(&[][..], Vec::as_slice);
        Ok(Transfer {
            bytes: rounds.iter().filter_map(|r| r["bytes"].as_u64()).sum(),
            blob_bytes: v["blob_bytes"].as_u64().unwrap_or(0),
            rounds: rounds.len() as u32,
            ms: v["ms"].as_f64().unwrap_or(0.0),
            last_round_ms: rounds.last().and_then(|r| r["ms"].as_f64()).unwrap_or(0.0),
        })
    }

    async fn commit(&self, tenant: &TenantId) -> Result<Transfer, UpstreamError> {
        let body = self
            .post(
                &format!("/internal/tenants/{tenant}/inbound/commit"),
                Bytes::new(),
                TRANSFER_TIMEOUT,
            )
            .await?;
        let v: serde_json::Value = self.json(&body)?;
        Ok(Transfer {
            bytes: v["bytes"].as_u64().unwrap_or(0),
            ms: v["ms"].as_f64().unwrap_or(0.0),
            ..Transfer::default()
        })
    }

    async fn discard(&self, tenant: &TenantId) -> Result<InboundState, UpstreamError> {
        let body = self
            .delete(&tenant_path(tenant, "inbound"), CONTROL_TIMEOUT)
            .await?;
        let v: serde_json::Value = self.json(&body)?;
        serde_json::from_value(v["state"].clone()).map_err(|source| UpstreamError::BadAnswer {
            addr: self.addr.clone(),
            source,
        })
    }
}

impl ExecutorClient {
    fn json(&self, body: &[u8]) -> Result<serde_json::Value, UpstreamError> {
        serde_json::from_slice(body).map_err(|source| UpstreamError::BadAnswer {
            addr: self.addr.clone(),
            source,
        })
    }

    fn bad_answer(&self, what: &str) -> UpstreamError {
        UpstreamError::BadAnswer {
            addr: self.addr.clone(),
            source: <serde_json::Error as serde::de::Error>::custom(what),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_debug_print_of_a_client_holds_no_token() {
        let c = HttpConnector::new("s3cret-internal").connect("127.0.0.1:1");
        let printed = format!("{c:?}");
        assert!(printed.contains("127.0.0.1:1"), "{printed}");
        assert!(!printed.contains("s3cret"), "{printed}");
    }
}
