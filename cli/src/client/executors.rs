//! `tensor-wasm executors`: the proxy's executor set through the admin API
//! — list (`GET /admin/executors`), register (`POST /admin/executors`),
//! drain (`POST /admin/executors/{id}/drain`) and forget
//! (`DELETE /admin/executors/{id}`).

use anyhow::bail;
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tensor_wasm_shared::ApiError;
use tensor_wasm_shared::api::{DeviceDescription, ExecutorStats};

use super::http::{Body, encode};
use super::migrate::Move;
use super::{Conn, output};
use crate::up::control::{self, StartExecutor};

/// One executor as the admin API lists it. `device` and `stats` are
/// missing for an executor the proxy has never reached.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminExecutor {
    pub id: String,
    pub addr: String,
    #[serde(default)]
    pub version: String,
    pub healthy: bool,
    /// Drained: the proxy places no tenant there.
    #[serde(default)]
    pub draining: bool,
    pub device: Option<DeviceDescription>,
    #[serde(default)]
    pub tenants: Vec<String>,
    pub stats: Option<ExecutorStats>,
}

/// `GET /admin/executors`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminExecutors {
    pub executors: Vec<AdminExecutor>,
}

/// A tenant a drain could not move.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveFailure {
    pub tenant: String,
    pub error: ApiError,
}

/// What a drain did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrainReport {
    pub executor: String,
    pub moves: Vec<Move>,
    pub failed: Vec<MoveFailure>,
}

/// Flags of `tensor-wasm executors`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the executors, their devices, load and tenants.
    Ls {
        /// Print `{"executors": [...]}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Register an executor with the proxy; without --addr, first start one
    /// through the `tensor-wasm up` supervisor of --state-dir.
    Add {
        /// Its stable name (gpu0, mig-<uuid8>, cpu0, a pod name).
        #[arg(long)]
        id: String,
        /// Where the proxy reaches a running executor.
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
        /// For a started executor: `cpu` or `cuda`.
        #[arg(long, default_value = "cpu", conflicts_with = "addr")]
        device: String,
        /// For a started executor on a GPU: its `CUDA_VISIBLE_DEVICES` (a
        /// GPU or MIG UUID).
        #[arg(long, conflicts_with = "addr")]
        cuda_visible_devices: Option<String>,
        /// Print the registered entry as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move every tenant off an executor, then stop placing tenants there.
    Drain {
        id: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget an executor that holds no tenants (drain it first); one the
    /// `up` supervisor of --state-dir runs is stopped too.
    Rm { id: String },
}

/// `used / total` of a device's memory.
pub fn memory(d: &DeviceDescription) -> String {
    format!(
        "{} / {}",
        output::bytes(d.memory_used),
        output::bytes(d.memory_total)
    )
}

/// `yes`, `no`, with `(draining)` when drained.
pub fn health(e: &AdminExecutor) -> String {
    let h = if e.healthy { "yes" } else { "no" };
    if e.draining {
        format!("{h} (draining)")
    } else {
        h.to_string()
    }
}

/// The device in a few words: `cuda NVIDIA H100 (MIG 1g.10gb)`, `cpu (8
/// threads)`.
pub fn device(e: &AdminExecutor) -> String {
    match &e.device {
        Some(d) => {
            let mut s = if d.name.starts_with(&d.kind) {
                d.name.clone()
            } else {
                format!("{} {}", d.kind, d.name)
            };
            if let Some(p) = &d.mig_profile {
                s.push_str(&format!(" (MIG {p})"));
            }
            s
        }
        None => "-".into(),
    }
}

fn table(list: &AdminExecutors) -> String {
    let rows: Vec<Vec<String>> = list
        .executors
        .iter()
        .map(|e| {
            let stat = |f: fn(&ExecutorStats) -> u64| {
                e.stats
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |s| f(s).to_string())
            };
            vec![
                e.id.clone(),
                e.addr.clone(),
                health(e),
                device(e),
                e.device.as_ref().map_or_else(|| "-".into(), memory),
                stat(|s| s.active_instances),
                stat(|s| s.jobs_in_flight),
                e.tenants.len().to_string(),
                if e.version.is_empty() {
                    "-".into()
                } else {
                    e.version.clone()
                },
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "ADDR",
            "HEALTHY",
            "DEVICE",
            "MEMORY",
            "INSTANCES",
            "JOBS",
            "TENANTS",
            "VERSION",
        ],
        &rows,
    )
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ep = args.conn.admin()?;
    match args.command {
        Command::Ls { json } => {
            let list: AdminExecutors = ep.get_json("/admin/executors")?;
            if json {
                output::print_json(&list)?;
            } else {
                output::print(&table(&list))?;
            }
        }
        Command::Add {
            id,
            addr,
            device: kind,
            cuda_visible_devices,
            json,
        } => {
            let addr = match addr {
                Some(addr) => addr,
                None => {
                    control::start(
                        &args.conn.state_dir,
                        StartExecutor {
                            id: id.clone(),
                            device: Some(kind),
                            cuda_visible_devices,
                            binary: None,
                        },
                    )?
                    .addr
                }
            };
            let entry: AdminExecutor = ep.send_json(
                "POST",
                "/admin/executors",
                Body::json(&json!({ "id": id, "addr": addr })),
            )?;
            if json {
                output::print_json(&entry)?;
            } else {
                output::println(&format!(
                    "registered {} at {} (healthy: {}, device: {})",
                    entry.id,
                    entry.addr,
                    health(&entry),
                    device(&entry)
                ))?;
            }
        }
        Command::Drain { id, json } => {
            let reply = ep.call_allowing(
                "POST",
                &format!("/admin/executors/{}/drain", encode(&id)),
                Body::empty(),
                &[502],
            )?;
            let report: DrainReport = reply.json(&ep)?;
            if json {
                output::print_json(&report)?;
            } else {
                if report.moves.is_empty() && report.failed.is_empty() {
                    output::println(&format!("{id} held no tenants; nothing moved"))?;
                }
                for m in &report.moves {
                    output::println(&m.line())?;
                }
            }
            if !report.failed.is_empty() {
                let lines: Vec<String> = report
                    .failed
                    .iter()
                    .map(|f| format!("  {}: {}", f.tenant, f.error))
                    .collect();
                bail!(
                    "{} tenant(s) could not be moved off {id} and stay there:\n{}",
                    report.failed.len(),
                    lines.join("\n")
                );
            }
        }
        Command::Rm { id } => {
            ep.call(
                "DELETE",
                &format!("/admin/executors/{}", encode(&id)),
                &[],
                Body::None,
            )?;
            output::println(&format!("forgot {id}"))?;
            let supervised =
                control::ls(&args.conn.state_dir).is_ok_and(|ls| ls.iter().any(|c| c.id == id));
            if supervised {
                control::stop(&args.conn.state_dir, &id)?;
                output::println(&format!("stopped {id}"))?;
            }
        }
    }
    Ok(())
}
