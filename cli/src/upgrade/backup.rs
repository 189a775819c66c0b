//! `tensor-wasm upgrade --backup DIR` (`docs/UPGRADE.md`, "Backup"): before
//! anything changes, a snapshot of every tenant and a copy of the audit
//! log, in a folder named for the release the fleet runs and the time.
//!
//! ```text
//! DIR/<version>-<unix time>/
//!   <tenant>.twsnap    one per tenant (POST /admin/tenants/{t}/snapshot),
//!                      signed when the executors have a snapshot key
//!   audit.log          the audit log's current segment, up to its last
//!                      whole record (and `audit-<k>.log`, proxy k's,
//!                      under an `up` of several proxies)
//!   backup.json        what is there: version, time, per tenant the file,
//!                      its size, SHA-256 and whether it is signed
//! ```
//!
//! Every file is written under a `.part` name, synced and renamed, and
//! `backup.json` last: a folder with a `backup.json` is whole.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Serialize;
use sha2::Digest;
use tensor_wasm_shared::TenantId;

use super::Admin;

/// `backup.json`.
#[derive(Debug, Serialize)]
pub struct Backup {
    /// The release the fleet ran (`mixed` when its executors differ).
    pub version: String,
    pub created_unix: u64,
    pub tenants: Vec<Saved>,
    /// The audit log's copy, when the fleet keeps one.
    pub audit: Option<Copied>,
    /// The other proxies' audit logs, when the fleet runs several.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_audits: Vec<Copied>,
    #[serde(skip)]
    pub dir: PathBuf,
}

/// One tenant's snapshot.
#[derive(Debug, Serialize)]
pub struct Saved {
    pub tenant: String,
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub signed: bool,
}

/// The audit log's copy.
#[derive(Debug, Serialize)]
pub struct Copied {
    pub file: String,
    pub bytes: u64,
    pub records: u64,
}

/// Writes the backup of every tenant the proxy places, and of the audit
/// log at `audit_log` if there is one (and of `other_audits`, the other
/// proxies' logs), under `dir`.
pub fn write(
    admin: &Admin,
    dir: &Path,
    version: &str,
    audit_log: &Path,
    other_audits: &[PathBuf],
) -> anyhow::Result<Backup> {
    let created_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // The version comes from the executors' answers: only plain characters
    // reach a file name.
    let tag: String = version
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' | '+' => c,
            _ => '_',
        })
        .collect();
    let folder = dir.join(format!("{tag}-{created_unix}"));
    std::fs::create_dir_all(&folder).with_context(|| format!("--backup {}", folder.display()))?;
    let placements = admin.call("GET", "/admin/placements", None)?;
    let mut tenants: Vec<String> = placements["placements"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    tenants.sort();
    let mut saved = Vec::with_capacity(tenants.len());
    for tenant in tenants {
        if TenantId::new(&tenant).is_err() {
            bail!("the proxy places a tenant named {tenant:?}, which is not a tenant id");
        }
        let file = format!("{tenant}.twsnap");
        let (bytes, sha256) = write_file(&folder.join(&file), |sink| {
            admin.download(&format!("/admin/tenants/{tenant}/snapshot"), sink)
        })
        .with_context(|| format!("backing up tenant {tenant}"))?;
        let (_, signed) = crate::client::snapshot::read_header(&folder.join(&file))?;
        saved.push(Saved {
            tenant,
            file,
            bytes,
            sha256,
            signed,
        });
    }
    let audit = if audit_log.is_file() {
        let (bytes, records) = copy_audit(audit_log, &folder.join("audit.log"))?;
        Some(Copied {
            file: "audit.log".into(),
            bytes,
            records,
        })
    } else {
        None
    };
    let mut others = Vec::new();
    for log in other_audits.iter().filter(|l| l.is_file()) {
        let file = log
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("an audit log with no file name")?;
        let (bytes, records) = copy_audit(log, &folder.join(&file))?;
        others.push(Copied {
            file,
            bytes,
            records,
        });
    }
    let backup = Backup {
        version: version.to_string(),
        created_unix,
        tenants: saved,
        audit,
        other_audits: others,
        dir: folder,
    };
    let manifest = serde_json::to_vec_pretty(&backup)?;
    write_file(&backup.dir.join("backup.json"), |sink| {
        sink.write_all(&manifest)?;
        Ok(manifest.len() as u64)
    })?;
    std::fs::File::open(&backup.dir)
        .and_then(|d| d.sync_all())
        .with_context(|| backup.dir.display().to_string())?;
    Ok(backup)
}

/// Writes `path` through `fill` under a `.part` name, synced and renamed
/// into place; its size and SHA-256.
fn write_file(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> anyhow::Result<u64>,
) -> anyhow::Result<(u64, String)> {
    let part = path.with_extension("part");
    let file = std::fs::File::create(&part).with_context(|| part.display().to_string())?;
    let mut sink = Hashing {
        out: std::io::BufWriter::new(file),
        hash: sha2::Sha256::new(),
    };
    let filled = fill(&mut sink).and_then(|n| {
        let file = sink.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(n)
    });
    let bytes = match filled {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    std::fs::rename(&part, path).with_context(|| path.display().to_string())?;
    Ok((bytes, hex::encode(sink.hash.finalize())))
}

/// A writer that hashes what passes through it.
struct Hashing<W: Write> {
    out: W,
    hash: sha2::Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(b)?;
        self.hash.update(&b[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Copies the audit log's current segment up to its last whole record (a
/// record being written as it is read is left out); its bytes and records.
fn copy_audit(from: &Path, to: &Path) -> anyhow::Result<(u64, u64)> {
    let mut bytes = std::fs::read(from).with_context(|| from.display().to_string())?;
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    bytes.truncate(whole);
    let records = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    write_file(to, |sink| {
        sink.write_all(&bytes)?;
        Ok(bytes.len() as u64)
    })?;
    Ok((whole as u64, records))
}
