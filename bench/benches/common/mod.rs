//! What the benches that call an executor over HTTP share: an executor
//! serving on loopback in the bench's process, a keep-alive client of it,
//! and percentiles.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use tensor_wasm_executor::config::{EngineLimits, TenantQuotas};
use tensor_wasm_executor::registry::Registry;
use tensor_wasm_executor::server::{DeviceChoice, Executor, ExecutorConfig};

/// The internal token of the executors these benches call.
pub const TOKEN: &str = "loopback-bench-internal-token-0123456789";

/// p-th percentile of sorted `v`.
pub fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Milliseconds, as the tables print them.
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// An executor serving on loopback from `dir`, as `tensor-wasm executor`
/// runs it (its checkpointer included).
pub struct Served {
    pub registry: Arc<Registry>,
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<()>,
}

impl Served {
    pub fn start(
        tokio: &tokio::runtime::Runtime,
        dir: &Path,
        limits: EngineLimits,
        quotas: TenantQuotas,
    ) -> Served {
        let cfg = ExecutorConfig {
            id: "bench".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: dir.to_path_buf(),
            internal_token: TOKEN.into(),
            device: DeviceChoice::Cpu,
            limits,
            quotas,
            snapshot_key: None,
            page_tracking: Default::default(),
            module_cache_dir: None,
        };
        let executor = tokio.block_on(Executor::start(cfg, "")).unwrap();
        let addr = executor.local_addr().unwrap();
        let registry = executor.app.registry.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio.spawn(async move {
            let _ = executor
                .serve(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Served {
            registry,
            addr,
            stop,
            served,
        }
    }

    /// Stops serving, and waits for it.
    pub fn stop(self, tokio: &tokio::runtime::Runtime) {
        let _ = self.stop.send(());
        let _ = tokio.block_on(self.served);
    }
}

/// One keep-alive connection to an executor, calling as `tenant`, or to
/// a proxy, with a tenant's API token.
pub struct HttpCaller {
    send: hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>>,
    /// The bearer token: the executors' internal one, or a tenant's.
    token: String,
    /// The tenant named to an executor; a proxy takes it from the token.
    tenant: Option<String>,
}

impl HttpCaller {
    /// A connection to an executor at `addr`, calling as `tenant`.
    pub async fn connect(addr: std::net::SocketAddr, tenant: &str) -> HttpCaller {
        let mut caller = HttpCaller::connect_with(addr, TOKEN).await;
        caller.tenant = Some(tenant.to_string());
        caller
    }

    /// A connection to `addr` that sends `token` as its bearer token and
    /// names no tenant: a proxy's client.
    pub async fn connect_with(addr: std::net::SocketAddr, token: &str) -> HttpCaller {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        HttpCaller {
            send,
            token: token.to_string(),
            tenant: None,
        }
    }

    /// `POST path` with `body`: the status and the body of the answer.
    pub async fn post(&mut self, path: &str, body: bytes::Bytes) -> (u16, bytes::Bytes) {
        self.send(hyper::Method::POST, path, body).await.unwrap()
    }

    /// `method path` with `body`: the status and the body of the answer,
    /// or the error that cut the exchange (a closed connection).
    pub async fn send(
        &mut self,
        method: hyper::Method,
        path: &str,
        body: bytes::Bytes,
    ) -> Result<(u16, bytes::Bytes), hyper::Error> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "executor")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/octet-stream");
        if let Some(tenant) = &self.tenant {
            request = request.header("x-tensor-wasm-tenant", tenant.as_str());
        }
        let request = request.body(Full::new(body)).unwrap();
        let response = self.send.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}
