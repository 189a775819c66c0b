//! The pre-flight check of `tensor-wasm upgrade` (`docs/UPGRADE.md`,
//! "Pre-flight"): what the new binaries are, whether every executor's
//! tenants can move onto them and back again, and what is in flight. Every
//! upgrade runs it first; `--check` runs it alone. It changes nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tensor_wasm_shared::build::{
    BuildReport, SnapshotFormats, abi_text, formats_text, upgrade_blockers,
};

use super::Admin;

/// How long a new binary may take to say what it is: 10 s.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The recording rule of the availability SLO's unspent error budget
/// (`deploy/prometheus/tensor-wasm-rules.yml`).
pub const BUDGET_RULE: &str = "tensor_wasm:availability:error_budget_remaining30d";

/// How long Prometheus may take to answer the budget query: 10 s.
const PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Below this share of its error budget left, the fleet does not upgrade
/// without `--force`: 30 %.
pub const MIN_ERROR_BUDGET: f64 = 0.3;

/// What the check found.
#[derive(Debug)]
pub struct Preflight {
    /// Each new binary, with what it says it is.
    pub binaries: Vec<(&'static str, PathBuf, BuildReport)>,
    /// The running executors, as the proxy lists them.
    pub executors: Vec<Running>,
    /// Why the upgrade must not start; empty when it may.
    pub blockers: Vec<String>,
    /// The share of the error budget left, when Prometheus was asked.
    pub error_budget: Option<f64>,
    /// Checks that refuse the upgrade unless `--force` overrides them: the
    /// check's name (as `POST /admin/upgrade/overrides/{check}` takes it)
    /// and why.
    pub overridable: Vec<(&'static str, String)>,
}

/// One running executor.
#[derive(Debug)]
pub struct Running {
    pub id: String,
    pub version: String,
    pub healthy: bool,
    pub formats: SnapshotFormats,
    pub guest_abi: Vec<u32>,
    /// Whether it reported its formats (release 0.1 did not).
    pub reported: bool,
    pub tenants: usize,
    pub jobs_in_flight: u64,
    /// Its tenants frozen now (none reported by earlier releases).
    pub frozen: Vec<String>,
    /// Device bytes each tenant holds (none reported by earlier releases).
    pub tenant_device_bytes: Vec<(String, u64)>,
    /// Device memory free on its device, when the device reports a total.
    pub device_free: Option<u64>,
}

/// Why tenants could not move off `executors`: a frozen tenant (an export
/// or a move of it under way) cannot be moved until that ends; and with
/// `beside` (an executor upgrade, whose replacement starts on the same
/// device while the old one still holds its tenants), a tenant holding
/// more device memory than its device has free does not fit beside it.
pub fn unmovable(executors: &[Running], beside: bool) -> Vec<String> {
    let mut out = Vec::new();
    for e in executors {
        if !e.frozen.is_empty() {
            out.push(format!(
                "executor {}: tenants {} are frozen (an export or a move of them is under way) and cannot move until it ends",
                e.id,
                e.frozen.join(", ")
            ));
        }
        let Some(free) = e.device_free.filter(|_| beside) else {
            continue;
        };
        let too_big: Vec<String> = e
            .tenant_device_bytes
            .iter()
            .filter(|(_, b)| *b > free)
            .map(|(t, b)| format!("{t} ({b} bytes)"))
            .collect();
        if !too_big.is_empty() {
            out.push(format!(
                "executor {}: tenants {} hold more device memory than the {free} bytes free on its device, where the replacement must take them beside it",
                e.id,
                too_big.join(", ")
            ));
        }
    }
    out
}

impl Preflight {
    /// Whether the upgrade must not start: a blocker, or an overridable
    /// check not overridden.
    pub fn refused(&self, force: bool) -> bool {
        !self.blockers.is_empty() || (!force && !self.overridable.is_empty())
    }

    /// The release the executors run, or `mixed`.
    pub fn fleet_version(&self) -> String {
        let mut versions: Vec<&str> = self
            .executors
            .iter()
            .map(|e| e.version.as_str())
            .filter(|v| !v.is_empty())
            .collect();
        versions.sort_unstable();
        versions.dedup();
        match versions.as_slice() {
            [one] => (*one).to_string(),
            [] => "unknown".into(),
            _ => "mixed".into(),
        }
    }

    /// Jobs running or queued across the fleet.
    pub fn jobs_in_flight(&self) -> u64 {
        self.executors.iter().map(|e| e.jobs_in_flight).sum()
    }

    /// The check, as lines for a terminal.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec!["pre-flight:".to_string()];
        for (role, path, r) in &self.binaries {
            out.push(format!(
                "  new {role} binary {}: {} (git {}), snapshot formats: reads {}, writes {}; guest ABI {}",
                path.display(),
                r.version,
                r.git_sha,
                formats_text(&r.snapshot_formats.reads),
                formats_text(&r.snapshot_formats.writes),
                abi_text(&r.guest_abi),
            ));
        }
        for e in &self.executors {
            out.push(format!(
                "  executor {}: {}{}, {} tenants, {} jobs in flight; snapshot formats: reads {}, writes {}{}",
                e.id,
                if e.version.is_empty() {
                    "version unknown"
                } else {
                    &e.version
                },
                if e.healthy { "" } else { " (not answering)" },
                e.tenants,
                e.jobs_in_flight,
                formats_text(&e.formats.reads),
                formats_text(&e.formats.writes),
                if e.reported {
                    ""
                } else {
                    " (release 0.1: not reported)"
                },
            ));
        }
        out.push(format!(
            "  jobs in flight: {} (they move with their tenants)",
            self.jobs_in_flight()
        ));
        if let Some(b) = self.error_budget {
            out.push(format!(
                "  error budget: {:.1} % left over 30 days (the upgrade needs {:.0} %)",
                b * 100.0,
                MIN_ERROR_BUDGET * 100.0
            ));
        }
        if self.blockers.is_empty() {
            out.push("  ok: every tenant can move onto the new binary and back".into());
        }
        for b in &self.blockers {
            out.push(format!("  refused: {b}"));
        }
        for (check, why) in &self.overridable {
            out.push(format!("  refused ({check}; --force overrides): {why}"));
        }
        out
    }
}

/// Runs the check for the new `executor` and `proxy` binaries.
pub fn check(
    admin: &Admin,
    executor: Option<&Path>,
    proxy: Option<&Path>,
    prometheus: Option<&str>,
) -> anyhow::Result<Preflight> {
    let mut blockers = Vec::new();
    let mut binaries = Vec::new();
    for (role, path) in [("executor", executor), ("proxy", proxy)] {
        let Some(path) = path else { continue };
        match describe(path) {
            Ok(r) => binaries.push((role, path.to_path_buf(), r)),
            Err(e) => blockers.push(format!(
                "cannot tell what the new {role} binary {} is: {e}",
                path.display()
            )),
        }
    }
    let executors = running(admin)?;
    if let Some((_, _, new)) = binaries.iter().find(|(role, _, _)| *role == "executor") {
        // One line per reason, naming every executor it holds for.
        let mut why: Vec<(String, Vec<&str>)> = Vec::new();
        for e in &executors {
            let found = upgrade_blockers(
                &e.formats,
                &e.guest_abi,
                &new.snapshot_formats,
                &new.guest_abi,
            );
            for w in found {
                match why.iter_mut().find(|(text, _)| *text == w) {
                    Some((_, ids)) => ids.push(&e.id),
                    None => why.push((w, vec![&e.id])),
                }
            }
        }
        blockers.extend(
            why.into_iter()
                .map(|(w, ids)| format!("executors {}: {w}", ids.join(", "))),
        );
    }
    blockers.extend(unmovable(
        &executors,
        binaries.iter().any(|(role, _, _)| *role == "executor"),
    ));
    for e in executors.iter().filter(|e| !e.healthy) {
        blockers.push(format!(
            "executor {} does not answer: its {} tenants could not move",
            e.id, e.tenants
        ));
    }
    let mut overridable = Vec::new();
    let mut error_budget = None;
    if let Some(url) = prometheus {
        match budget(&admin.agent, url) {
            Ok(b) => {
                error_budget = Some(b);
                if b < MIN_ERROR_BUDGET {
                    overridable.push((
                        "error-budget",
                        format!(
                            "{:.1} % of the 30-day error budget is left, under {:.0} %",
                            b * 100.0,
                            MIN_ERROR_BUDGET * 100.0
                        ),
                    ));
                }
            }
            Err(e) => overridable.push(("error-budget", format!("{e:#}"))),
        }
    }
    Ok(Preflight {
        binaries,
        executors,
        blockers,
        error_budget,
        overridable,
    })
}

/// The share of the error budget left, from Prometheus at `url`.
fn budget(agent: &ureq::Agent, url: &str) -> anyhow::Result<f64> {
    use anyhow::Context;
    let query = format!("{}/api/v1/query", url.trim_end_matches('/'));
    let mut resp = agent
        .get(&query)
        .query("query", BUDGET_RULE)
        .config()
        .timeout_global(Some(PROMETHEUS_TIMEOUT))
        .build()
        .call()
        .with_context(|| format!("cannot ask Prometheus at {url} for the error budget"))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    if status != 200 {
        anyhow::bail!("Prometheus at {url} answered {status} for {BUDGET_RULE}: {text}");
    }
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("Prometheus at {url} answered no JSON"))?;
    let value = v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse::<f64>().ok());
    value.with_context(|| {
        format!(
            "Prometheus at {url} has no sample of {BUDGET_RULE} (are the rules of deploy/prometheus/tensor-wasm-rules.yml loaded, and the proxy scraped?)"
        )
    })
}

/// The executors as the proxy lists them, each with what it reported.
fn running(admin: &Admin) -> anyhow::Result<Vec<Running>> {
    let list = admin.call("GET", "/admin/executors", None)?;
    let entries = list["executors"].as_array().cloned().unwrap_or_default();
    Ok(entries
        .iter()
        .map(|e| {
            let formats: Option<SnapshotFormats> =
                serde_json::from_value(e["snapshot_formats"].clone()).ok();
            // What a rollback must keep: the versions its functions use,
            // where it says (else every version it runs).
            let guest_abi: Option<Vec<u32>> = serde_json::from_value(e["guest_abi_used"].clone())
                .ok()
                .or_else(|| serde_json::from_value(e["guest_abi"].clone()).ok());
            Running {
                id: e["id"].as_str().unwrap_or_default().to_string(),
                version: e["version"].as_str().unwrap_or_default().to_string(),
                healthy: e["healthy"].as_bool().unwrap_or(false),
                reported: formats.is_some(),
                formats: formats.unwrap_or_else(SnapshotFormats::release_0_1),
                guest_abi: guest_abi.unwrap_or_else(|| vec![1]),
                tenants: e["tenants"].as_array().map_or(0, Vec::len),
                jobs_in_flight: e["stats"]["jobs_in_flight"].as_u64().unwrap_or(0),
                frozen: serde_json::from_value(e["frozen"].clone()).unwrap_or_default(),
                tenant_device_bytes: e["tenant_device_bytes"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(t, b)| (t.clone(), b.as_u64().unwrap_or(0)))
                            .collect()
                    })
                    .unwrap_or_default(),
                device_free: match (
                    e["device"]["memory_total"].as_u64(),
                    e["device"]["memory_used"].as_u64(),
                ) {
                    (Some(total), Some(used)) if total > 0 => Some(total.saturating_sub(used)),
                    _ => None,
                },
            }
        })
        .collect())
}

/// What the binary at `path` says it is (`--version --json`). A binary of
/// release 0.1, which has no `--json`, is known by its plain `--version`.
pub fn describe(path: &Path) -> Result<BuildReport, String> {
    let (ok, stdout) = run(path, &["--version", "--json"])?;
    if ok {
        return serde_json::from_slice(&stdout)
            .map_err(|e| format!("its `--version --json` is not a build report: {e}"));
    }
    let (ok, stdout) = run(path, &["--version"])?;
    let text = String::from_utf8_lossy(&stdout);
    let version = text
        .strip_prefix("tensor-wasm 0.1.")
        .and_then(|rest| rest.split_whitespace().next())
        .filter(|_| ok);
    match version {
        Some(patch) => Ok(BuildReport {
            version: format!("0.1.{patch}"),
            git_sha: "unknown".into(),
            rustc: String::new(),
            profile: String::new(),
            target: String::new(),
            features: Vec::new(),
            snapshot_formats: SnapshotFormats::release_0_1(),
            guest_abi: vec![1],
        }),
        None => Err(format!(
            "it does not answer `--version --json` (it said {:?})",
            text.trim()
        )),
    }
}

/// Runs `path args…` to its end within [`DESCRIBE_TIMEOUT`]: whether it
/// succeeded, and its stdout.
fn run(path: &Path, args: &[&str]) -> Result<(bool, Vec<u8>), String> {
    let mut child = Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < DESCRIBE_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "it did not answer `{}` within {DESCRIBE_TIMEOUT:?}",
                    args.join(" ")
                ));
            }
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot read its answer: {e}"))?;
    Ok((out.status.success(), out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executor(id: &str, frozen: &[&str], bytes: &[(&str, u64)], free: Option<u64>) -> Running {
        Running {
            id: id.into(),
            version: "0.2.0".into(),
            healthy: true,
            formats: SnapshotFormats::this_build(),
            guest_abi: vec![1],
            reported: true,
            tenants: bytes.len(),
            jobs_in_flight: 0,
            frozen: frozen.iter().map(|t| t.to_string()).collect(),
            tenant_device_bytes: bytes.iter().map(|(t, b)| (t.to_string(), *b)).collect(),
            device_free: free,
        }
    }

    #[test]
    fn frozen_tenants_and_tenants_that_do_not_fit_beside_are_named() {
        let fleet = [
            executor("gpu0", &["a"], &[("a", 10), ("b", 100)], Some(50)),
            executor("gpu1", &[], &[("c", 40)], Some(50)),
            // A device that reports no total is not judged by size.
            executor("cpu0", &[], &[("d", 1 << 40)], None),
        ];
        let found = unmovable(&fleet, true);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("gpu0: tenants a are frozen"), "{found:?}");
        assert!(
            found[1].contains(
                "gpu0: tenants b (100 bytes) hold more device memory than the 50 bytes free"
            ),
            "{found:?}"
        );
        // A proxy-only upgrade moves no tenant beside another.
        assert_eq!(unmovable(&fleet, false).len(), 1);
        assert!(unmovable(&fleet[1..], true).is_empty());
    }
}
