//! `tensor-wasm proxy`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use tensor_wasm_proxy::audit::AuditConfig;
use tensor_wasm_proxy::conn::ConnLimits;
use tensor_wasm_proxy::fleet::QueueLimits;
use tensor_wasm_proxy::ratelimit::Rate;
use tensor_wasm_proxy::{PlacementSource, ProxyConfig, TokenSource};
use tensor_wasm_shared::TenantId;
use tensor_wasm_shared::names::env;

/// Flags of `tensor-wasm proxy`; each has an environment fallback.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Public listener (clients).
    #[arg(
        long,
        env = env::PROXY_LISTEN,
        default_value = "127.0.0.1:8080"
    )]
    listen: String,
    /// Admin listener; keep it private.
    #[arg(
        long,
        env = env::ADMIN_LISTEN,
        default_value = "127.0.0.1:9090"
    )]
    admin_listen: String,
    /// PEM certificate chain for TLS on the public listener (with --tls-key).
    #[arg(long, env = env::TLS_CERT, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the public listener (with --tls-cert).
    #[arg(long, env = env::TLS_KEY, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Placement table, stored snapshots of moves, the upgrade socket.
    #[arg(
        long,
        env = env::STATE_DIR,
        default_value = "./tensor-wasm-state/proxy"
    )]
    state_dir: PathBuf,
    /// API tokens: `token:tenant` entries, comma separated.
    #[arg(
        long,
        env = env::API_TOKENS,
        hide_env_values = true,
        conflicts_with = "tokens_file"
    )]
    tokens: Option<String>,
    /// File of `token:tenant` entries, one per line; re-read on SIGHUP.
    #[arg(long, env = env::API_TOKENS_FILE)]
    tokens_file: Option<PathBuf>,
    /// Token the proxy presents to executors.
    #[arg(long, env = env::INTERNAL_TOKEN, hide_env_values = true)]
    internal_token: String,
    /// Token of the admin API; without it the admin API refuses every call.
    #[arg(long, env = env::ADMIN_TOKEN, hide_env_values = true)]
    admin_token: Option<String>,
    /// Sustained requests per second per tenant (may be fractional).
    #[arg(long, env = env::API_RATE_LIMIT_QPS, default_value_t = 100.0)]
    rate_limit_qps: f64,
    /// Requests a tenant may send at once after a quiet spell.
    #[arg(long, env = env::API_RATE_LIMIT_BURST, default_value_t = 200)]
    rate_limit_burst: u32,
    /// Per-tenant limits, `tenant=qps[:burst]`, comma separated or repeated.
    #[arg(
        long,
        env = env::API_RATE_LIMIT_OVERRIDES,
        value_delimiter = ','
    )]
    rate_limit_override: Vec<String>,
    /// Audit log (JSON lines); no audit log when unset.
    #[arg(long, env = env::API_AUDIT_LOG)]
    audit_log: Option<PathBuf>,
    /// Size at which the audit log is rotated, in bytes.
    #[arg(long, env = env::API_AUDIT_MAX_BYTES, default_value_t = 64 << 20)]
    audit_max_bytes: u64,
    /// Rotated audit files kept.
    #[arg(long, env = env::API_AUDIT_KEEP, default_value_t = 10)]
    audit_keep: usize,
    /// Executors to register at start, `id=host:port`, comma separated or
    /// repeated; those registered before are remembered in the state dir.
    #[arg(long, env = env::EXECUTORS, value_delimiter = ',')]
    executor: Vec<String>,
    /// DNS name and port listing executors (a Kubernetes headless Service),
    /// resolved on every health probe; each is registered under the id it
    /// reports.
    #[arg(long, env = env::EXECUTOR_DNS)]
    executor_dns: Option<String>,
    /// Where the placement table lives: `file` (in the state dir; one
    /// proxy) or `etcd://host:port[,host:port…][/prefix]`, shared by every
    /// proxy of the fleet (`etcds://` for TLS).
    #[arg(long, env = env::PLACEMENT, default_value = "file")]
    placement: String,
    /// etcd user, when etcd has auth enabled (with the password from
    /// TENSOR_WASM_ETCD_PASSWORD).
    #[arg(long, env = env::ETCD_USER, requires = "etcd_password")]
    etcd_user: Option<String>,
    /// etcd password of --etcd-user.
    #[arg(long, env = env::ETCD_PASSWORD, hide_env_values = true)]
    etcd_password: Option<String>,
    /// CA certificate (PEM) of etcd's members, for etcds://.
    #[arg(long, env = env::ETCD_CA)]
    etcd_ca: Option<PathBuf>,
    /// Longest a request waits for its tenant's migration, in ms.
    #[arg(
        long,
        env = env::MIGRATION_QUEUE_DEADLINE_MS,
        default_value_t = 5_000
    )]
    queue_deadline_ms: u64,
    /// Requests of one tenant that may wait for its migration at once.
    #[arg(
        long,
        env = env::MIGRATION_QUEUE_CAPACITY,
        default_value_t = 1024
    )]
    queue_capacity: usize,
    /// Time between health probes of each executor, in ms.
    #[arg(long, env = env::HEALTH_INTERVAL_MS, default_value_t = 1_000)]
    health_interval_ms: u64,
    /// Worker threads of the public listener (0: one per CPU).
    #[arg(long, env = env::PROXY_THREADS, default_value_t = 0)]
    threads: usize,
    /// Seconds a stopping proxy keeps serving the requests it has.
    #[arg(long, env = env::PROXY_GRACE_PERIOD_SECS, default_value_t = 5)]
    grace_period_secs: u64,
    /// Client connections open at once on the public listener (0: half the
    /// file descriptors the process may open, less 512).
    #[arg(long, env = env::PROXY_MAX_CONNECTIONS, default_value_t = 0)]
    max_connections: usize,
    /// Client connections open at once from one address (0: no cap).
    #[arg(long, env = env::PROXY_MAX_CONNECTIONS_PER_CLIENT, default_value_t = 1024)]
    max_connections_per_client: usize,
    /// Longest a request header may take to arrive, from its first byte
    /// (a new connection's accept), in ms.
    #[arg(long, env = env::PROXY_CLIENT_HEADER_TIMEOUT_MS, default_value_t = 10_000)]
    client_header_timeout_ms: u64,
    /// Longest a kept-alive client connection may wait for its next
    /// request, in ms.
    #[arg(long, env = env::PROXY_CLIENT_IDLE_TIMEOUT_MS, default_value_t = 60_000)]
    client_idle_timeout_ms: u64,
    /// Take the listening sockets over from a running proxy with the same
    /// state dir, then send that one SIGQUIT.
    #[arg(short = 'u', long)]
    upgrade: bool,
    /// Share the public listener's port with the other proxies of this
    /// machine (SO_REUSEPORT; the kernel spreads connections across them).
    #[arg(long, env = env::PROXY_REUSE_PORT)]
    reuse_port: bool,
}

fn parse_override(s: &str) -> anyhow::Result<(TenantId, Rate)> {
    let (tenant, rate) = s
        .split_once('=')
        .with_context(|| format!("rate limit override {s:?}: expected tenant=qps[:burst]"))?;
    let tenant = TenantId::new(tenant.trim())
        .map_err(|e| anyhow::anyhow!("rate limit override {s:?}: {e}"))?;
    let (qps, burst) = match rate.split_once(':') {
        Some((q, b)) => (q, Some(b)),
        None => (rate, None),
    };
    let qps: f64 = qps
        .trim()
        .parse()
        .with_context(|| format!("rate limit override {s:?}: qps is not a number"))?;
    let burst = match burst {
        Some(b) => b
            .trim()
            .parse()
            .with_context(|| format!("rate limit override {s:?}: burst is not a number"))?,
        None => (qps.ceil() as u32).max(1),
    };
    Ok((tenant, Rate { qps, burst }))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let tokens = match (args.tokens, args.tokens_file) {
        (Some(list), None) => TokenSource::List(list),
        (None, Some(file)) => TokenSource::File(file),
        (None, None) => bail!(
            "no API tokens: set {}=\"<token>:<tenant>,...\" or {}",
            env::API_TOKENS,
            env::API_TOKENS_FILE
        ),
        (Some(_), Some(_)) => {
            bail!(
                "set {} or {}, not both",
                env::API_TOKENS,
                env::API_TOKENS_FILE
            )
        }
    };
    let rate_overrides = args
        .rate_limit_override
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| parse_override(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let executors = args
        .executor
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.split_once('=')
                .map(|(id, addr)| (id.trim().to_string(), addr.trim().to_string()))
                .with_context(|| format!("executor {s:?}: expected id=host:port"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    if args.client_header_timeout_ms == 0 || args.client_idle_timeout_ms == 0 {
        bail!("the client header and idle timeouts must be above 0 ms");
    }
    let files = crate::sys::raise_file_limit();
    let connections = ConnLimits {
        max: match args.max_connections {
            0 => ConnLimits::max_for_files(files),
            n => n,
        },
        per_client: args.max_connections_per_client,
        header_timeout: Duration::from_millis(args.client_header_timeout_ms),
        idle_timeout: Duration::from_millis(args.client_idle_timeout_ms),
    };
    let mut placement =
        PlacementSource::parse(&args.placement).map_err(|e| anyhow::anyhow!("--placement {e}"))?;
    if let PlacementSource::Etcd { user, ca, .. } = &mut placement {
        *user = args.etcd_user.zip(args.etcd_password);
        *ca = args.etcd_ca;
    } else if args.etcd_user.is_some() || args.etcd_ca.is_some() {
        bail!("--etcd-user and --etcd-ca need --placement etcd://…");
    }
    let config = ProxyConfig {
        placement,
        connections,
        listen: args.listen,
        admin_listen: args.admin_listen,
        tls: args.tls_cert.zip(args.tls_key),
        state_dir: args.state_dir,
        tokens,
        internal_token: args.internal_token,
        admin_token: args.admin_token,
        rate: Rate {
            qps: args.rate_limit_qps,
            burst: args.rate_limit_burst,
        },
        rate_overrides,
        audit: args.audit_log.map(|path| AuditConfig {
            path,
            max_bytes: args.audit_max_bytes,
            keep: args.audit_keep,
        }),
        executors,
        executor_dns: args.executor_dns,
        queue: QueueLimits {
            deadline: Duration::from_millis(args.queue_deadline_ms),
            capacity: args.queue_capacity,
        },
        health_interval: Duration::from_millis(args.health_interval_ms.max(10)),
        threads,
        upgrade: args.upgrade,
        reuse_port: args.reuse_port,
        grace_period_secs: args.grace_period_secs,
    };
    tensor_wasm_proxy::run(config)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_with_and_without_burst() {
        let (t, r) = parse_override("acme=2.5:10").unwrap();
        assert_eq!(t.as_str(), "acme");
        assert_eq!(
            r,
            Rate {
                qps: 2.5,
                burst: 10
            }
        );
        let (_, r) = parse_override("acme=0.5").unwrap();
        assert_eq!(r, Rate { qps: 0.5, burst: 1 });
        assert!(parse_override("acme").is_err());
        assert!(parse_override("Bad=1").is_err());
        assert!(parse_override("acme=fast").is_err());
    }
}
