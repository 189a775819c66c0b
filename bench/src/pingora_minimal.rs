//! The smallest useful pingora proxy, as a yardstick for `tensor-wasm proxy`:
//! consistent hashing (ketama) of the `x-tenant` header over a fixed set of
//! upstreams, and nothing else (no auth, no rate limit, no logging).
//!
//! Two binaries run it: `pingora-minimal` (the system allocator) and
//! `pingora-minimal-mimalloc` (the same proxy on mimalloc).
//!
//! ```text
//! pingora-minimal --listen 127.0.0.1:18081 --upstream 127.0.0.1:18080 \
//!     [--upstream ADDR ...] [--profile tuned|stock] [--threads 1] \
//!     [--work-stealing true|false] [--pool-size N] [--idle-timeout-ms MS] \
//!     [--compression-module true|false]
//! ```
//!
//! `bench/proxy-vs-peers` runs it beside nginx and our proxy. `stock` is what
//! a first pingora program gets from the defaults; `tuned` applies the
//! settings listed in `bench/PROXY-FINDINGS.md`. The single-setting flags
//! override the profile, to measure one setting at a time.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use pingora::lb::LoadBalancer;
use pingora::lb::selection::consistent::KetamaHashing;
use pingora::modules::http::HttpModules;
use pingora::modules::http::compression::ResponseCompressionBuilder;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session, http_proxy_service};
use pingora::server::Server;
use pingora::server::configuration::ServerConf;

/// Header whose value picks the upstream; the same tenant always lands on
/// the same upstream while the set is unchanged.
const TENANT_HEADER: &str = "x-tenant";
/// Ketama points to walk before giving up on finding a healthy upstream;
/// 256 is what pingora's own examples use.
const MAX_SELECT_ITERATIONS: usize = 256;

/// The settings this binary varies; see `bench/PROXY-FINDINGS.md` for what
/// each one does to CPU per request and upstream connection reuse.
#[derive(Debug, Clone)]
struct Tuning {
    /// Worker threads of the proxy service (`ServerConf::threads`).
    threads: usize,
    /// `ServerConf::work_stealing`: `true` builds one multi-thread tokio
    /// runtime, `false` one current-thread runtime per worker thread.
    work_stealing: bool,
    /// `ServerConf::upstream_keepalive_pool_size`: idle upstream
    /// connections kept per worker thread (pingora multiplies it by
    /// `threads` for its global LRU).
    pool_size: usize,
    /// `PeerOptions::idle_timeout`: how long an idle upstream connection
    /// stays in the pool; `None` keeps it until the upstream closes it.
    idle_timeout: Option<Duration>,
    /// Whether `ProxyHttp::init_downstream_modules` keeps pingora's default
    /// (a response-compression module, added disabled, that still runs its
    /// filters on every request).
    compression_module: bool,
}

impl Tuning {
    /// pingora 0.9.1's defaults, as a first program gets them.
    fn stock() -> Self {
        let conf = ServerConf::default();
        Tuning {
            threads: conf.threads,
            work_stealing: conf.work_stealing,
            pool_size: conf.upstream_keepalive_pool_size,
            idle_timeout: None,
            compression_module: true,
        }
    }

    /// The settings that measured best on 2 cores (`bench/PROXY-FINDINGS.md`).
    fn tuned() -> Self {
        Tuning {
            threads: 1,
            // Measured within noise of `false` (one runtime per thread) at
            // one thread, so the default stays.
            work_stealing: true,
            // Larger than any client concurrency the bench drives (256),
            // so a burst never evicts a connection it will need next.
            pool_size: 1024,
            // Below nginx's 75 s `keepalive_timeout`, so the proxy, not the
            // upstream, retires idle connections (no reuse of a half-closed
            // socket), and long enough to outlast any pause in load.
            idle_timeout: Some(Duration::from_secs(60)),
            // No measurable gain, but a proxy that never compresses need
            // not run the module's filters.
            compression_module: false,
        }
    }
}

#[derive(Debug)]
struct Args {
    listen: String,
    upstreams: Vec<String>,
    tuning: Tuning,
}

const USAGE: &str = "usage: pingora-minimal --listen ADDR --upstream ADDR [--upstream ADDR ...] \
[--profile tuned|stock] [--threads N] [--work-stealing true|false] [--pool-size N] \
[--idle-timeout-ms MS (0: none)] [--compression-module true|false]";

fn parse_args(raw: Vec<String>) -> Result<Args> {
    // The profile sets the baseline; single-setting flags then override it,
    // wherever they appear on the line.
    let mut tuning = Tuning::tuned();
    if let Some(i) = raw.iter().position(|a| a == "--profile") {
        tuning = match raw.get(i + 1).map(String::as_str) {
            Some("tuned") => Tuning::tuned(),
            Some("stock") => Tuning::stock(),
            other => bail!("--profile takes tuned or stock, not {other:?}"),
        };
    }
    let mut listen = None;
    let mut upstreams = Vec::new();
    let mut it = raw.into_iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            bail!("{USAGE}");
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value),
            "--upstream" => upstreams.push(value),
            "--profile" => {}
            "--threads" => tuning.threads = value.parse().context("--threads")?,
            "--work-stealing" => tuning.work_stealing = value.parse().context("--work-stealing")?,
            "--pool-size" => tuning.pool_size = value.parse().context("--pool-size")?,
            "--compression-module" => {
                tuning.compression_module = value.parse().context("--compression-module")?;
            }
            "--idle-timeout-ms" => {
                let ms: u64 = value.parse().context("--idle-timeout-ms")?;
                tuning.idle_timeout = (ms > 0).then(|| Duration::from_millis(ms));
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let listen = listen.context("--listen is required")?;
    if upstreams.is_empty() {
        bail!("at least one --upstream is required");
    }
    if tuning.threads == 0 {
        bail!("--threads must be positive");
    }
    Ok(Args {
        listen,
        upstreams,
        tuning,
    })
}

/// Picks an upstream by hashing the tenant header; everything else is
/// pingora's default behaviour.
struct MinimalProxy {
    upstreams: LoadBalancer<KetamaHashing>,
    idle_timeout: Option<Duration>,
    compression_module: bool,
}

#[async_trait]
impl ProxyHttp for MinimalProxy {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    fn init_downstream_modules(&self, modules: &mut HttpModules) {
        if self.compression_module {
            modules.add_module(ResponseCompressionBuilder::enable(0));
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        let key = session
            .req_header()
            .headers
            .get(TENANT_HEADER)
            .map_or(&b""[..], |v| v.as_bytes());
        let backend = self
            .upstreams
            .select(key, MAX_SELECT_ITERATIONS)
            .ok_or_else(|| pingora::Error::new_str("no upstream"))?;
        let mut peer = HttpPeer::new(backend, false, String::new());
        peer.options.idle_timeout = self.idle_timeout;
        Ok(Box::new(peer))
    }
}

/// Parses the process arguments and serves until the process is stopped.
pub fn run() -> Result<()> {
    let args = parse_args(std::env::args().skip(1).collect())?;
    let upstreams = LoadBalancer::<KetamaHashing>::try_from_iter(&args.upstreams)
        .context("parsing --upstream addresses")?;

    let conf = ServerConf {
        threads: args.tuning.threads,
        work_stealing: args.tuning.work_stealing,
        upstream_keepalive_pool_size: args.tuning.pool_size,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(
        &server.configuration,
        MinimalProxy {
            upstreams,
            idle_timeout: args.tuning.idle_timeout,
            compression_module: args.tuning.compression_module,
        },
    );
    service.add_tcp(&args.listen);
    server.add_service(service);
    eprintln!(
        "pingora-minimal on {} -> {:?} ({:?})",
        args.listen, args.upstreams, args.tuning
    );
    server.run_forever()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Args> {
        parse_args(line.split_whitespace().map(String::from).collect())
    }

    #[test]
    fn profile_sets_the_baseline_and_flags_override_it_in_any_order() {
        let stock = Tuning::stock();
        for line in [
            "--listen a:1 --upstream b:2 --profile stock --pool-size 7",
            "--pool-size 7 --listen a:1 --upstream b:2 --profile stock",
        ] {
            let args = parse(line).unwrap();
            assert_eq!(args.tuning.pool_size, 7);
            assert_eq!(args.tuning.idle_timeout, stock.idle_timeout);
            assert_eq!(args.tuning.compression_module, stock.compression_module);
        }
        let tuned = parse("--listen a:1 --upstream b:2").unwrap().tuning;
        assert_eq!(tuned.pool_size, Tuning::tuned().pool_size);
        let none = parse("--listen a:1 --upstream b:2 --idle-timeout-ms 0").unwrap();
        assert_eq!(none.tuning.idle_timeout, None);
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        assert!(parse("--upstream b:2").is_err());
        assert!(parse("--listen a:1").is_err());
        assert!(parse("--listen a:1 --upstream b:2 --profile fast").is_err());
        assert!(parse("--listen a:1 --upstream b:2 --threads 0").is_err());
        assert!(parse("--listen a:1 --upstream b:2 --bogus 1").is_err());
    }
}
