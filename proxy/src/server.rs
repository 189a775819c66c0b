//! Assembling and running the proxy process.
//!
//! One pingora `Server` holds three services: the public proxy
//! ([`crate::service`]), the admin API ([`crate::admin`]) and the upkeep
//! task (health probes, rate-limiter pruning, recovery of recorded moves).
//! Signals are ours ([`Signals`]): SIGHUP re-reads the token file, SIGQUIT
//! starts a socket hand-off, SIGTERM a graceful stop, SIGINT a fast one.
//!
//! Graceful restart with `-u` (`docs/UPGRADE.md`, "The proxy"), step by step:
//!
//! 1. The new process starts with `upgrade = true` and the same state
//!    directory; `bootstrap()` blocks until the old one hands over its
//!    listening sockets.
//! 2. The operator sends the old process SIGQUIT. It stops recording
//!    placements (new tenants are routed where consistent hashing puts
//!    them, which is where the successor will record them), answers with
//!    `Connection: close` from now on, and sends its sockets.
//! 3. The new process's `bootstrap()` returns and only then reads the
//!    placement file — after the old process stopped writing it — and starts
//!    serving on the inherited sockets.
//! 4. The old process finishes the requests it has, flushes and fsyncs the
//!    audit log, and exits. No connection is refused at any point: the
//!    listening sockets never close.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::ConnectOptions;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::TcpSocketOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service;
use tensor_wasm_shared::TenantId;

use crate::admin::AdminApi;
use crate::audit::{AuditConfig, AuditLog};
use crate::auth::{TokenError, TokenTable};
use crate::conn::{ConnLimits, Guarded};
use crate::fleet::{Fleet, Probe, QueueLimits, RegisterError};
use crate::metrics::ProxyMetrics;
use crate::migrate::Orchestrator;
use crate::placement::etcd::EtcdPlacements;
use crate::placement::{PlacementStore, Placements};
use crate::ratelimit::{Rate, RateError, RateLimits};
use crate::service::{PublicProxy, Shared};
use crate::upstream::UpstreamError;

/// Where tokens come from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// `TENSOR_WASM_API_TOKENS`: `token:tenant` entries, comma separated.
    List(String),
    /// `TENSOR_WASM_API_TOKENS_FILE`: one entry per line, re-read on SIGHUP.
    File(PathBuf),
}

impl TokenSource {
    pub fn load(&self) -> Result<TokenTable, ProxyError> {
        match self {
            TokenSource::List(list) => Ok(TokenTable::parse_list(list)?),
            TokenSource::File(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| ProxyError::Io(path.clone(), e))?;
                Ok(TokenTable::parse_file(&text)?)
            }
        }
    }
}

/// Everything the proxy process is configured with (`docs/CONFIG.md`).
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Public listener, `127.0.0.1:8080` by default.
    pub listen: String,
    /// Admin listener, `127.0.0.1:9090` by default.
    pub admin_listen: String,
    /// Certificate and key (PEM) for TLS on the public listener.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Placement table, stored snapshots of moves, the upgrade socket.
    pub state_dir: PathBuf,
    pub tokens: TokenSource,
    pub internal_token: String,
    pub admin_token: Option<String>,
    pub rate: Rate,
    pub rate_overrides: Vec<(TenantId, Rate)>,
    pub audit: Option<AuditConfig>,
    /// Executors to register at start, besides those the state remembers.
    pub executors: Vec<(String, String)>,
    /// `host:port` of a DNS name listing executors (a Kubernetes headless
    /// Service): resolved on every health tick; each address is registered
    /// under the id its executor reports.
    pub executor_dns: Option<String>,
    pub queue: QueueLimits,
    /// Time between health probes of each executor; 1 s bounds how long a
    /// dead executor's tenants are tried before they get 503 at once.
    pub health_interval: Duration,
    /// Worker threads of the public listener.
    pub threads: usize,
    /// Take the listening sockets over from a running proxy (`-u`).
    pub upgrade: bool,
    /// Bind the public listener with SO_REUSEPORT, shared with the other
    /// proxies of the machine (`tensor-wasm up --proxies N`).
    pub reuse_port: bool,
    /// Seconds a stopping proxy keeps serving requests it already has.
    pub grace_period_secs: u64,
    /// Caps on client connections of the public listener and their
    /// header and idle timeouts.
    pub connections: ConnLimits,
    /// Where the placement table lives.
    pub placement: PlacementSource,
}

/// Where the placement table lives (`docs/CONFIG.md`, `--placement`).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum PlacementSource {
    /// `placements.json` in the state directory: one proxy.
    #[default]
    File,
    /// etcd, shared by every proxy of the fleet.
    Etcd {
        /// `http://host:port` or `https://host:port`, one per member.
        endpoints: Vec<String>,
        /// Prefix of every key, ending in `/`.
        prefix: String,
        /// etcd's user and password, when it has auth enabled.
        user: Option<(String, String)>,
        /// CA certificate (PEM) that signed the members' certificates,
        /// for `etcds://`; the system's roots when absent.
        ca: Option<PathBuf>,
    },
}

impl std::fmt::Debug for PlacementSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlacementSource::File => f.write_str("File"),
            PlacementSource::Etcd {
                endpoints,
                prefix,
                user,
                ca,
            } => f
                .debug_struct("Etcd")
                .field("endpoints", endpoints)
                .field("prefix", prefix)
                .field("user", &user.as_ref().map(|(u, _)| u))
                .field("ca", ca)
                .finish(),
        }
    }
}

impl PlacementSource {
    /// Parses `--placement`: `file`, or `etcd://host:port[,host:port…][/prefix]`
    /// (`etcds://` for TLS).
    pub fn parse(text: &str) -> Result<PlacementSource, String> {
        if text == "file" {
            return Ok(PlacementSource::File);
        }
        let (scheme, rest) = if let Some(rest) = text.strip_prefix("etcd://") {
            ("http", rest)
        } else if let Some(rest) = text.strip_prefix("etcds://") {
            ("https", rest)
        } else {
            return Err(format!(
                "{text:?}: expected `file` or etcd://host:port[,host:port…][/prefix]"
            ));
        };
        let (hosts, prefix) = match rest.split_once('/') {
            Some((hosts, "")) => (hosts, crate::placement::etcd::DEFAULT_PREFIX.to_string()),
            Some((hosts, prefix)) => (hosts, format!("/{}/", prefix.trim_matches('/'))),
            None => (rest, crate::placement::etcd::DEFAULT_PREFIX.to_string()),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(format!("{text:?}: no etcd endpoint"));
        }
        if let Some(bad) = hosts.split(',').map(str::trim).find(|h| {
            h.rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        }) {
            return Err(format!("{text:?}: {bad:?} is not host:port"));
        }
        Ok(PlacementSource::Etcd {
            endpoints,
            prefix,
            user: None,
            ca: None,
        })
    }
}

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Tokens(#[from] TokenError),
    #[error(transparent)]
    Rate(#[from] RateError),
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("TLS on {0}: {1}")]
    Tls(String, String),
    #[error("the internal token must not be empty")]
    NoInternalToken,
    #[error("placement table: {0}")]
    Placement(String),
}

/// Runs the proxy until a signal stops it.
pub fn run(config: ProxyConfig) -> Result<(), ProxyError> {
    if config.internal_token.is_empty() {
        return Err(ProxyError::NoInternalToken);
    }
    let tokens = config.tokens.load()?;
    if tokens.is_empty() {
        tracing::warn!("no API tokens configured: every public request will get 401");
    }
    let limits = RateLimits::new(config.rate, &config.rate_overrides)?;
    tensor_wasm_shared::files::private_dir(&config.state_dir)
        .map_err(|e| ProxyError::Io(config.state_dir.clone(), e))?;

    let opt = Opt {
        upgrade: config.upgrade,
        daemon: false,
        nocapture: false,
        test: false,
        conf: None,
    };
    let conf = ServerConf {
        threads: config.threads.max(1),
        upgrade_sock: config
            .state_dir
            .join("proxy-upgrade.sock")
            .to_string_lossy()
            .into_owned(),
        pid_file: config
            .state_dir
            .join("proxy.pid")
            .to_string_lossy()
            .into_owned(),
        // Idle upstream connections kept per worker thread. pingora closes
        // one on release when the pool is full, so it must exceed the peak
        // of requests in flight to executors, or every request beyond it
        // reconnects (bench/PROXY-FINDINGS.md).
        upstream_keepalive_pool_size: 1024,
        grace_period_seconds: Some(config.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(config.grace_period_secs.max(1)),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // Step 1–3 of the module doc: with -u this waits for the sockets.
    server.bootstrap();

    let metrics = Arc::new(ProxyMetrics::new(&tensor_wasm_shared::build::labels(
        "proxy", "rustls",
    )));
    let audit = match &config.audit {
        Some(a) => Some(Arc::new(
            AuditLog::open(
                a.clone(),
                crate::audit::AuditCounters {
                    written: metrics.audit_records.clone(),
                    failures: metrics.audit_failures.clone(),
                },
            )
            .map_err(|e| ProxyError::Io(a.path.clone(), e))?,
        )),
        None => None,
    };
    // The placement table's own runtime: etcd's client and its watch live
    // on it, whichever listener's runtime calls them.
    let placement_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("placement")
        .enable_all()
        .build()
        .map_err(|e| ProxyError::Placement(format!("cannot start its runtime: {e}")))?;
    let fleet = Arc::new(placement_rt.block_on(open_fleet(&config))?);
    {
        let _runtime = placement_rt.enter();
        fleet.follow_moves();
    }
    let orchestrator = Arc::new(Orchestrator::new(fleet.clone(), metrics.clone()));
    let held = orchestrator.hold_recorded_moves();
    if held > 0 {
        tracing::info!(moves = held, "found unfinished moves; finishing them");
    }
    let shared = Arc::new(Shared::new(
        tokens,
        limits,
        fleet.clone(),
        metrics.clone(),
        audit.clone(),
    ));

    let server_conf = server.configuration.clone();
    let mut proxy = pingora::proxy::HttpProxy::new(
        PublicProxy {
            shared: shared.clone(),
        },
        server_conf.clone(),
    );
    proxy.handle_init_modules();
    let mut public = Service::new(
        "public".to_string(),
        Guarded::new(proxy, config.connections, metrics.connections.clone()),
    );
    // Proxies sharing a port (SO_REUSEPORT): the kernel spreads new
    // connections across them.
    let sock = config.reuse_port.then(|| {
        let mut sock = TcpSocketOptions::default();
        sock.so_reuseport = Some(true);
        sock
    });
    match (&config.tls, sock) {
        (Some((cert, key)), sock) => {
            let settings =
                TlsSettings::intermediate(&cert.to_string_lossy(), &key.to_string_lossy())
                    .map_err(|e| ProxyError::Tls(config.listen.clone(), e.to_string()))?;
            public.add_tls_with_settings(&config.listen, sock, settings);
        }
        (None, Some(sock)) => public.add_tcp_with_settings(&config.listen, sock),
        (None, None) => public.add_tcp(&config.listen),
    }
    server.add_service(public);

    let mut admin = Service::new(
        "admin".to_string(),
        HttpServer::new_app(AdminApi {
            shared: shared.clone(),
            orchestrator: orchestrator.clone(),
            token: config.admin_token.clone().filter(|t| !t.is_empty()),
        }),
    );
    admin.add_tcp(&config.admin_listen);
    server.add_service(admin);

    server.add_service(background_service(
        "upkeep",
        Upkeep {
            shared: shared.clone(),
            orchestrator,
            interval: config.health_interval,
            dns: config.executor_dns.clone(),
        },
    ));

    tracing::info!(
        listen = %config.listen,
        admin = %config.admin_listen,
        tls = config.tls.is_some(),
        max_connections = config.connections.max,
        executors = fleet.executors().len(),
        state = %config.state_dir.display(),
        "proxy serving"
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            shared,
            tokens: config.tokens.clone(),
        }),
    });
    if let Some(audit) = audit {
        audit.close();
    }
    placement_rt.block_on(fleet.table().leave());
    tracing::info!("proxy stopped");
    drop(placement_rt);
    Ok(())
}

/// How long a starting proxy waits for an etcd that does not answer yet.
const ETCD_START_PATIENCE: Duration = Duration::from_secs(60);

/// This proxy's id among those sharing a placement table: the host's name
/// (a pod's, on Kubernetes), the admin port, and a random part, so that a
/// restarted proxy never takes the place of its former self.
fn proxy_id(admin_listen: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "proxy".into());
    let port = admin_listen.rsplit(':').next().unwrap_or("0");
    let random = hex::encode(&tensor_wasm_shared::identity::nonce()[..4]);
    let name: String = format!("{host}-{port}-{random}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name
}

/// The fleet, with its placement table where `config` says.
async fn open_fleet(config: &ProxyConfig) -> Result<Fleet, ProxyError> {
    let connector = Arc::new(crate::upstream::HttpConnector::new(&config.internal_token));
    let table: PlacementStore = match &config.placement {
        PlacementSource::File => Placements::load(&config.state_dir.join("placements.json"))
            .map_err(|e| ProxyError::Placement(e.to_string()))?
            .into(),
        PlacementSource::Etcd {
            endpoints,
            prefix,
            user,
            ca,
        } => {
            let mut options = ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(5))
                .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
            if let Some((name, password)) = user {
                options = options.with_user(name.clone(), password.clone());
            }
            if endpoints.iter().any(|e| e.starts_with("https://")) {
                let mut tls = etcd_client::TlsOptions::new();
                if let Some(ca) = ca {
                    let pem = std::fs::read(ca).map_err(|e| ProxyError::Io(ca.clone(), e))?;
                    tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
                }
                options = options.with_tls(tls);
            }
            // etcd may come up after the proxies (a fresh cluster, a slow
            // disk): wait for it a while rather than exit at once, unless
            // it refuses this proxy.
            let started = std::time::Instant::now();
            let table = loop {
                match EtcdPlacements::connect(endpoints, prefix, Some(options.clone())).await {
                    Ok(table) => break table,
                    Err(e) if e.is_transient() && started.elapsed() < ETCD_START_PATIENCE => {
                        tracing::warn!(error = %e, "etcd not reachable yet; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => return Err(ProxyError::Placement(e.to_string())),
                }
            };
            import_file_table(&table, &config.state_dir).await?;
            let id = proxy_id(&config.admin_listen);
            while let Err(e) = table.join(&id).await {
                if started.elapsed() >= ETCD_START_PATIENCE {
                    return Err(ProxyError::Placement(e.to_string()));
                }
                tracing::warn!(error = %e, "cannot join the proxies in etcd yet; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            tracing::info!(endpoints = %endpoints.join(","), %prefix, revision = table.revision(), proxy = %id, "placement table in etcd");
            table.into()
        }
    };
    Ok(Fleet::open_store(
        table,
        &config.state_dir,
        &config.internal_token,
        connector,
        config.queue,
        &config.executors,
    )
    .await?)
}

/// A proxy that moves from the file to etcd brings its table along: the
/// first one to start with `--placement etcd://…` imports the
/// `placements.json` of its state dir while etcd holds no tenant, then
/// renames it `placements.json.imported`, so that it is never imported
/// twice (`docs/DEPLOYMENT.md`, "More than one proxy").
async fn import_file_table(table: &EtcdPlacements, state_dir: &Path) -> Result<(), ProxyError> {
    let path = state_dir.join("placements.json");
    if !path.exists() {
        return Ok(());
    }
    let file = Placements::load(&path).map_err(|e| ProxyError::Placement(e.to_string()))?;
    let imported = table
        .import(file.state())
        .await
        .map_err(|e| ProxyError::Placement(format!("importing {}: {e}", path.display())))?;
    match imported {
        Some(tenants) => {
            let kept = path.with_extension("json.imported");
            std::fs::rename(&path, &kept).map_err(|e| ProxyError::Io(path.clone(), e))?;
            tracing::info!(
                tenants,
                executors = file.state().executors.len(),
                kept = %kept.display(),
                "placement file imported into etcd"
            );
        }
        None => tracing::warn!(
            file = %path.display(),
            "etcd holds tenants already: the placement file was not imported"
        ),
    }
    Ok(())
}

/// The proxy's signals (module doc).
struct Signals {
    shared: Arc<Shared>,
    tokens: TokenSource,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut quit), Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => match self.tokens.load() {
                    Ok(table) => {
                        tracing::info!(tokens = table.len(), "tokens reloaded");
                        self.shared.set_tokens(table);
                    }
                    Err(e) => tracing::error!(error = %e, "token reload failed; keeping the old tokens"),
                },
                _ = quit.recv() => {
                    tracing::info!("SIGQUIT: handing sockets to the new proxy");
                    self.shared.fleet.begin_handoff();
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = term.recv() => {
                    tracing::info!("SIGTERM: stopping gracefully");
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: stopping");
                    return ShutdownSignal::FastShutdown;
                }
            }
        }
    }
}

/// Health probes, rate-limiter pruning, recovery of recorded moves.
struct Upkeep {
    shared: Arc<Shared>,
    orchestrator: Arc<Orchestrator>,
    interval: Duration,
    dns: Option<String>,
}

/// Ticks between reconciliations of every executor's tenants with the
/// placement table (also done at the first tick and when an executor comes
/// back): 25, so a copy a move left behind on an executor that restarted
/// goes within seconds.
const RECONCILE_EVERY: u32 = 25;

/// Ticks between prunings of idle rate-limiter keys.
const PRUNE_EVERY: u32 = 60;

impl Upkeep {
    /// Probes every executor; one that is back is reconciled, and with
    /// `all`, every one that answers.
    async fn probe_all(&self, all: bool) {
        let fleet = &self.shared.fleet;
        let probes = fleet.executors().into_iter().map(|exec| async move {
            let probe = match fleet.client(&exec).health().await {
                Ok(()) => Probe::Answered,
                Err(UpstreamError::Timeout { .. }) => Probe::Late,
                Err(_) => Probe::Failed,
            };
            let ok = exec.probed(probe);
            let changed = exec.set_healthy(ok);
            if changed {
                if ok {
                    tracing::info!(executor = %exec.id, "executor healthy again");
                } else {
                    tracing::warn!(executor = %exec.id, addr = %exec.addr, "executor failed its health probe");
                }
            }
            if probe == Probe::Answered && (changed || all) {
                self.orchestrator.reconcile(&exec).await;
            }
        });
        futures_util::future::join_all(probes).await;
    }

    /// Registers executors that `name` resolves to and that are not known
    /// at that address yet, under the id each proves it has
    /// ([`Fleet::discover`]). An id known at an address that the name no
    /// longer resolves to moves to its new one.
    async fn discover(&self, name: &str) {
        let fleet = &self.shared.fleet;
        let addrs = match tokio::net::lookup_host(name).await {
            Ok(a) => a.collect::<Vec<_>>(),
            Err(e) => {
                tracing::debug!(%name, error = %e, "executor DNS lookup failed");
                return;
            }
        };
        let known: Vec<std::net::SocketAddr> = fleet.executors().iter().map(|e| e.sock).collect();
        for addr in addrs.iter().filter(|a| !known.contains(a)) {
            match fleet
                .discover(&addr.to_string(), |old| addrs.contains(&old))
                .await
            {
                Ok(exec) => {
                    tracing::info!(executor = %exec.id, %addr, "executor discovered by DNS")
                }
                Err(e @ RegisterError::Unanswered { .. }) => {
                    tracing::debug!(%addr, error = %e, "discovered executor not answering yet");
                }
                Err(e) => tracing::warn!(%addr, error = %e, "discovered executor refused"),
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Upkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            if let Some(name) = &self.dns {
                self.discover(name).await;
            }
            self.shared.fleet.follow_executors();
            self.probe_all(ticks.is_multiple_of(RECONCILE_EVERY)).await;
            self.orchestrator.adopt_orphaned_moves().await;
            self.orchestrator.recover().await;
            ticks = ticks.wrapping_add(1);
            if ticks.is_multiple_of(PRUNE_EVERY) {
                self.shared.limits.prune();
            }
        }
    }
}
