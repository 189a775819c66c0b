//! `tensor-wasm upgrade`: roll a running fleet to new binaries without
//! failing a request (`docs/UPGRADE.md`).
//!
//! Executors (`--executor-binary`), one at a time, for each executor E of
//! the `up` supervisor not yet on the new binary:
//!
//! 1. Start the new binary on E's device as executor E′ (`cpu0` → `cpu0.1`)
//!    through the supervisor's control socket, and register it with the
//!    proxy.
//! 2. Cordon E: the proxy places no new tenant there.
//! 3. Migrate E's tenants to E′ one by one (live migration: each tenant
//!    pauses for its own move only). A tenant whose import fails stays on E
//!    — the proxy thaws it there — and the upgrade stops with E still
//!    running, so nothing is lost.
//! 4. Forget E at the proxy and stop it through the supervisor.
//!
//! Device memory peaks at E's state plus one tenant's, never twice the
//! fleet. Progress is recorded in `<state>/upgrade.json` after every step:
//! stopping the command (Ctrl-C) at any point leaves every tenant placed on
//! a running executor, and running it again resumes where it stopped;
//! `--abort` instead un-cordons the executors not yet replaced and forgets
//! the record.
//!
//! Before any of it, the pre-flight check ([`preflight`]; alone with
//! `--check`) refuses an upgrade whose new binary could not read what the
//! fleet writes, or whose writes the fleet could not read back on a
//! rollback, one with an executor that does not answer, and (with
//! `--prometheus`, unless `--force`) one with less than 30 % of the error
//! budget left; `--backup` then saves every tenant ([`backup`]). The
//! binaries about to be replaced are kept under `<state>/binaries/` and
//! named in `<state>/previous.json`; `--rollback` upgrades back onto them,
//! the proxy first.
//!
//! The first executor that holds a tenant is a canary ([`canary`]), and is
//! replaced first: before it is replaced the
//! requests the proxy routes to it are watched for `--canary-window` (the
//! baseline), then the same window on its replacement; past the
//! thresholds its tenants move back onto it, its replacement is stopped,
//! and the upgrade stops there. At the end the fleet is verified
//! ([`verify`], [`audit`]): every executor answers on the new build, every
//! tenant is placed, the proxy's `build_info`, each moved tenant answered
//! after its move, the counters of the executors serving them advance, and
//! the audit log holds every request id the proxy answered meanwhile.
//!
//! The proxy (`--proxy-binary`): the supervisor starts the new binary with
//! `-u`, which waits for the listening sockets; it then sends the old proxy
//! SIGQUIT, which hands them over, answers `Connection: close` while it
//! drains, and stops recording placements; the new one reads the placement
//! table once it holds the sockets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::unix::fs::PermissionsExt;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::client::observe::{PromSample, parse_prometheus};
use crate::up::control::{self, ChildStatus, Role, StartExecutor};
use tensor_wasm_shared::names::env;

/// With `--json` the report is standard output's only content, and the
/// progress lines go to standard error.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A progress line: on standard output, or standard error under `--json`.
macro_rules! say {
    ($($arg:tt)*) => {{
        #[allow(clippy::print_stdout, clippy::print_stderr)]
        if JSON.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!($($arg)*);
        } else {
            println!($($arg)*);
        }
    }};
}

mod audit;
mod backup;
mod canary;
mod preflight;
mod verify;

/// Flags of `tensor-wasm upgrade`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// New executor binary to roll every executor to.
    #[arg(long)]
    executor_binary: Option<PathBuf>,
    /// New proxy binary to hand the listening sockets to.
    #[arg(long)]
    proxy_binary: Option<PathBuf>,
    /// The fleet's state directory (where `tensor-wasm up` runs).
    #[arg(
        long,
        env = env::STATE_DIR,
        default_value = "./tensor-wasm-state"
    )]
    state_dir: PathBuf,
    /// The proxy's admin API.
    #[arg(
        long,
        env = env::ADMIN_URL,
        default_value = "http://127.0.0.1:9090"
    )]
    admin_url: String,
    /// Admin token; read from `<state>/admin-token` when unset.
    #[arg(long, env = env::ADMIN_TOKEN, hide_env_values = true)]
    admin_token: Option<String>,
    /// Undo a stopped executor upgrade's cordons and forget its record.
    #[arg(long)]
    abort: bool,
    /// Before anything changes, save a snapshot of every tenant (signed
    /// when the executors have a snapshot key) and a copy of the audit
    /// log's current segment under DIR/<version>-<unix time>/, with a
    /// `backup.json` listing them. Also with `--check`.
    #[arg(long, value_name = "DIR")]
    backup: Option<PathBuf>,
    /// The fleet's audit log, copied by `--backup`; default
    /// `<state>/logs/audit.log` (where `tensor-wasm up` keeps it).
    #[arg(long, value_name = "PATH")]
    audit_log: Option<PathBuf>,
    /// Move the fleet back onto the binaries the last upgrade replaced
    /// (kept under `<state>/binaries/`, named in `<state>/previous.json`):
    /// the proxy first, then every executor, by the same live migration.
    /// A stopped upgrade is aborted first.
    #[arg(long, conflicts_with_all = ["abort", "executor_binary", "proxy_binary"])]
    rollback: bool,
    /// Write the upgrade's report as JSON to FILE: the binaries, the
    /// pre-flight, the backup, every move (pause, bytes, protocol), the
    /// pause distribution, what was verified and what was not.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Prometheus that scrapes the fleet with the rules of
    /// `deploy/prometheus/tensor-wasm-rules.yml`: the upgrade is refused
    /// with less than 30 % of the availability SLO's 30-day error budget
    /// left (or none readable).
    #[arg(long, value_name = "URL")]
    prometheus: Option<String>,
    /// Go ahead although the error budget check refuses; recorded in the
    /// proxy's audit log (`admin.upgrade.override`). Never overrides a
    /// snapshot format or guest ABI mismatch.
    #[arg(long)]
    force: bool,
    /// Only the pre-flight check, which every upgrade runs first: what the
    /// new binaries are, whether every tenant can move onto them and back
    /// (snapshot formats, guest ABI), jobs in flight. Changes nothing;
    /// exits non-zero when the upgrade would be refused.
    #[arg(long, conflicts_with = "abort")]
    check: bool,
    /// Print progress as lines instead of a progress bar.
    #[arg(long)]
    no_progress: bool,
    /// When the verification at the end fails, stop there instead of
    /// rolling back by itself (`--rollback` does it later).
    #[arg(long)]
    no_auto_rollback: bool,
    /// Print the report (as `--report` writes it) on standard output at
    /// the end, whether the upgrade passed or not; progress lines go to
    /// standard error.
    #[arg(long)]
    json: bool,
    /// How long the canary is watched: the requests of the first executor
    /// holding a tenant are counted this long before it is replaced (the
    /// baseline), then as long on its replacement. `0s` upgrades without a
    /// canary; a rollback has none.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    canary_window: Duration,
    /// The share of its requests answered 5xx that the canary may add to
    /// the baseline's before it fails.
    #[arg(long, value_name = "RATE", default_value_t = 0.01)]
    canary_max_error_rate: f64,
    /// The factor by which the canary's p99 latency may exceed the
    /// baseline's before it fails (a p99 of 25 ms or less never fails).
    #[arg(long, value_name = "FACTOR", default_value_t = 2.0)]
    canary_max_latency_ratio: f64,
    /// Requests the canary must see in its window to be judged; with fewer
    /// the upgrade goes on and the report says it was not judged.
    #[arg(long, value_name = "N", default_value_t = 20)]
    canary_min_requests: u64,
}

impl Args {
    /// The canary's thresholds, when there is one.
    fn canary(&self) -> anyhow::Result<Option<canary::Thresholds>> {
        if self.rollback || self.canary_window.is_zero() {
            return Ok(None);
        }
        if !(0.0..=1.0).contains(&self.canary_max_error_rate) {
            bail!("--canary-max-error-rate is a share of requests, between 0 and 1");
        }
        if self.canary_max_latency_ratio.is_nan() || self.canary_max_latency_ratio < 1.0 {
            bail!("--canary-max-latency-ratio is a factor of at least 1");
        }
        Ok(Some(canary::Thresholds {
            window: self.canary_window,
            max_error_rate: self.canary_max_error_rate,
            max_latency_ratio: self.canary_max_latency_ratio,
            min_requests: self.canary_min_requests,
        }))
    }
}

/// What the upgrade did, for the verification and the report.
#[derive(Debug, Default)]
struct Progress {
    /// Each move, as the admin API answered it, with `finished_unix`.
    moves: Vec<serde_json::Value>,
    /// The canary's baseline, window and verdict.
    canary: Option<serde_json::Value>,
}

/// The moves' bytes and pauses (ms).
struct MoveStats {
    bytes: u64,
    p50: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
}

impl Progress {
    fn stats(&self) -> MoveStats {
        let mut pauses: Vec<f64> = self
            .moves
            .iter()
            .filter_map(|m| m["pause_ms"].as_f64())
            .collect();
        pauses.sort_by(f64::total_cmp);
        let at = |q: f64| -> Option<f64> {
            let i = ((pauses.len() as f64 * q).ceil() as usize).max(1) - 1;
            pauses.get(i.min(pauses.len().saturating_sub(1))).copied()
        };
        MoveStats {
            bytes: self.moves.iter().filter_map(|m| m["bytes"].as_u64()).sum(),
            p50: at(0.5),
            p99: at(0.99),
            max: pauses.last().copied(),
        }
    }
}

/// `upgrade.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    binary: PathBuf,
    /// Old executor id → its replacement and whether it is done.
    steps: BTreeMap<String, Step>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Step {
    new_id: String,
    done: bool,
}

/// The admin API, as this command uses it.
struct Admin {
    url: String,
    token: String,
    agent: ureq::Agent,
    /// Every proxy's admin API, whose metrics count together; the one at
    /// `url` alone when empty.
    proxies: Vec<String>,
}

impl Admin {
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let auth = format!("Bearer {}", self.token);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("authorization", &auth).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("authorization", &auth)
                .call(),
            (_, Some(b)) => self
                .agent
                .post(&url)
                .header("authorization", &auth)
                .send_json(b),
            (_, None) => self
                .agent
                .post(&url)
                .header("authorization", &auth)
                .send_empty(),
        };
        let mut resp = self.answered(method, path, result)?;
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }

    /// The proxies' metrics (`GET /metrics` on each admin listener),
    /// together: the requests of every proxy count.
    fn metrics(&self) -> anyhow::Result<Vec<PromSample>> {
        if self.proxies.is_empty() {
            return self.metrics_at(&self.url);
        }
        let mut all = Vec::new();
        for url in &self.proxies {
            all.extend(self.metrics_at(url)?);
        }
        Ok(all)
    }

    /// The metrics of the proxy whose admin API is at `base`.
    fn metrics_at(&self, base: &str) -> anyhow::Result<Vec<PromSample>> {
        let url = format!("{}/metrics", base.trim_end_matches('/'));
        let resp = self.answered("GET", "/metrics", self.agent.get(&url).call())?;
        let text = resp.into_body().read_to_string()?;
        Ok(parse_prometheus(&text))
    }

    /// `POST path` with no body, its answer streamed into `sink`; the
    /// bytes written.
    fn download(&self, path: &str, sink: &mut dyn std::io::Write) -> anyhow::Result<u64> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let result = self
            .agent
            .post(&url)
            .header("authorization", &format!("Bearer {}", self.token))
            .send_empty();
        let resp = self.answered("POST", path, result)?;
        let mut body = resp.into_body().into_with_config().limit(u64::MAX).reader();
        Ok(std::io::copy(&mut body, sink)?)
    }

    /// A 2xx answer, else the API's error (its code and message).
    fn answered(
        &self,
        method: &str,
        path: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let mut resp = result.with_context(|| format!("admin API at {} unreachable", self.url))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            let value: serde_json::Value =
                serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
            let code = value["error"]["code"].as_str().unwrap_or("").to_string();
            let message = value["error"]["message"].as_str().unwrap_or(&text);
            return Err(AdminRefused {
                what: format!("{method} {path}: {status} {code}: {message}"),
                code,
            }
            .into());
        }
        Ok(resp)
    }
}

/// The admin API answered an error.
#[derive(Debug)]
struct AdminRefused {
    /// The request and the answer, for people.
    what: String,
    /// Its stable `code`.
    code: String,
}

impl std::fmt::Display for AdminRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for AdminRefused {}

/// Whether a refused move may go through when tried again: its requests
/// in flight did not end within the hold deadline (`deadline_exceeded`),
/// or an executor was briefly unreachable or full.
fn worth_retrying(e: &anyhow::Error) -> bool {
    e.downcast_ref::<AdminRefused>().is_some_and(|r| {
        matches!(
            r.code.as_str(),
            "deadline_exceeded" | "executor_unavailable" | "capacity_exhausted"
        )
    })
}

/// How often one tenant's move is tried before the upgrade stops.
const MOVE_TRIES: u32 = 3;

/// `cpu0` → `cpu0.1`, `cpu0.1` → `cpu0.2`.
fn next_id(id: &str) -> String {
    match id.rsplit_once('.') {
        Some((base, n)) if n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty() => {
            let n: u64 = n.parse().unwrap_or(0);
            format!("{base}.{}", n + 1)
        }
        _ => format!("{id}.1"),
    }
}

fn save(path: &Path, record: &Record) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.executor_binary.is_none()
        && args.proxy_binary.is_none()
        && !args.abort
        && !args.rollback
    {
        bail!("nothing to upgrade: give --executor-binary and/or --proxy-binary, or --rollback");
    }
    let canary = args.canary()?;
    if args.json {
        JSON.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let state = args.state_dir.clone();
    let token = match &args.admin_token {
        Some(t) => t.clone(),
        None => std::fs::read_to_string(state.join("admin-token"))
            .map(|t| t.trim().to_string())
            .with_context(|| {
                format!(
                    "no admin token: set {}, or point --state-dir at the fleet `tensor-wasm up` runs ({} has none)",
                    env::ADMIN_TOKEN,
                    state.display()
                )
            })?,
    };
    let audit_log = args
        .audit_log
        .clone()
        .unwrap_or_else(|| state.join("logs").join("audit.log"));
    // The fleet's proxies, read once: their admin ports and logs stay put
    // across a proxy's hand-off.
    let fleet_proxies = proxies(&state, &args, &audit_log);
    let admin = Admin {
        url: args.admin_url.clone(),
        token,
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into(),
        proxies: fleet_proxies.iter().map(|p| p.url.clone()).collect(),
    };
    let record_path = state.join("upgrade.json");

    if args.abort {
        return abort(&admin, &record_path);
    }
    let previous_path = state.join(PREVIOUS);
    let (executor_arg, proxy_arg) = if args.rollback {
        let previous: Previous = std::fs::read(&previous_path)
            .ok()
            .map(|b| serde_json::from_slice(&b))
            .transpose()
            .context("previous.json is corrupt")?
            .context("no upgrade to roll back: previous.json names no replaced binaries")?;
        (previous.executor, previous.proxy)
    } else {
        (args.executor_binary.clone(), args.proxy_binary.clone())
    };

    let found = |b: &Option<PathBuf>, role: &str| -> anyhow::Result<Option<PathBuf>> {
        b.as_ref()
            .map(|b| {
                b.canonicalize()
                    .with_context(|| format!("{role} binary {} not found", b.display()))
            })
            .transpose()
    };
    let executor_binary = found(&executor_arg, "executor")?;
    let proxy_binary = found(&proxy_arg, "proxy")?;
    let check = preflight::check(
        &admin,
        executor_binary.as_deref(),
        proxy_binary.as_deref(),
        args.prometheus.as_deref(),
    )?;
    for line in check.lines() {
        say!("{line}");
    }
    if check.refused(args.force) {
        let why: Vec<&str> = check
            .blockers
            .iter()
            .map(String::as_str)
            .chain(check.overridable.iter().map(|(_, w)| w.as_str()))
            .collect();
        let refused = format!("upgrade refused: {} (nothing was changed)", why.join("; "));
        Report::unchanged(&check, &args, &refused)?;
        bail!("{refused}");
    }
    for (name, why) in &check.overridable {
        // Forced: the proxy's audit log keeps that it was.
        admin.call(
            "POST",
            &format!("/admin/upgrade/overrides/{name}"),
            Some(serde_json::json!({})),
        )?;
        say!("forced past the {name} check: {why} (recorded in the audit log)");
    }
    if let Some(dir) = &args.backup {
        let others: Vec<PathBuf> = fleet_proxies
            .iter()
            .skip(1)
            .map(|p| p.audit_log.clone())
            .collect();
        let b = backup::write(&admin, dir, &check.fleet_version(), &audit_log, &others)?;
        let bytes: u64 = b.tenants.iter().map(|t| t.bytes).sum();
        say!(
            "backup: {} tenants ({bytes} bytes){} in {}",
            b.tenants.len(),
            b.audit
                .iter()
                .chain(&b.other_audits)
                .map(|a| a.records)
                .reduce(|a, b| a + b)
                .map(|records| format!(" and {records} audit records"))
                .unwrap_or_default(),
            b.dir.display()
        );
        let unsigned = b.tenants.iter().filter(|t| !t.signed).count();
        if unsigned > 0 {
            say!(
                "backup: {unsigned} snapshots are not signed: give every executor the same {}",
                env::SNAPSHOT_KEY
            );
        }
    }
    if args.check {
        return Report::unchanged(&check, &args, "--check: nothing was changed");
    }
    if args.rollback && record_path.exists() {
        say!("rollback: aborting the upgrade in progress first");
        abort(&admin, &record_path)?;
    }
    keep_previous(&state, executor_binary.as_deref(), proxy_binary.as_deref())?;
    let started = std::time::SystemTime::now();
    // Every proxy's audit log, where each begins for the upgrade.
    let audit_logs: Vec<(PathBuf, u64)> = fleet_proxies
        .iter()
        .filter_map(|p| Some((p.audit_log.clone(), audit::offset(&p.audit_log)?)))
        .collect();
    let mut progress = Progress::default();
    let new_build = |role: &str| {
        check
            .binaries
            .iter()
            .find(|(r, _, _)| *r == role)
            .map(|(_, _, report)| report)
    };
    let executors = |progress: &mut Progress| -> anyhow::Result<()> {
        match &executor_binary {
            Some(binary) => upgrade_executors(
                &state,
                &admin,
                binary,
                &record_path,
                args.no_progress,
                canary,
                progress,
            ),
            None => Ok(()),
        }
    };
    let proxy = || -> anyhow::Result<()> {
        if let Some(binary) = &proxy_binary {
            say!("proxy: handing the sockets to {}", binary.display());
            let r = control::upgrade_proxy(&state, binary.clone())?;
            match r.pids.as_slice() {
                [] | [_] => say!("proxy: now pid {}", r.pid),
                pids => say!("proxies: now pids {pids:?}"),
            }
        }
        Ok(())
    };
    let changed = if args.rollback {
        // Back out in the reverse order: an older proxy works in front of
        // newer executors, not always the other way round.
        proxy().and_then(|()| executors(&mut progress))
    } else {
        executors(&mut progress).and_then(|()| proxy())
    };
    let report = Report {
        check: &check,
        progress: &progress,
        started,
    };
    if let Err(e) = changed {
        report.emit(&args, None, Some(&format!("{e:#}")), None)?;
        return Err(e);
    }
    let expected = Expected {
        executor: executor_binary.as_ref().and_then(|_| new_build("executor")),
        proxy: proxy_binary.as_ref().and_then(|_| new_build("proxy")),
    };
    let verification = verify_fleet(&admin, &fleet_proxies, &expected, &progress, &audit_logs)?;
    if !progress.moves.is_empty() {
        let m = progress.stats();
        say!(
            "moved {} tenants ({} bytes) in {:.1} s; pause p50 {}, p99 {}, max {}",
            progress.moves.len(),
            m.bytes,
            started.elapsed().unwrap_or_default().as_secs_f64(),
            ms(m.p50.map(|p| p / 1e3)),
            ms(m.p99.map(|p| p / 1e3)),
            ms(m.max.map(|p| p / 1e3)),
        );
    }
    let problems = verification.problems.join("; ");
    // A failed verification: the new binaries are what failed, so the
    // fleet goes back onto the kept ones, by the same live migration,
    // verified in turn.
    let rolled_back =
        (!problems.is_empty() && !args.rollback && !args.no_auto_rollback).then(|| {
            say!("verification failed: {problems}; rolling back");
            run(Args {
                rollback: true,
                executor_binary: None,
                proxy_binary: None,
                backup: None,
                report: None,
                json: false,
                prometheus: None,
                force: false,
                ..args.clone()
            })
            .map_err(|e| format!("{e:#}"))
        });
    report.emit(&args, Some(&verification), None, rolled_back.as_ref())?;
    match rolled_back {
        _ if problems.is_empty() => {}
        None => bail!(
            "verification failed: {problems} (`tensor-wasm upgrade --rollback` moves the fleet back)"
        ),
        Some(Ok(())) => bail!(
            "verification failed: {problems}; the fleet was rolled back onto the binaries it ran before"
        ),
        Some(Err(e)) => {
            bail!("verification failed: {problems}; the rollback failed too: {e}")
        }
    }
    if args.rollback {
        say!("rolled back; `tensor-wasm upgrade --rollback` again goes forward");
    }
    Ok(())
}

/// What the new binaries said they are, for the verification.
struct Expected<'a> {
    executor: Option<&'a tensor_wasm_shared::build::BuildReport>,
    proxy: Option<&'a tensor_wasm_shared::build::BuildReport>,
}

/// The report `--report` writes.
struct Report<'a> {
    check: &'a preflight::Preflight,
    progress: &'a Progress,
    started: std::time::SystemTime,
}

impl Report<'_> {
    /// Writes the report of an upgrade that changed nothing (refused, or
    /// `--check`), `why` as what stopped it.
    fn unchanged(check: &preflight::Preflight, args: &Args, why: &str) -> anyhow::Result<()> {
        let report = Report {
            check,
            progress: &Progress::default(),
            started: std::time::SystemTime::now(),
        };
        report.emit(args, None, Some(why), None)
    }

    /// Writes the report to `--report` and, with `--json`, to standard
    /// output.
    fn emit(
        &self,
        args: &Args,
        verification: Option<&Verification>,
        stopped: Option<&str>,
        rolled_back: Option<&Result<(), String>>,
    ) -> anyhow::Result<()> {
        if args.report.is_none() && !args.json {
            return Ok(());
        }
        let mut report = self.json(verification, stopped);
        report["rolled_back"] = match rolled_back {
            None => serde_json::Value::Null,
            Some(Ok(())) => serde_json::json!({"ok": true}),
            Some(Err(e)) => serde_json::json!({"ok": false, "error": e}),
        };
        let json = serde_json::to_vec_pretty(&report)?;
        if let Some(path) = &args.report {
            std::fs::write(path, &json).with_context(|| format!("--report {}", path.display()))?;
        }
        if args.json {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(&json)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// The report: the binaries, the pre-flight, the canary, every move,
    /// the pauses, and the verification, or the error that stopped the
    /// upgrade before it.
    fn json(
        &self,
        verification: Option<&Verification>,
        stopped: Option<&str>,
    ) -> serde_json::Value {
        let unix = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let moves = &self.progress.moves;
        let m = self.progress.stats();
        let check = self.check;
        serde_json::json!({
            "started_unix": unix(self.started),
            "finished_unix": unix(std::time::SystemTime::now()),
            "binaries": check.binaries.iter().map(|(role, path, r)| serde_json::json!({
                "role": role, "path": path, "build": r,
            })).collect::<Vec<_>>(),
            "preflight": {
                "blockers": check.blockers,
                "overridden": check.overridable.iter().map(|(c, why)| serde_json::json!({"check": c, "why": why})).collect::<Vec<_>>(),
                "error_budget": check.error_budget,
                "jobs_in_flight": check.jobs_in_flight(),
            },
            "canary": self.progress.canary,
            "moves": moves,
            "bytes_moved": m.bytes,
            "pause_ms": {"p50": m.p50, "p99": m.p99, "max": m.max},
            "stopped": stopped,
            "verified": verification.map(|v| &v.passed),
            "problems": verification.map(|v| &v.problems),
            "not_checked": verification.map_or_else(
                || vec!["nothing: the upgrade stopped before its verification".to_string()],
                |v| v.not_checked.clone(),
            ),
        })
    }
}

/// What the verification found: each line printed and reported.
#[derive(Debug, Default)]
struct Verification {
    passed: Vec<String>,
    problems: Vec<String>,
    not_checked: Vec<String>,
}

/// How long the verification waits for the audit records of requests
/// still in flight before it calls a missing id lost.
const AUDIT_SETTLE: Duration = Duration::from_secs(10);

/// How long an executor may take to answer `/metrics`.
const EXECUTOR_METRICS_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the verification waits for another moved tenant to answer
/// before it calls the rest idle.
const IDLE_SETTLE: Duration = Duration::from_secs(1);

/// A proxy of the fleet, as the verification reads it.
struct ProxyView {
    name: String,
    /// Its admin API.
    url: String,
    audit_log: PathBuf,
}

/// The fleet's proxies: each that the `up` of `state` supervises, with its
/// own admin listener and audit log; else the one at `--admin-url`, with
/// `audit_log`.
fn proxies(state: &Path, args: &Args, audit_log: &Path) -> Vec<ProxyView> {
    let supervised: Vec<ProxyView> = control::ls(state)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.role == Role::Proxy)
        .filter_map(|c| {
            let k = crate::up::Proxies::index(&c.id)?;
            Some(ProxyView {
                url: format!("http://{}", c.addr),
                audit_log: match (k, &args.audit_log) {
                    (0, Some(given)) => given.clone(),
                    _ => crate::up::Proxies::audit_log(state, k),
                },
                name: c.id,
            })
        })
        .collect();
    // An `up` of an older release lists its one proxy with no address.
    if supervised.len() > 1 && supervised.iter().all(|p| p.url != "http://") {
        return supervised;
    }
    vec![ProxyView {
        name: "proxy".into(),
        url: args.admin_url.clone(),
        audit_log: audit_log.to_path_buf(),
    }]
}

/// The verification at the end (`docs/UPGRADE.md`, "Verification"): the
/// executors and placements ([`verify`]); every proxy's `build_info`; from
/// the proxies' audit logs (each path and its length when the upgrade
/// began), each moved tenant answered after its move and no request id is
/// missing ([`audit`]); the counters of the executors that served them
/// advanced. Prints what passed.
fn verify_fleet(
    admin: &Admin,
    proxies: &[ProxyView],
    expected: &Expected<'_>,
    progress: &Progress,
    audit_logs: &[(PathBuf, u64)],
) -> anyhow::Result<Verification> {
    let mut v = Verification::default();
    let executors = admin.call("GET", "/admin/executors", None)?;
    let placements = admin.call("GET", "/admin/placements", None)?;
    match verify::check(&executors, &placements, expected.executor) {
        Ok(fleet) => {
            let on = expected
                .executor
                .map(|r| format!(", all on {} (git {})", r.version, r.git_sha))
                .unwrap_or_default();
            v.passed.push(format!(
                "{} executors answer{on}; {} tenants placed, each on one of them",
                fleet.executors, fleet.tenants
            ));
        }
        Err(problems) => v.problems.extend(problems),
    }

    // Each proxy's metrics; its requests are counted with the others'.
    let mut samples = Vec::new();
    for p in proxies {
        let who = if proxies.len() == 1 {
            "the proxy's".to_string()
        } else {
            format!("{}'s", p.name)
        };
        let these = admin.metrics_at(&p.url)?;
        match (verify::proxy_build(&these), expected.proxy) {
            (None, _) => v.problems.push(format!("{who} metrics have no build_info")),
            (Some((version, git)), Some(want))
                if version != want.version || git != want.git_sha =>
            {
                v.problems.push(format!(
                    "{who} build_info names {version} (git {git}), not the new binary's {} (git {})",
                    want.version, want.git_sha
                ));
            }
            (Some((version, git)), want) => v.passed.push(format!(
                "{who} build_info names {version} (git {git}){}",
                if want.is_some() {
                    ""
                } else {
                    " (not upgraded)"
                }
            )),
        }
        samples.extend(these);
    }

    let moved: Vec<(String, std::time::SystemTime)> = progress
        .moves
        .iter()
        .filter_map(|m| {
            let at = std::time::UNIX_EPOCH
                + Duration::try_from_secs_f64(m["finished_unix"].as_f64()?).ok()?;
            Some((m["tenant"].as_str()?.to_string(), at))
        })
        .collect();
    if audit_logs.is_empty() {
        v.not_checked.push(
            "each moved tenant answered after its move, and audit continuity: no audit log (--audit-log)"
                .into(),
        );
        return Ok(print(v));
    }
    // Requests in flight now get their records when they finish: a
    // missing id is only lost once the wait is over. Tenants moved last
    // may not have been called yet: the wait goes on while more of them
    // answer, and ends a second after the last one did. Each proxy
    // numbers its own request ids, in its own log.
    let reading = |path: &Path| format!("reading the audit log {}", path.display());
    let mut tails = audit_logs
        .iter()
        .map(|(path, offset)| audit::Tail::open(path, *offset).with_context(|| reading(path)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let waited = std::time::Instant::now();
    let mut progressed = (waited, usize::MAX);
    let (gaps, answered, after) = loop {
        let mut gaps = Vec::new();
        for (tail, (path, _)) in tails.iter().zip(audit_logs) {
            let mut missing = audit::gaps(&tail.records, &[]);
            if !missing.is_empty() {
                // Ids answered 401 are in the log of unauthenticated requests.
                missing = audit::gaps(&tail.records, &audit::unauthenticated(path));
            }
            gaps.extend(missing);
        }
        let after: Vec<_> = tails
            .iter()
            .flat_map(|t| t.records.after.iter().cloned())
            .collect();
        let answered = audit::answered_after(&after, &moved);
        if answered.idle.len() != progressed.1 {
            progressed = (std::time::Instant::now(), answered.idle.len());
        }
        let settled = answered.idle.is_empty() || progressed.0.elapsed() > IDLE_SETTLE;
        if (gaps.is_empty() && settled) || waited.elapsed() > AUDIT_SETTLE {
            break (gaps, answered, after.len());
        }
        std::thread::sleep(Duration::from_millis(250));
        for (tail, (path, _)) in tails.iter_mut().zip(audit_logs) {
            tail.refresh().with_context(|| reading(path))?;
        }
    };
    if gaps.is_empty() {
        v.passed.push(if audit_logs.len() == 1 {
            format!(
                "the audit log holds a record for every request id the proxy answered since the upgrade began ({after} records)"
            )
        } else {
            format!(
                "the audit logs of the {} proxies hold a record for every request id each answered since the upgrade began ({after} records)",
                audit_logs.len()
            )
        });
    } else {
        v.problems.extend(gaps);
    }
    if !moved.is_empty() {
        v.passed.push(format!(
            "{} of {} moved tenants answered after their move",
            answered.answered.len(),
            moved.len()
        ));
    }
    for t in &answered.failing {
        v.problems
            .push(format!("tenant {t} answered only 5xx after its move"));
    }
    if !answered.idle.is_empty() {
        v.not_checked.push(format!(
            "{} moved tenants had no request after their move: {}",
            answered.idle.len(),
            answered.idle.join(", ")
        ));
    }

    // Counters advance: each executor that served a moved tenant since
    // counted it, at the proxy and in its own metrics.
    let placed = &placements["placements"];
    let serving: std::collections::BTreeSet<&str> = answered
        .answered
        .iter()
        .filter_map(|t| placed[t.as_str()].as_str())
        .collect();
    let the_proxies = if proxies.len() == 1 {
        "the proxy"
    } else {
        "the proxies"
    };
    for e in executors["executors"].as_array().into_iter().flatten() {
        let (Some(id), Some(addr)) = (e["id"].as_str(), e["addr"].as_str()) else {
            continue;
        };
        if !serving.contains(id) {
            continue;
        }
        let at_proxy = canary::Counts::of(&samples, id).requests;
        let own = admin
            .agent
            .get(&format!("http://{addr}/metrics"))
            .config()
            .timeout_global(Some(EXECUTOR_METRICS_TIMEOUT))
            .build()
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .map(|text| verify::invocations(&parse_prometheus(&text)));
        match own {
            Some(n) if n > 0 && at_proxy > 0 => v.passed.push(format!(
                "counters advance on {id}: {at_proxy} requests at {the_proxies}, {n} invocations in its own metrics"
            )),
            Some(n) => v.problems.push(format!(
                "{id} served moved tenants but counts {at_proxy} requests at {the_proxies} and {n} invocations itself"
            )),
            None => v
                .problems
                .push(format!("{id}'s metrics ({addr}/metrics) do not answer")),
        }
    }
    if serving.is_empty() {
        v.not_checked
            .push("counters advance: no moved tenant was called after its move".into());
    }
    Ok(print(v))
}

fn print(v: Verification) -> Verification {
    for line in &v.passed {
        say!("verified: {line}");
    }
    for line in &v.not_checked {
        say!("not checked: {line}");
    }
    v
}

/// Un-cordons the executors a stopped upgrade has not replaced, and
/// forgets its record.
fn abort(admin: &Admin, record_path: &Path) -> anyhow::Result<()> {
    let Ok(bytes) = std::fs::read(record_path) else {
        say!("no executor upgrade in progress");
        return Ok(());
    };
    let record: Record = serde_json::from_slice(&bytes).context("upgrade.json is corrupt")?;
    for (old, step) in &record.steps {
        if !step.done && !registered(admin, old)? {
            // Stopped within step 4: its tenants had all moved to the
            // replacement and the proxy forgot it; it is stopped, as that
            // step would have.
            if let Some(state) = record_path.parent()
                && control::ls(state)?.iter().any(|c| c.id == *old)
            {
                control::stop(state, old)?;
            }
            say!("{old}: replaced by {} already (stopped now)", step.new_id);
            continue;
        }
        if !step.done {
            admin.call("POST", &format!("/admin/executors/{old}/uncordon"), None)?;
            say!(
                "{old}: placing tenants again ({} keeps what it has)",
                step.new_id
            );
        }
    }
    std::fs::remove_file(record_path)?;
    Ok(())
}

/// `<state>/previous.json`: the binaries the last upgrade replaced, kept
/// under `<state>/binaries/` for `--rollback`.
const PREVIOUS: &str = "previous.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Previous {
    executor: Option<PathBuf>,
    proxy: Option<PathBuf>,
}

/// Before an upgrade changes anything: keeps a copy of each binary it is
/// about to replace under `<state>/binaries/` (named by its contents'
/// hash, so the file stays what it was even if the original path is
/// overwritten) and names them in `previous.json`. An upgrade resumed
/// after a stop keeps the record it made first.
fn keep_previous(
    state: &Path,
    executor: Option<&Path>,
    proxy: Option<&Path>,
) -> anyhow::Result<()> {
    let children = control::ls(state)?;
    let replaced = |role: Role, to: Option<&Path>| -> Option<PathBuf> {
        let to = to?;
        children
            .iter()
            .filter(|c| c.role == role)
            .map(|c| c.binary.clone())
            .find(|b| b != to)
    };
    let (executor, proxy) = (
        replaced(Role::Executor, executor),
        replaced(Role::Proxy, proxy),
    );
    if executor.is_none() && proxy.is_none() {
        return Ok(());
    }
    let path = state.join(PREVIOUS);
    if state.join("upgrade.json").exists() && path.exists() {
        return Ok(());
    }
    let dir = state.join("binaries");
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let keep = |b: Option<PathBuf>| -> anyhow::Result<Option<PathBuf>> {
        let Some(b) = b else { return Ok(None) };
        if b.starts_with(&dir) {
            return Ok(Some(b));
        }
        // Hashed as it is read: a binary is hundreds of MB.
        let mut hash = sha2::Sha256::new();
        std::fs::File::open(&b)
            .and_then(|mut f| std::io::copy(&mut f, &mut hash))
            .with_context(|| format!("keeping {}", b.display()))?;
        let name = format!("tensor-wasm-{}", &hex::encode(hash.finalize())[..16]);
        let kept = dir.join(name);
        if !kept.exists() {
            let part = kept.with_extension("part");
            std::fs::copy(&b, &part).with_context(|| format!("keeping {}", b.display()))?;
            std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))?;
            std::fs::File::open(&part)?.sync_all()?;
            std::fs::rename(&part, &kept)?;
        }
        Ok(Some(kept))
    };
    let previous = Previous {
        executor: keep(executor)?,
        proxy: keep(proxy)?,
    };
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&previous)?)?;
    std::fs::rename(&tmp, &path)?;
    for (role, b) in [("executor", &previous.executor), ("proxy", &previous.proxy)] {
        if let Some(b) = b {
            say!(
                "{role}: the replaced binary is kept as {} for --rollback",
                b.display()
            );
        }
    }
    Ok(())
}

fn upgrade_executors(
    state: &Path,
    admin: &Admin,
    binary: &Path,
    record_path: &Path,
    no_progress: bool,
    canary: Option<canary::Thresholds>,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let mut record: Record = match std::fs::read(record_path) {
        Ok(b) => serde_json::from_slice(&b).context("upgrade.json is corrupt")?,
        Err(_) => Record::default(),
    };
    if !record.steps.is_empty() && record.binary != binary {
        bail!(
            "an upgrade to {} is in progress: finish it (run it again) or `tensor-wasm upgrade --abort` first",
            record.binary.display()
        );
    }
    // A resumed upgrade that already replaced an executor passed its
    // canary then.
    let mut canary = canary.filter(|_| !record.steps.values().any(|s| s.done));
    record.binary = binary.to_path_buf();
    let children = control::ls(state)?;
    let replacements: Vec<&str> = record.steps.values().map(|s| s.new_id.as_str()).collect();
    let mut todo: Vec<ChildStatus> = children
        .iter()
        .filter(|c| c.role == Role::Executor)
        .filter(|c| !replacements.contains(&c.id.as_str()))
        .filter(|c| c.binary != binary || record.steps.contains_key(&c.id))
        .cloned()
        .collect();
    // The canary is the first executor that holds a tenant: one holding
    // none would be watched carrying no request, and judge nothing. A
    // resumed upgrade keeps its order.
    if canary.is_some() && record.steps.is_empty() {
        let placements = admin.call("GET", "/admin/placements", None)?;
        let holding: std::collections::HashSet<&str> = placements["placements"]
            .as_object()
            .map(|m| m.values().filter_map(|e| e.as_str()).collect())
            .unwrap_or_default();
        if let Some(i) = todo.iter().position(|c| holding.contains(c.id.as_str())) {
            let first = todo.remove(i);
            todo.insert(0, first);
        }
    }
    if todo.is_empty() {
        say!("every executor already runs {}", binary.display());
        let _ = std::fs::remove_file(record_path);
        return Ok(());
    }
    say!("upgrading {} executors to {}", todo.len(), binary.display());
    for old in todo {
        let resumed = record.steps.contains_key(&old.id);
        let new_id = record
            .steps
            .entry(old.id.clone())
            .or_insert_with(|| Step {
                new_id: next_id(&old.id),
                done: false,
            })
            .new_id
            .clone();
        save(record_path, &record)?;

        // Stopped within step 4, after the proxy forgot the old executor
        // (its tenants had all moved) and before it was stopped: finish
        // that step.
        if resumed && !registered(admin, &old.id)? {
            stop_replaced(state, &mut record, record_path, &old.id)?;
            say!(
                "{}: replaced by {} (its tenants had moved; stopped now)",
                old.id,
                new_id
            );
            continue;
        }

        // 0. The canary's baseline: the old executor, before anything
        //    changes.
        let baseline = match canary.take() {
            Some(t) => {
                say!(
                    "canary: {}, watched for {} before and after its upgrade",
                    old.id,
                    humantime::format_duration(t.window)
                );
                let first = canary::Counts::of(&admin.metrics()?, &old.id);
                std::thread::sleep(t.window);
                let baseline = canary::Counts::of(&admin.metrics()?, &old.id).since(&first);
                let b = baseline.summary();
                say!(
                    "canary: baseline on {}: {} requests, {} failed, p99 {}",
                    old.id,
                    b.requests,
                    b.errors,
                    ms(b.p99_s)
                );
                Some((t, baseline))
            }
            None => None,
        };

        // 1. Start and register the replacement.
        let running = children.iter().find(|c| c.id == new_id).cloned();
        let new = match running {
            Some(c) => c,
            None => control::start(
                state,
                StartExecutor {
                    id: new_id.clone(),
                    device: Some(old.device.clone()),
                    cuda_visible_devices: old.cuda_visible_devices.clone(),
                    binary: Some(binary.to_path_buf()),
                },
            )?,
        };
        admin.call(
            "POST",
            "/admin/executors",
            Some(serde_json::json!({"id": new.id, "addr": new.addr})),
        )?;
        // 2. Cordon the old one.
        admin.call("POST", &format!("/admin/executors/{}/cordon", old.id), None)?;
        // 3. Move its tenants.
        let tenants = placed_on(admin, &old.id)?;
        let failed = move_tenants(admin, &tenants, &old.id, &new.id, no_progress, progress);
        if !failed.is_empty() {
            bail!(
                "{} tenants could not move off {} (they run there still); fix the cause and run the upgrade again, or `tensor-wasm upgrade --abort`",
                failed.len(),
                old.id
            );
        }
        // The canary: the same window on the replacement.
        if let Some((t, baseline)) = baseline {
            let (verdict, window) = watch(admin, &new.id, &baseline, &t)?;
            let w = window.summary();
            let (result, why) = match &verdict {
                canary::Verdict::Pass => ("passed", None),
                canary::Verdict::Fail(why) => ("failed", Some(why.as_str())),
                canary::Verdict::Unjudged(why) => ("not judged", Some(why.as_str())),
            };
            say!(
                "canary: {} on {}: {} requests, {} failed, p99 {}{}",
                result,
                new.id,
                w.requests,
                w.errors,
                ms(w.p99_s),
                why.map(|w| format!(": {w}")).unwrap_or_default()
            );
            progress.canary = Some(serde_json::json!({
                "old": old.id,
                "new": new.id,
                "window_s": t.window.as_secs_f64(),
                "max_error_rate": t.max_error_rate,
                "max_latency_ratio": t.max_latency_ratio,
                "min_requests": t.min_requests,
                "baseline": baseline.summary(),
                "canary": w,
                "result": result,
                "why": why,
            }));
            if let canary::Verdict::Fail(why) = verdict {
                back_out(admin, state, &old.id, &new.id, no_progress, progress)?;
                std::fs::remove_file(record_path)?;
                bail!(
                    "canary failed: {} (running {}): {why}; its tenants are back on {} (the binary it ran before) and no other executor was touched",
                    new.id,
                    binary.display(),
                    old.id
                );
            }
        }
        // 4. Forget and stop the old one.
        admin.call("DELETE", &format!("/admin/executors/{}", old.id), None)?;
        stop_replaced(state, &mut record, record_path, &old.id)?;
        say!(
            "{}: replaced by {} ({} tenants moved)",
            old.id,
            new.id,
            tenants.len()
        );
    }
    std::fs::remove_file(record_path)?;
    Ok(())
}

/// The second half of step 4: stops `old`, which the proxy forgot, and
/// records its step done.
fn stop_replaced(
    state: &Path,
    record: &mut Record,
    record_path: &Path,
    old: &str,
) -> anyhow::Result<()> {
    control::stop(state, old)?;
    if let Some(step) = record.steps.get_mut(old) {
        step.done = true;
    }
    save(record_path, record)
}

/// Whether the proxy has `executor` in its executor set.
fn registered(admin: &Admin, executor: &str) -> anyhow::Result<bool> {
    let list = admin.call("GET", "/admin/executors", None)?;
    Ok(list["executors"]
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e["id"].as_str() == Some(executor))))
}

/// The tenants the proxy places on `executor`.
fn placed_on(admin: &Admin, executor: &str) -> anyhow::Result<Vec<String>> {
    let placements = admin.call("GET", "/admin/placements", None)?;
    Ok(placements["placements"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, e)| e.as_str() == Some(executor))
                .map(|(t, _)| t.clone())
                .collect()
        })
        .unwrap_or_default())
}

/// Moves each of `tenants` from `from` to `to` by live migration,
/// recording each move in `progress`; the tenants that could not move
/// (they stay on `from`).
fn move_tenants(
    admin: &Admin,
    tenants: &[String],
    from: &str,
    to: &str,
    no_progress: bool,
    progress: &mut Progress,
) -> Vec<String> {
    let bar = if no_progress {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(tenants.len() as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} tenants {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{from} → {to}"));
    let mut failed = Vec::new();
    for tenant in tenants {
        let mut tries = 1;
        let moved = loop {
            let r = admin.call(
                "POST",
                &format!("/admin/tenants/{tenant}/migrate"),
                Some(serde_json::json!({"to": to})),
            );
            match r {
                Err(e) if tries < MOVE_TRIES && worth_retrying(&e) => {
                    let line = format!("{tenant}: tried again: {e:#}");
                    if no_progress {
                        say!("{line}");
                    } else {
                        bar.println(line);
                    }
                    std::thread::sleep(Duration::from_secs(u64::from(tries)));
                    tries += 1;
                }
                r => break r,
            }
        };
        match moved {
            Ok(mut r) => {
                let pause = r["pause_ms"].as_f64().unwrap_or(0.0);
                bar.set_message(format!("{tenant} paused {pause:.1} ms"));
                if no_progress {
                    say!(
                        "{tenant}: {from} → {to} in {pause:.1} ms ({} bytes)",
                        r["bytes"]
                    );
                }
                r["finished_unix"] = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64())
                    .into();
                progress.moves.push(r);
            }
            Err(e) => {
                // A hidden bar prints nothing: the reason must still show.
                let line = format!("{tenant}: stays on {from}: {e:#}");
                if no_progress {
                    say!("{line}");
                } else {
                    bar.println(line);
                }
                failed.push(tenant.clone());
            }
        }
        bar.inc(1);
    }
    bar.finish();
    failed
}

/// How often the canary's window is read: a failing canary is stopped
/// as soon as its errors decide it.
const CANARY_POLL: Duration = Duration::from_millis(500);

/// Watches the requests the proxy routes to `executor` for the window
/// (stopping early once errors fail it): the verdict against `baseline`,
/// and the window's counts.
fn watch(
    admin: &Admin,
    executor: &str,
    baseline: &canary::Counts,
    t: &canary::Thresholds,
) -> anyhow::Result<(canary::Verdict, canary::Counts)> {
    let first = canary::Counts::of(&admin.metrics()?, executor);
    let until = std::time::Instant::now() + t.window;
    // Early, only errors may decide: latency is judged on the whole window.
    let errors_only = canary::Thresholds {
        max_latency_ratio: f64::INFINITY,
        ..*t
    };
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        std::thread::sleep(left.min(CANARY_POLL));
        let window = canary::Counts::of(&admin.metrics()?, executor).since(&first);
        if left <= CANARY_POLL {
            return Ok((canary::judge(baseline, &window, t), window));
        }
        if let v @ canary::Verdict::Fail(_) = canary::judge(baseline, &window, &errors_only) {
            return Ok((v, window));
        }
    }
}

/// A failed canary: its tenants go back from `new` onto `old` (which kept
/// running, cordoned) by live migration, and `new` is forgotten and
/// stopped.
fn back_out(
    admin: &Admin,
    state: &Path,
    old: &str,
    new: &str,
    no_progress: bool,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    admin.call("POST", &format!("/admin/executors/{old}/uncordon"), None)?;
    admin.call("POST", &format!("/admin/executors/{new}/cordon"), None)?;
    let tenants = placed_on(admin, new)?;
    let failed = move_tenants(admin, &tenants, new, old, no_progress, progress);
    if !failed.is_empty() {
        bail!(
            "the canary failed, and {} of its tenants could not move back to {old} (they run on {new} still): {}; `tensor-wasm upgrade --rollback` moves them",
            failed.len(),
            failed.join(", ")
        );
    }
    admin.call("DELETE", &format!("/admin/executors/{new}"), None)?;
    control::stop(state, new)?;
    say!(
        "canary: {} tenants moved back to {old}; {new} stopped",
        tenants.len()
    );
    Ok(())
}

fn ms(s: Option<f64>) -> String {
    s.map_or_else(|| "n/a".into(), |s| format!("{:.1} ms", s * 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacement_ids_count_generations() {
        assert_eq!(next_id("cpu0"), "cpu0.1");
        assert_eq!(next_id("cpu0.1"), "cpu0.2");
        assert_eq!(next_id("mig-1a2b3c4d"), "mig-1a2b3c4d.1");
        assert_eq!(next_id("pod.name"), "pod.name.1");
    }
}
