//! Placement epochs: an executor refuses a request routed by a placement it
//! has moved past (`ARCHITECTURE.md`, "Fencing stale proxies").
//!
//! Every request a proxy forwards carries its tenant's placement epoch
//! (`x-tensor-wasm-epoch`: the revision of the placement that sent it
//! here). Per tenant this executor remembers the newest epoch it has seen,
//! and, once the tenant has moved away, the epoch of the placement that
//! took it elsewhere. A request is refused with `placement_stale` when:
//!
//! - its tenant is frozen here, on its way to another executor;
//! - the tenant left this executor at a newer epoch than the request's;
//! - a request with a newer epoch has reached this executor already.
//!
//! The proxy then reads the placement again and sends the request where the
//! tenant lives. A request without an epoch (an older proxy, an operator's
//! direct call) is not fenced.
//!
//! A request of a tenant that left, when the drop named the executor it
//! moved to ([`Fences::moved_to`]), is not refused but sent on there,
//! unread, so that a proxy cut off from etcd still serves it; see
//! `crate::http`. A proxy can send a request again only if it kept its body
//! (up to [`RESEND_BODY_LIMIT`]). One whose body may be larger is not
//! refused for its tenant's pause either: it is held until the tenant runs
//! here again, or until the tenant has left, and is then sent on.
//!
//! The tenants that left are kept on disk too ([`Fences::open`]), so that
//! a restart of this executor neither runs a stale proxy's request on a
//! copy made anew here nor forgets where to send it on.
//!
//! [`RESEND_BODY_LIMIT`]: tensor_wasm_shared::headers::RESEND_BODY_LIMIT

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tensor_wasm_shared::TenantId;

use crate::error::ExecError;

/// Tenants remembered at most; past it the oldest-left entries go first
/// (a tenant that left long ago has no proxy still routing to it here).
const MAX_FENCES: usize = 1 << 20;

#[derive(Clone, Debug, Default)]
struct Fence {
    /// Newest epoch a request of the tenant carried here.
    seen: i64,
    /// The epoch of the placement that took the tenant elsewhere.
    left: Option<i64>,
    /// The address of the executor that placement took it to, when the
    /// drop named it.
    to: Option<String>,
}

/// Every tenant's fence on this executor.
#[derive(Debug, Default)]
pub struct Fences {
    map: Mutex<HashMap<TenantId, Fence>>,
    /// Where the tenants that left are kept, when on disk.
    log: Option<Mutex<FenceLog>>,
}

/// The file in the state directory that keeps the tenants that left: one
/// JSON line per change ([`LogLine`]), rewritten with the live ones alone
/// at each start and once it holds many more lines than those.
pub const LOG_FILE: &str = "fences.log";

/// Lines past which the log is rewritten, beyond twice the live entries.
const LOG_SLACK: usize = 4096;

/// One change of a tenant's fence, as the log keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct LogLine {
    tenant: String,
    /// The epoch of the placement that took it elsewhere; none when it
    /// arrived here again.
    left: Option<i64>,
    to: Option<String>,
}

#[derive(Debug)]
struct FenceLog {
    path: PathBuf,
    file: File,
    /// Lines in the file.
    lines: usize,
}

fn stale(tenant: &TenantId, why: String) -> ExecError {
    ExecError::PlacementStale(format!("tenant {tenant}: {why}"))
}

impl Fences {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, Fence>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fences kept in `state_dir` ([`LOG_FILE`]): the tenants that left
    /// are read back, and the file rewritten with them alone. A line that
    /// does not parse (one cut short by a crash) is skipped and logged.
    /// Blocking.
    pub fn open(state_dir: &Path) -> std::io::Result<Fences> {
        let path = state_dir.join(LOG_FILE);
        let mut map = HashMap::new();
        let mut skipped = 0usize;
        match File::open(&path) {
            Ok(f) => {
                for line in std::io::BufReader::new(f).split(b'\n') {
                    let line = line?;
                    let parsed = serde_json::from_slice::<LogLine>(&line)
                        .ok()
                        .and_then(|l| Some((TenantId::new(&l.tenant).ok()?, l)));
                    match parsed {
                        Some((tenant, l)) => apply(&mut map, tenant, l.left, l.to),
                        None if line.is_empty() => {}
                        None => skipped += 1,
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if skipped > 0 {
            tracing::warn!(path = %path.display(), skipped, "lines of the fences log that do not parse were skipped");
        }
        let log = rewrite(&path, &map)?;
        Ok(Fences {
            map: Mutex::new(map),
            log: Some(Mutex::new(log)),
        })
    }

    /// Appends `line` to the log, synced; rewrites the log once it holds
    /// many more lines than live entries. A failure is logged: the fence
    /// holds in memory still, until a restart. Blocking.
    fn record(&self, line: &LogLine) {
        let Some(log) = &self.log else { return };
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        let written = serde_json::to_vec(line)
            .map_err(std::io::Error::other)
            .and_then(|mut bytes| {
                bytes.push(b'\n');
                log.file.write_all(&bytes)?;
                log.file.sync_data()
            });
        if let Err(e) = written {
            tracing::warn!(tenant = %line.tenant, error = %e, "cannot keep a tenant's fence on disk; it holds until a restart");
            return;
        }
        log.lines += 1;
        // Counted only past the slack: the map's lock is every routed
        // request's.
        if log.lines > LOG_SLACK
            && log.lines > 2 * self.lock().values().filter(|f| f.left.is_some()).count() + LOG_SLACK
        {
            let map = self.lock().clone();
            match rewrite(&log.path, &map) {
                Ok(fresh) => *log = fresh,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot rewrite the fences log");
                }
            }
        }
    }

    /// Admits or refuses a request of `tenant` routed by the placement of
    /// `epoch`; `frozen` says whether the tenant is frozen here (moving).
    pub fn admit(&self, tenant: &TenantId, epoch: i64, frozen: bool) -> Result<(), ExecError> {
        let mut map = self.lock();
        if !map.contains_key(tenant) && map.len() >= MAX_FENCES {
            // Forget tenants that left; if none did, fence no new tenant
            // rather than grow without bound.
            map.retain(|_, f| f.left.is_none());
            if map.len() >= MAX_FENCES {
                return if frozen {
                    Err(stale(tenant, "it is moving away from this executor".into()))
                } else {
                    Ok(())
                };
            }
        }
        let f = map.entry(tenant.clone()).or_default();
        if let Some(left) = f.left {
            if epoch < left {
                return Err(stale(
                    tenant,
                    format!(
                        "it left this executor at placement epoch {left}; this request was routed by epoch {epoch}"
                    ),
                ));
            }
            // A newer placement put it here again.
            f.left = None;
            f.to = None;
        }
        if epoch < f.seen {
            return Err(stale(
                tenant,
                format!(
                    "a request routed by placement epoch {} reached this executor; this one was routed by epoch {epoch}",
                    f.seen
                ),
            ));
        }
        f.seen = epoch;
        if frozen {
            return Err(stale(tenant, "it is moving away from this executor".into()));
        }
        Ok(())
    }

    /// `tenant` is to be dropped here because the placement of `epoch` put
    /// it elsewhere: from now on requests routed by older placements are
    /// refused. A drop older than a request already routed here (a proxy
    /// with a stale table) is itself refused. `to`: the address of the
    /// executor it moved to, if the drop named it.
    ///
    /// Kept on disk (synced) before it returns, when the fences are.
    /// Blocking.
    pub fn left(&self, tenant: &TenantId, epoch: i64, to: Option<&str>) -> Result<(), ExecError> {
        {
            let mut map = self.lock();
            let f = map.entry(tenant.clone()).or_default();
            if epoch < f.seen {
                return Err(stale(
                    tenant,
                    format!(
                        "a request routed by placement epoch {} reached this executor; the drop was asked by epoch {epoch}",
                        f.seen
                    ),
                ));
            }
            apply(
                &mut map,
                tenant.clone(),
                Some(epoch),
                to.map(str::to_string),
            );
        }
        self.record(&LogLine {
            tenant: tenant.to_string(),
            left: Some(epoch),
            to: to.map(str::to_string),
        });
        Ok(())
    }

    /// Where a request of `tenant` routed by the placement of `epoch` is
    /// to be sent on: the executor the tenant moved to and the epoch of
    /// the placement that took it there, once it has left this executor
    /// at a placement newer than the request's and the drop named where.
    pub fn moved_to(&self, tenant: &TenantId, epoch: i64) -> Option<(String, i64)> {
        let map = self.lock();
        let f = map.get(tenant)?;
        match (f.left, &f.to) {
            (Some(left), Some(to)) if epoch < left => Some((to.clone(), left)),
            _ => None,
        }
    }

    /// `tenant` arrived here (an import, a committed move): whatever it left
    /// behind before no longer applies. Blocking, when it had left.
    pub fn arrived(&self, tenant: &TenantId) {
        let had_left = match self.lock().get_mut(tenant) {
            Some(f) if f.left.is_some() => {
                f.left = None;
                f.to = None;
                true
            }
            _ => false,
        };
        if had_left {
            self.record(&LogLine {
                tenant: tenant.to_string(),
                left: None,
                to: None,
            });
        }
    }
}

/// Applies one change to `tenant`'s fence: it left by the placement of
/// `left` (the newest such wins), or, with none, arrived again.
fn apply(
    map: &mut HashMap<TenantId, Fence>,
    tenant: TenantId,
    left: Option<i64>,
    to: Option<String>,
) {
    let f = map.entry(tenant).or_default();
    match left {
        Some(epoch) if f.left.is_none_or(|l| epoch >= l) => {
            f.left = Some(epoch);
            f.to = to;
        }
        Some(_) => {}
        None => {
            f.left = None;
            f.to = None;
        }
    }
}

/// Writes the tenants of `map` that left to a new log at `path`, synced,
/// in place of the old by a rename; the new log, open to append.
fn rewrite(path: &Path, map: &HashMap<TenantId, Fence>) -> std::io::Result<FenceLog> {
    let tmp = path.with_extension("log.tmp");
    let mut out = std::io::BufWriter::new(File::create(&tmp)?);
    let mut lines = 0;
    for (tenant, f) in map {
        if let Some(left) = f.left {
            let line = LogLine {
                tenant: tenant.to_string(),
                left: Some(left),
                to: f.to.clone(),
            };
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
            lines += 1;
        }
    }
    let file = out
        .into_inner()
        .map_err(std::io::IntoInnerError::into_error)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    let file = std::fs::OpenOptions::new().append(true).open(path)?;
    Ok(FenceLog {
        path: path.to_path_buf(),
        file,
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    fn code(r: Result<(), ExecError>) -> Option<&'static str> {
        r.err().map(|e| e.to_api().code.as_str())
    }

    #[test]
    fn older_epochs_are_refused_once_a_newer_one_or_a_move_was_seen() {
        let f = Fences::default();
        assert_eq!(code(f.admit(&t("a"), 5, false)), None);
        assert_eq!(code(f.admit(&t("a"), 5, false)), None);
        assert_eq!(code(f.admit(&t("a"), 4, false)), Some("placement_stale"));
        assert_eq!(code(f.admit(&t("a"), 7, false)), None);
        assert_eq!(code(f.admit(&t("a"), 6, false)), Some("placement_stale"));
        // Other tenants are not affected.
        assert_eq!(code(f.admit(&t("b"), 1, false)), None);
        // Frozen for a move: refused, whatever the epoch.
        assert_eq!(code(f.admit(&t("b"), 2, true)), Some("placement_stale"));
    }

    #[test]
    fn a_tenant_that_left_is_fenced_until_a_newer_placement_brings_it_back() {
        let f = Fences::default();
        assert_eq!(code(f.admit(&t("a"), 3, false)), None);
        f.left(&t("a"), 9, Some("10.0.0.2:8081")).unwrap();
        assert_eq!(
            f.moved_to(&t("a"), 3),
            Some(("10.0.0.2:8081".to_string(), 9))
        );
        assert_eq!(f.moved_to(&t("a"), 9), None);
        assert_eq!(f.moved_to(&t("b"), 3), None);
        assert_eq!(code(f.admit(&t("a"), 3, false)), Some("placement_stale"));
        assert_eq!(code(f.admit(&t("a"), 8, false)), Some("placement_stale"));
        // Moved back here by the placement of epoch 12.
        f.arrived(&t("a"));
        assert_eq!(f.moved_to(&t("a"), 3), None);
        assert_eq!(code(f.admit(&t("a"), 12, false)), None);
        assert_eq!(code(f.admit(&t("a"), 3, false)), Some("placement_stale"));
        // Without an import in between, a newer placement clears it too.
        // A drop asked by a placement older than one seen is refused.
        assert_eq!(code(f.left(&t("a"), 11, None)), Some("placement_stale"));
        f.left(&t("a"), 20, None).unwrap();
        assert_eq!(f.moved_to(&t("a"), 19), None, "the drop named no executor");
        assert_eq!(code(f.admit(&t("a"), 19, false)), Some("placement_stale"));
        assert_eq!(code(f.admit(&t("a"), 21, false)), None);
    }

    #[test]
    fn the_tenants_that_left_are_fenced_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let f = Fences::open(dir.path()).unwrap();
            f.left(&t("a"), 9, Some("10.0.0.2:8081")).unwrap();
            f.left(&t("b"), 4, None).unwrap();
            f.left(&t("c"), 5, Some("10.0.0.3:8081")).unwrap();
            f.arrived(&t("c"));
        }
        // A line cut short by a crash is skipped.
        let path = dir.path().join(LOG_FILE);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(br#"{"tenant":"d","left":"#).unwrap();
        drop(file);
        let f = Fences::open(dir.path()).unwrap();
        assert_eq!(
            f.moved_to(&t("a"), 3),
            Some(("10.0.0.2:8081".to_string(), 9))
        );
        assert_eq!(code(f.admit(&t("b"), 3, false)), Some("placement_stale"));
        assert_eq!(f.moved_to(&t("c"), 3), None);
        assert_eq!(code(f.admit(&t("c"), 3, false)), None);
        assert_eq!(code(f.admit(&t("d"), 3, false)), None);
        // Rewritten with the live entries alone.
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(kept.lines().count(), 2, "{kept}");
    }
}
