//! The audit log: one JSON line per answered request, on disk, rotated by
//! size (schema: `docs/AUDIT-LOG.md`).
//!
//! Requests hand their record to [`AuditLog::record`], which only queues it;
//! one writer thread owns the file. That keeps disk latency off the request
//! path and gives the invariants:
//!
//! 1. A record is written with one `write` of a whole line into the current
//!    file; rotation happens only between records, so no record is torn or
//!    split across files.
//! 2. Rotation flushes and fsyncs the full file, creates the fresh one
//!    (as `<path>.next`), and only then renames the full file to
//!    `<path>.1` (older ones shift to `.2` … `.<keep>`) and the fresh one
//!    into its place, and fsyncs the folder: a crash mid-rotation leaves
//!    every record in one of the files, and a rotation that cannot create
//!    its fresh file changes nothing (the writer writes on into the full
//!    file and tries again [`ROTATE_RETRY`] later).
//! 3. The writer drains the queue, flushes, then lets records gather for
//!    [`BATCH_WINDOW`] (5 ms): one wake-up and one `write` per batch, and
//!    records reach the kernel within about 5 ms of being made; it fsyncs
//!    the file every [`SYNC_PERIOD`] (1 s); and [`AuditLog::close`]
//!    (called at shutdown) writes everything queued and fsyncs before it
//!    returns. A restart appends to the same file.
//! 4. A record counts as written once a flush carried it to the file; a
//!    write, flush, fsync or rotation that fails counts as a failure
//!    (`tensor_wasm_audit_failures_total`) and is logged: nothing is lost
//!    silently.
//! 5. Records of requests answered 401 (no valid credential) go to a log of
//!    their own, `<path>.unauthenticated`, rotated the same way by its own
//!    writer: a flood of them, which anyone can send, rotates only that
//!    log, never the history of what tenants and operators did.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;

use prometheus::IntCounter;
use tensor_wasm_shared::audit::AuditRecord;

/// Where and how the log is kept.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// The live file; rotated files sit beside it as `<path>.1` … .
    pub path: PathBuf,
    /// Size at which the live file is rotated, in bytes; 64 MiB keeps a
    /// file quick to grep and ship.
    pub max_bytes: u64,
    /// Rotated files kept; the oldest beyond this is deleted.
    pub keep: usize,
}

impl AuditConfig {
    /// A log at `path` with the default rotation (64 MiB, 10 files).
    pub fn at(path: impl Into<PathBuf>) -> AuditConfig {
        AuditConfig {
            path: path.into(),
            max_bytes: 64 << 20,
            keep: 10,
        }
    }
}

/// How long the writer lets records gather after a flush; it bounds how
/// late a record reaches the kernel (module doc, invariant 3).
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

/// How often the writer fsyncs the live file (module doc, invariant 3).
const SYNC_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// How long after a failed rotation the writer tries again (invariant 2).
const ROTATE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// What the writer counts.
#[derive(Clone, Debug)]
pub struct AuditCounters {
    /// Records a flush carried to the file.
    pub written: IntCounter,
    /// Writes, flushes, fsyncs and rotations that failed.
    pub failures: IntCounter,
}

enum Msg {
    Line(Vec<u8>),
    Close(SyncSender<()>),
}

/// The audit log's handle; cheap to share.
#[derive(Debug)]
pub struct AuditLog {
    tx: Mutex<Option<Sender<Msg>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Where records of unauthenticated requests go (invariant 5).
    unauthenticated: Option<Box<Unauthenticated>>,
}

/// The log of unauthenticated requests, opened at its first record.
#[derive(Debug)]
struct Unauthenticated {
    config: AuditConfig,
    counters: AuditCounters,
    /// `None` once it could not be opened: its records then count as
    /// failures.
    log: std::sync::OnceLock<Option<AuditLog>>,
}

/// The suffix of the unauthenticated requests' log (module doc, invariant
/// 5).
pub const UNAUTHENTICATED_SUFFIX: &str = ".unauthenticated";

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl AuditLog {
    /// Opens (or creates, with its folder) the log and the one of
    /// unauthenticated requests beside it, and starts their writers.
    pub fn open(config: AuditConfig, counters: AuditCounters) -> std::io::Result<AuditLog> {
        let mut path = config.path.clone().into_os_string();
        path.push(UNAUTHENTICATED_SUFFIX);
        let unauthenticated = Unauthenticated {
            config: AuditConfig {
                path: path.into(),
                ..config.clone()
            },
            counters: counters.clone(),
            log: std::sync::OnceLock::new(),
        };
        let mut log = AuditLog::open_one(config, counters)?;
        log.unauthenticated = Some(Box::new(unauthenticated));
        Ok(log)
    }

    /// One log and its writer.
    fn open_one(config: AuditConfig, counters: AuditCounters) -> std::io::Result<AuditLog> {
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = open_append(&config.path)?;
        let size = file.metadata()?.len();
        let (tx, rx) = channel();
        let writer = Writer {
            config,
            out: BufWriter::with_capacity(64 << 10, file),
            size,
            counters,
            pending: 0,
            synced: std::time::Instant::now(),
            rotate_after: None,
        };
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(AuditLog {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            unauthenticated: None,
        })
    }

    /// Queues one record. After [`close`](Self::close) records are dropped
    /// with a log line (only requests racing the shutdown can hit that).
    pub fn record(&self, record: &AuditRecord) {
        if record.status == 401
            && let Some(u) = &self.unauthenticated
        {
            let log = u.log.get_or_init(|| {
                AuditLog::open_one(u.config.clone(), u.counters.clone())
                    .inspect_err(|e| tracing::error!(error = %e, path = %u.config.path.display(), "cannot open the audit log of unauthenticated requests; their records are not written"))
                    .ok()
            });
            match log {
                Some(log) => log.record(record),
                None => u.counters.failures.inc(),
            }
            return;
        }
        let mut line = Vec::with_capacity(512);
        match serde_json::to_writer(&mut line, record) {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, "audit record not serialisable");
                return;
            }
        }
        line.push(b'\n');
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) if tx.send(Msg::Line(line)).is_ok() => {}
            _ => tracing::warn!(
                request_id = %record.request_id,
                "audit log closed; record dropped"
            ),
        }
    }

    /// Writes everything queued, fsyncs, and stops the writers. Idempotent.
    pub fn close(&self) {
        if let Some(Some(log)) = self.unauthenticated.as_ref().and_then(|u| u.log.get()) {
            log.close();
        }
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tx) = tx {
            let (ack_tx, ack_rx) = sync_channel(1);
            if tx.send(Msg::Close(ack_tx)).is_ok() {
                let _ = ack_rx.recv();
            }
        }
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

struct Writer {
    config: AuditConfig,
    out: BufWriter<File>,
    size: u64,
    counters: AuditCounters,
    /// Records in `out` that no flush has carried to the file yet.
    pending: u64,
    /// When the file was last fsynced.
    synced: std::time::Instant,
    /// After a failed rotation: not before then.
    rotate_after: Option<std::time::Instant>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            let mut next = Some(msg);
            // Drain what is queued, then flush once.
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Line(line) => self.write(&line),
                    Msg::Close(ack) => {
                        self.sync();
                        let _ = ack.send(());
                        return;
                    }
                }
                next = rx.try_recv().ok();
            }
            self.flush();
            if self.synced.elapsed() >= SYNC_PERIOD {
                self.sync();
            }
            // Let records gather: one wake-up and one write per batch rather
            // than per record, which under load was most of the proxy's
            // per-request cost. A close still arrives through the queue.
            std::thread::sleep(BATCH_WINDOW);
        }
        // Every sender is gone without a close: still leave the file whole.
        self.sync();
    }

    fn write(&mut self, line: &[u8]) {
        if self.size > 0
            && self.size + line.len() as u64 > self.config.max_bytes
            && self
                .rotate_after
                .is_none_or(|t| std::time::Instant::now() >= t)
        {
            match self.rotate() {
                Ok(()) => self.rotate_after = None,
                Err(e) => {
                    self.counters.failures.inc();
                    self.rotate_after = Some(std::time::Instant::now() + ROTATE_RETRY);
                    tracing::error!(error = %e, path = %self.config.path.display(), "audit log rotation failed; writing on into the full file");
                }
            }
        }
        match self.out.write_all(line) {
            Ok(()) => {
                self.size += line.len() as u64;
                self.pending += 1;
            }
            Err(e) => {
                self.counters.failures.inc();
                tracing::error!(error = %e, path = %self.config.path.display(), "audit record not written");
            }
        }
    }

    /// Carries what is buffered to the file and counts it written.
    fn flush(&mut self) -> bool {
        match self.out.flush() {
            Ok(()) => {
                self.counters
                    .written
                    .inc_by(std::mem::take(&mut self.pending));
                true
            }
            Err(e) => {
                self.counters.failures.inc();
                tracing::error!(error = %e, path = %self.config.path.display(), "audit log flush failed; its records stay buffered");
                false
            }
        }
    }

    fn sync(&mut self) {
        self.synced = std::time::Instant::now();
        if !self.flush() {
            return;
        }
        if let Err(e) = self.out.get_ref().sync_all() {
            self.counters.failures.inc();
            tracing::error!(error = %e, path = %self.config.path.display(), "audit log fsync failed");
        }
    }

    /// Step 2 of the module doc: flush and fsync, create the fresh file,
    /// shift the old files, rename both, fsync the folder.
    fn rotate(&mut self) -> std::io::Result<()> {
        if !self.flush() {
            return Err(std::io::Error::other(
                "the full file's records are not flushed",
            ));
        }
        self.out.get_ref().sync_all()?;
        let path = &self.config.path;
        let beside = |suffix: &str| {
            let mut s = path.as_os_str().to_owned();
            s.push(suffix);
            PathBuf::from(s)
        };
        let next = beside(".next");
        // Left by a crash mid-rotation, it holds no record.
        let fresh = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&next)?;
        let numbered = |n: usize| beside(&format!(".{n}"));
        let keep = self.config.keep.max(1);
        match std::fs::remove_file(numbered(keep)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for n in (1..keep).rev() {
            match std::fs::rename(numbered(n), numbered(n + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        std::fs::rename(path, numbered(1))?;
        std::fs::rename(&next, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.out = BufWriter::with_capacity(64 << 10, fresh);
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_wasm_shared::audit::Outcome;

    fn rec(i: usize) -> AuditRecord {
        AuditRecord {
            time: "2026-01-01T00:00:00.000Z".into(),
            request_id: format!("req-{i}"),
            listener: "public".into(),
            tenant: Some("acme".into()),
            token_id: Some("0123456789ab".into()),
            action: "functions.invoke".into(),
            resource: "/functions/f/invoke".into(),
            status: 200,
            outcome: Outcome::Success,
            latency_ms: 1.5,
            remote: Some("127.0.0.1:1234".into()),
            stream: None,
        }
    }

    /// Counters for a test, and the written one.
    fn counters() -> (AuditCounters, IntCounter) {
        let written = IntCounter::new("w", "w").unwrap();
        let failures = IntCounter::new("f", "f").unwrap();
        (
            AuditCounters {
                written: written.clone(),
                failures,
            },
            written,
        )
    }

    fn read_all(dir: &Path) -> Vec<AuditRecord> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for line in text.lines() {
                out.push(serde_json::from_str::<AuditRecord>(line).expect("whole lines only"));
            }
        }
        out
    }

    #[test]
    fn a_flood_of_unauthenticated_requests_rotates_only_its_own_log() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            path: dir.path().join("audit.log"),
            max_bytes: 2_000,
            keep: 2,
        };
        let (counters, _) = counters();
        let log = AuditLog::open(config, counters).unwrap();
        for i in 0..3 {
            log.record(&rec(i));
        }
        // Far more than the kept files of either log hold.
        for i in 0..1_000 {
            log.record(&AuditRecord {
                tenant: None,
                token_id: None,
                status: 401,
                outcome: Outcome::of_status(401),
                ..rec(100 + i)
            });
        }
        log.close();
        let text = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        let kept: Vec<AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            kept.iter()
                .map(|r| r.request_id.as_str())
                .collect::<Vec<_>>(),
            ["req-0", "req-1", "req-2"],
            "the tenants' history stays whole"
        );
        let anonymous = dir.path().join("audit.log.unauthenticated");
        let last: Vec<AuditRecord> = std::fs::read_to_string(&anonymous)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(last.iter().all(|r| r.status == 401));
        assert_eq!(last.last().unwrap().request_id, "req-1099");
        assert!(dir.path().join("audit.log.unauthenticated.2").exists());
        assert!(!dir.path().join("audit.log.1").exists(), "never rotated");
    }

    #[test]
    fn rotation_loses_and_tears_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            path: dir.path().join("audit.log"),
            max_bytes: 2_000,
            keep: 1_000,
        };
        let (counters, written) = counters();
        let log = std::sync::Arc::new(AuditLog::open(config, counters).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..250 {
                        log.record(&rec(t * 1000 + i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        log.close();
        assert_eq!(written.get(), 1000);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(files > 10, "rotated into {files} files");
        let mut ids: Vec<String> = read_all(dir.path())
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 1000);
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let len = entry.unwrap().metadata().unwrap().len();
            assert!(len <= 2_000, "a file outgrew the limit: {len}");
        }
    }

    #[test]
    fn old_files_beyond_keep_are_deleted_and_a_restart_appends() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            path: dir.path().join("audit.log"),
            max_bytes: 600,
            keep: 2,
        };
        let (counters, _) = counters();
        let log = AuditLog::open(config.clone(), counters.clone()).unwrap();
        for i in 0..40 {
            log.record(&rec(i));
        }
        log.close();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["audit.log", "audit.log.1", "audit.log.2"]);
        let before = std::fs::read_to_string(&config.path)
            .unwrap()
            .lines()
            .count();
        let log = AuditLog::open(config.clone(), counters).unwrap();
        log.record(&rec(99));
        log.close();
        let after = std::fs::read_to_string(&config.path).unwrap();
        assert!(after.lines().count() == before + 1 || after.lines().count() == 1);
        assert!(after.lines().last().unwrap().contains("req-99"));
        // Records after close are dropped, not a panic.
        log.record(&rec(100));
    }

    /// A rotation that cannot create its fresh file (no inode left on the
    /// file system) changes nothing: no file of the archive goes, every
    /// record lands in the full file, the failure is counted, and once
    /// there is room the next rotation goes through. (Before, the full
    /// file was renamed first: every later record then shifted the archive
    /// once more, deleting it a file per record, the live file at last.)
    #[test]
    fn a_rotation_that_cannot_create_its_file_deletes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).unwrap();
        // Three inodes: the root, the live file and one archived file.
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m,nr_inodes=3", "tmpfs"])
            .arg(&mount)
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "mounting a tmpfs (the tests run as root)"
        );
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(mount.clone());
        let config = AuditConfig {
            path: mount.join("audit.log"),
            max_bytes: 600,
            keep: 3,
        };
        std::fs::write(mount.join("audit.log.1"), "").unwrap();
        let written = IntCounter::new("w", "w").unwrap();
        let failures = IntCounter::new("f", "f").unwrap();
        let counters = AuditCounters {
            written: written.clone(),
            failures: failures.clone(),
        };
        let log = AuditLog::open(config.clone(), counters.clone()).unwrap();
        for i in 0..40 {
            log.record(&rec(i));
        }
        log.close();
        let mut names: Vec<String> = std::fs::read_dir(&mount)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["audit.log", "audit.log.1"],
            "nothing renamed or deleted"
        );
        assert_eq!(
            read_all(&mount).len(),
            40,
            "every record is in the full file"
        );
        assert_eq!(written.get(), 40);
        assert!(failures.get() >= 1, "the failed rotation is counted");
        // Room again: the next rotation goes through.
        std::fs::remove_file(mount.join("audit.log.1")).unwrap();
        let log = AuditLog::open(config, counters).unwrap();
        log.record(&rec(40));
        log.close();
        let archived = std::fs::read_to_string(mount.join("audit.log.1")).unwrap();
        assert_eq!(
            archived.lines().count(),
            40,
            "the full file, archived whole"
        );
        assert_eq!(read_all(&mount).len(), 41);
    }
}
