//! `tensor-wasm snapshot`: tenant snapshots as files.
//!
//! `save` asks the admin API for a consistent snapshot of a tenant
//! (`POST /admin/tenants/{t}/snapshot`; the tenant keeps running) and
//! streams it to `DIR/<tenant>-<unix time>.twsnap`, through a `.part` file
//! renamed once complete, so a file with the final name is always whole.
//! `restore` posts a file back (`POST /admin/tenants/{t}/restore`), which
//! replaces the tenant's state. `ls` lists the files of a directory from
//! their names and headers; `inspect` decodes one with the reader of
//! `tensor_wasm_shared::snapshot`, which checks it in the order
//! `docs/SNAPSHOT-COMPATIBILITY.md` fixes (magic and version, length, BLAKE3
//! checksum, HMAC when a key is given, archive validation) before anything
//! is printed.

use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde::Serialize;
use tensor_wasm_shared::api::{FunctionInfo, JobInfo, JobStatus};
use tensor_wasm_shared::snapshot::{self, FLAG_KEYED, HEADER_LEN, MAGIC, TenantSnapshot};

use super::http::{Body, encode};
use super::migrate::tenant;
use super::{Conn, output};
use tensor_wasm_shared::names::env;

/// Extension of snapshot files.
const EXTENSION: &str = "twsnap";

/// Flags of `tensor-wasm snapshot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Save a consistent snapshot of a tenant to DIR/<tenant>-<unix
    /// time>.twsnap; the tenant keeps running.
    Save {
        tenant: String,
        /// Where to write the file.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Replace a tenant's state with a saved snapshot.
    Restore { tenant: String, file: PathBuf },
    /// List the snapshot files of a directory.
    Ls {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a snapshot file and describe what it holds.
    Inspect {
        file: PathBuf,
        /// Verify the HMAC signature with this key (as executors are given
        /// it); an unsigned snapshot is then refused.
        #[arg(long, env = env::SNAPSHOT_KEY, hide_env_values = true)]
        key: Option<String>,
        /// Print the description as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Save { tenant: t, dir } => save(&args.conn, &t, &dir),
        Command::Restore { tenant: t, file } => restore(&args.conn, &t, &file),
        Command::Ls { dir, json } => list(&dir, json),
        Command::Inspect { file, key, json } => inspect(&file, key.as_deref(), json),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `DIR/<tenant>-<unix time>.twsnap`, free; waits for the next second
/// rather than overwrite a snapshot taken in this one.
fn free_name(dir: &Path, tenant: &str) -> PathBuf {
    loop {
        let path = dir.join(format!("{tenant}-{}.{EXTENSION}", unix_now()));
        if !path.exists() {
            return path;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn save(conn: &Conn, t: &str, dir: &Path) -> anyhow::Result<()> {
    let t = tenant(t)?;
    let ep = conn.admin()?;
    std::fs::create_dir_all(dir).with_context(|| format!("--dir {}", dir.display()))?;
    let path = free_name(dir, t.as_str());
    let part = path.with_extension(format!("{EXTENSION}.part"));
    let file = File::create(&part).with_context(|| part.display().to_string())?;
    let mut sink = BufWriter::new(file);
    let written = ep.download(
        "POST",
        &format!("/admin/tenants/{}/snapshot", encode(t.as_str())),
        Body::empty(),
        &mut sink,
        &format!("saving {t}"),
    );
    let finished = written.map_err(anyhow::Error::from).and_then(|n| {
        let file = sink.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(n)
    });
    let bytes = match finished {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    std::fs::rename(&part, &path).with_context(|| path.display().to_string())?;
    output::println(&format!(
        "saved {t} to {} ({})",
        path.display(),
        output::bytes(bytes)
    ))?;
    Ok(())
}

/// The first bytes of `path`, checked to be a snapshot header: its format
/// version and whether it is signed.
pub(crate) fn read_header(path: &Path) -> anyhow::Result<(u32, bool)> {
    let mut head = [0u8; HEADER_LEN];
    let mut file = File::open(path).with_context(|| path.display().to_string())?;
    file.read_exact(&mut head)
        .map_err(|_| anyhow::anyhow!("{}: too short for a snapshot", path.display()))?;
    if head[..8] != MAGIC {
        bail!("{}: not a TensorWasm snapshot", path.display());
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    let flags = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
    Ok((version, flags & FLAG_KEYED != 0))
}

fn restore(conn: &Conn, t: &str, file: &Path) -> anyhow::Result<()> {
    let t = tenant(t)?;
    read_header(file)?;
    let ep = conn.admin()?;
    let f = File::open(file).with_context(|| file.display().to_string())?;
    let len = f
        .metadata()
        .with_context(|| file.display().to_string())?
        .len();
    let answer: serde_json::Value = ep.send_json(
        "POST",
        &format!("/admin/tenants/{}/restore", encode(t.as_str())),
        Body::Stream {
            content_type: "application/octet-stream".into(),
            len,
            reader: Box::new(f),
            label: format!("restoring {t}"),
        },
    )?;
    let on = answer["executor"].as_str().unwrap_or("its executor");
    output::println(&format!("restored {t} on {on} from {}", file.display()))?;
    Ok(())
}

/// One file of `snapshot ls`.
#[derive(Debug, Serialize)]
struct Listed {
    file: String,
    /// From the file name; `null` when the name does not follow
    /// `<tenant>-<unix time>.twsnap`.
    tenant: Option<String>,
    /// When it was taken (from the name), else the file's modification
    /// time; Unix seconds.
    taken_unix: u64,
    bytes: u64,
    /// `null` when the file is not a snapshot.
    format_version: Option<u32>,
    keyed: Option<bool>,
}

/// `<tenant>-<unix time>.twsnap` → (tenant, time).
fn parse_name(name: &str) -> Option<(String, u64)> {
    let stem = name.strip_suffix(&format!(".{EXTENSION}"))?;
    let (t, time) = stem.rsplit_once('-')?;
    let time = time.parse().ok()?;
    tenant(t).ok().map(|t| (t.as_str().to_string(), time))
}

fn list(dir: &Path, json: bool) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("--dir {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_none_or(|e| e != EXTENSION) {
            continue;
        }
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let parsed = parse_name(&name);
        let mtime = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let header = read_header(&path).ok();
        files.push(Listed {
            file: name,
            tenant: parsed.as_ref().map(|(t, _)| t.clone()),
            taken_unix: parsed.map_or(mtime, |(_, time)| time),
            bytes: meta.len(),
            format_version: header.map(|(v, _)| v),
            keyed: header.map(|(_, k)| k),
        });
    }
    files.sort_by(|a, b| (a.taken_unix, &a.file).cmp(&(b.taken_unix, &b.file)));
    if json {
        return Ok(output::print_json(
            &serde_json::json!({ "snapshots": files }),
        )?);
    }
    if files.is_empty() {
        eprintln!(
            "no .{EXTENSION} files in {}; save one with `tensor-wasm snapshot save <tenant>`",
            dir.display()
        );
    }
    let rows: Vec<Vec<String>> = files
        .iter()
        .map(|f| {
            vec![
                f.file.clone(),
                f.tenant.clone().unwrap_or_else(|| "?".into()),
                output::unix_time(f.taken_unix),
                output::bytes(f.bytes),
                f.format_version
                    .map_or_else(|| "not a snapshot".into(), |v| v.to_string()),
                match f.keyed {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    output::print(&output::table(
        &["FILE", "TENANT", "TAKEN", "SIZE", "FORMAT", "SIGNED"],
        &rows,
    ))?;
    Ok(())
}

/// What `snapshot inspect` reports.
#[derive(Debug, Serialize)]
struct Inspection {
    file: String,
    format_version: u32,
    /// The header's keyed flag: an HMAC signature is present.
    keyed: bool,
    /// `verified` (with --key), `not checked` (keyed, no key given) or
    /// `none` (unsigned).
    signature: &'static str,
    /// Bytes of the archive after the header.
    payload_bytes: u64,
    tenant: String,
    functions: Vec<FunctionView>,
    instances: usize,
    /// Linear memory of every instance, in bytes.
    memory_bytes: u64,
    tensors: usize,
    tensor_bytes: u64,
    jobs: JobsView,
}

#[derive(Debug, Serialize)]
struct FunctionView {
    id: String,
    name: String,
    exports: Vec<String>,
    wasm_bytes: u64,
    assets_bytes: Option<u64>,
    instances: usize,
    memory_bytes: u64,
    tensors: usize,
    tensor_bytes: u64,
}

#[derive(Debug, Default, Serialize)]
struct JobsView {
    total: usize,
    pending: usize,
    running: usize,
    succeeded: usize,
    failed: usize,
    /// Records that do not parse as jobs.
    unreadable: usize,
}

fn describe(file: &Path, header: snapshot::Header, key: bool, s: &TenantSnapshot) -> Inspection {
    let functions: Vec<FunctionView> = s
        .functions
        .iter()
        .map(|f| {
            let info: Option<FunctionInfo> = serde_json::from_str(&f.info_json).ok();
            let tensors = f.instances.iter().flat_map(|i| &i.tensors);
            FunctionView {
                id: info
                    .as_ref()
                    .map_or_else(|| "?".into(), |i| i.id.to_string()),
                name: info.as_ref().map_or_else(|| "?".into(), |i| i.name.clone()),
                exports: info.map(|i| i.exports).unwrap_or_default(),
                wasm_bytes: f.wasm.len() as u64,
                assets_bytes: f.assets.as_ref().map(|a| a.len() as u64),
                instances: f.instances.len(),
                memory_bytes: f.instances.iter().map(|i| i.memory.len() as u64).sum(),
                tensors: tensors.clone().count(),
                tensor_bytes: tensors.map(|t| t.data.len() as u64).sum(),
            }
        })
        .collect();
    let mut jobs = JobsView {
        total: s.jobs.len(),
        ..JobsView::default()
    };
    for j in &s.jobs {
        match serde_json::from_str::<JobInfo>(&j.info_json).map(|j| j.status) {
            Ok(JobStatus::Pending) => jobs.pending += 1,
            Ok(JobStatus::Running) => jobs.running += 1,
            Ok(JobStatus::Succeeded) => jobs.succeeded += 1,
            Ok(JobStatus::Failed) => jobs.failed += 1,
            Err(_) => jobs.unreadable += 1,
        }
    }
    Inspection {
        file: file.display().to_string(),
        format_version: header.version,
        keyed: header.keyed,
        signature: match (header.keyed, key) {
            (true, true) => "verified",
            (true, false) => "not checked",
            (false, _) => "none",
        },
        payload_bytes: header.payload_len,
        tenant: s.tenant.clone(),
        instances: functions.iter().map(|f| f.instances).sum(),
        memory_bytes: functions.iter().map(|f| f.memory_bytes).sum(),
        tensors: functions.iter().map(|f| f.tensors).sum(),
        tensor_bytes: functions.iter().map(|f| f.tensor_bytes).sum(),
        functions,
        jobs,
    }
}

fn inspect(file: &Path, key: Option<&str>, json: bool) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| file.display().to_string())?;
    let key_bytes = key.filter(|k| !k.is_empty()).map(str::as_bytes);
    let header = snapshot::verify(&bytes, key_bytes, u64::MAX)
        .with_context(|| file.display().to_string())?;
    let decoded = snapshot::decode(&bytes, key_bytes, u64::MAX)
        .with_context(|| file.display().to_string())?;
    let view = describe(file, header, key_bytes.is_some(), &decoded);
    if json {
        return Ok(output::print_json(&view)?);
    }
    let not_checked = format!(
        "signed, signature not checked (pass --key or set {})",
        env::SNAPSHOT_KEY
    );
    let signature = match view.signature {
        "verified" => "signed, signature verified",
        "not checked" => &not_checked,
        _ => "unsigned",
    };
    let j = &view.jobs;
    let mut job_parts = Vec::new();
    for (n, what) in [
        (j.pending, "pending"),
        (j.running, "running"),
        (j.succeeded, "succeeded"),
        (j.failed, "failed"),
        (j.unreadable, "unreadable"),
    ] {
        if n > 0 {
            job_parts.push(format!("{n} {what}"));
        }
    }
    let mut text = String::new();
    for (k, v) in [
        ("file", view.file.clone()),
        (
            "format",
            format!("version {}, {signature}", view.format_version),
        ),
        ("checksum", "ok (BLAKE3)".into()),
        ("payload", output::bytes(view.payload_bytes)),
        ("tenant", view.tenant.clone()),
        ("functions", view.functions.len().to_string()),
        (
            "instances",
            format!(
                "{} ({} of linear memory)",
                view.instances,
                output::bytes(view.memory_bytes)
            ),
        ),
        (
            "tensors",
            format!("{} ({})", view.tensors, output::bytes(view.tensor_bytes)),
        ),
        (
            "jobs",
            if job_parts.is_empty() {
                j.total.to_string()
            } else {
                format!("{} ({})", j.total, job_parts.join(", "))
            },
        ),
    ] {
        text.push_str(&format!("{k:<10} {v}\n"));
    }
    if !view.functions.is_empty() {
        text.push('\n');
        let rows: Vec<Vec<String>> = view
            .functions
            .iter()
            .map(|f| {
                vec![
                    f.id.clone(),
                    f.name.clone(),
                    f.exports.join(","),
                    output::bytes(f.wasm_bytes),
                    f.assets_bytes.map_or_else(|| "-".into(), output::bytes),
                    f.instances.to_string(),
                    f.tensors.to_string(),
                    output::bytes(f.tensor_bytes),
                ]
            })
            .collect();
        text.push_str(&output::table(
            &[
                "FUNCTION",
                "NAME",
                "EXPORTS",
                "WASM",
                "ASSETS",
                "INSTANCES",
                "TENSORS",
                "TENSOR BYTES",
            ],
            &rows,
        ));
    }
    output::print(&text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_wasm_shared::snapshot::{
        FunctionSnapshot, InstanceSnapshot, JobSnapshot, TensorSnapshot,
    };

    #[test]
    fn names_carry_tenant_and_time() {
        assert_eq!(
            parse_name("acme-co-1700000000.twsnap"),
            Some(("acme-co".into(), 1_700_000_000))
        );
        assert_eq!(parse_name("acme.twsnap"), None);
        assert_eq!(parse_name("Bad-1.twsnap"), None);
        assert_eq!(parse_name("acme-1.bin"), None);
    }

    #[test]
    fn inspection_counts_what_the_archive_holds() {
        let info = serde_json::json!({
            "id": "f-1", "name": "counter", "sha256": "00", "exports": ["handle", "init"],
            "created_at": "2025-01-01T00:00:00Z", "config": {}, "assets": []
        });
        let job = |status: &str| JobSnapshot {
            info_json: serde_json::json!({
                "id": "j", "function_id": "f-1", "status": status,
                "created_at": "2025-01-01T00:00:00Z", "finished_at": null,
                "result": null, "error": null
            })
            .to_string(),
            content_type: None,
            body: None,
        };
        let s = TenantSnapshot {
            tenant: "acme".into(),
            functions: vec![FunctionSnapshot {
                info_json: info.to_string(),
                wasm: vec![0; 100],
                assets: None,
                instances: vec![InstanceSnapshot {
                    memory: vec![0; 65536],
                    globals: vec![],
                    tensors: vec![
                        TensorSnapshot {
                            handle: 1,
                            dtype: 0,
                            dims: vec![4],
                            data: vec![0; 16],
                        },
                        TensorSnapshot {
                            handle: 2,
                            dtype: 5,
                            dims: vec![3],
                            data: vec![0; 3],
                        },
                    ],
                    asset_handles: vec![],
                }],
            }],
            jobs: vec![job("pending"), job("succeeded"), job("succeeded")],
        };
        let bytes = snapshot::encode(&s, Some(b"k")).unwrap();
        let header = snapshot::verify(&bytes, Some(b"k"), u64::MAX).unwrap();
        let v = describe(Path::new("x.twsnap"), header, true, &s);
        assert_eq!(
            (v.format_version, v.keyed, v.signature),
            (1, true, "verified")
        );
        assert_eq!(v.functions[0].name, "counter");
        assert_eq!(v.functions[0].exports, ["handle", "init"]);
        assert_eq!((v.instances, v.tensors, v.tensor_bytes), (1, 2, 19));
        assert_eq!(v.memory_bytes, 65536);
        assert_eq!((v.jobs.total, v.jobs.pending, v.jobs.succeeded), (3, 1, 2));
        let v = describe(Path::new("x.twsnap"), header, false, &s);
        assert_eq!(v.signature, "not checked");
    }
}
