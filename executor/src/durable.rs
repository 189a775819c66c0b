//! Checkpoints of tenants' warm state on the executor's disk, so that a
//! crash loses no more than each function's durability allows
//! (`ARCHITECTURE.md`, "Durable state"; `docs/API.md`, "Durability").
//!
//! Each tenant has a journal, `durable/<tenant>/<generation>.journal`: a
//! sequence of frames, each one instance's changes since its previous
//! frame, as a format 2 stream of the records a migration's rounds carry,
//! written by the same code ([`crate::outbound::write_instance`]): its
//! size, the pages written (through the instance's own page tracking, so
//! a frame costs what changed), the tensors made and the handles freed,
//! and its mutable globals. An exact frame is taken while its taker holds
//! the instance through one of its pool's slots (the committer, the
//! checkpointer; an invocation the committer asked to). The
//! checkpointer first writes a racy frame, read while the instance runs
//! (the bulk: a fresh copy, or an interval's pages), so that it holds the
//! instance only for what was written meanwhile; a racy frame counts only
//! once an exact frame of its instance follows it.
//!
//! A frame on disk:
//!
//! ```text
//! "TWJ1" | flags u32 | instance u64 | len u64 | XXH3 of the 24 bytes before (u64)
//! payload: len bytes (a format 2 stream, unsigned, whose End record
//!          carries the BLAKE3 of the stream's bytes before it)
//! ```
//!
//! A frame of up to 1 MiB is written at once, with the next sync, and
//! hashed then (an invocation that takes a frame pays a copy of what it
//! wrote, not a hash); a larger one streams out, hashed as it goes, and
//! its header is written last. A frame cut short by a crash or a full
//! disk, or with a bit flipped anywhere, fails a checksum.
//! Recovery ([`recover`]) applies the frames in order and stops at the
//! first that fails: every instance then stands as of its last good frame.
//!
//! A journal rolls to a new generation once it holds twice what a fresh
//! copy of its instances takes (64 MiB at least): each instance's next
//! frame is then a fresh copy in the new file, and a generation goes once
//! no instance has its fresh copy in it or the one after.
//!
//! A `strict` invocation on the CPU goes to the journal as its record
//! ([`Journal::call`]): its request and the hash of its answer, which
//! recovery runs again on its instance as of the instance's last exact
//! frame, checking each answer; a replay that answers otherwise falls
//! back to that frame. Other `strict` invocations wait for a synced frame
//! that covers them: the journal's committer (`Journal::commit`) takes
//! the instances waited for, writes one frame of each, and asks for a
//! sync. Syncs run on the journal's own threads, two at most, each of the
//! frames written since the one before it, answered in the order they
//! started (`Journal::request_sync`): a burst of invocations costs one
//! write and one `fdatasync` (group commit), and no invocation waits for
//! the disk while it holds its instance. Zeros written ahead of the
//! frames (`Journal::zero_ahead`) spare a sync the blocks' allocation.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tensor_wasm_kernels::Backend;
use tensor_wasm_shared::api::{Durability, JobInfo, JobStatus};
use tensor_wasm_shared::snapshot::stream::{
    END_LEN, Reader, Record, STREAM_HEADER_LEN, StreamKind, Writer, end_checksum, end_record,
};
use tensor_wasm_shared::{ApiError, ErrorCode, TenantId};

use crate::body::RequestBody;
use crate::error::ExecError;
use crate::inbound::Inbound;
use crate::instance::{InstanceShared, Response, WarmInstance};
use crate::metrics::JournalMetrics;
use crate::outbound::{Named, RoundStats, Sent, write_instance};
use crate::registry::Registry;
use crate::state::{Function, Tenant};
use crate::sync::lock;
use crate::tracking::PageTracking;

/// Folder of the state directory that holds the journals.
pub const DURABLE_DIR: &str = "durable";

const MAGIC: &[u8; 4] = b"TWJ1";
const HEADER: usize = 32;
/// The smallest payload: a stream's header and its End.
const MIN_PAYLOAD: u64 = (STREAM_HEADER_LEN + END_LEN) as u64;
/// The frame is a fresh copy of its instance.
const FRESH: u32 = 1;
/// The instance went (a trap, a deadline): recovery drops it. With
/// [`JOB`]: the job was cancelled or forgotten.
const GONE: u32 = 2;
/// A job's record (and its request while it waits): the latest frame of a
/// job is what recovery puts back.
const JOB: u32 = 4;
/// Read while the instance ran: torn until an exact frame of the same
/// instance follows, and ignored by recovery when none does.
const RACY: u32 = 8;
/// A `strict` call's record, not a copy of state: the request its
/// instance answered and a hash of the answer, which recovery runs again
/// on the instance as of its last exact frame ([`Journal::call`]).
const CALL: u32 = 16;

/// Largest request a call's record carries: 64 KiB. A larger one leaves
/// its call to a frame of what it changed.
pub const MAX_CALL_REQUEST: usize = 64 << 10;

/// Largest answer (its outputs' bytes) a call's record is taken for:
/// 1 MiB. Hashing it reads it back once more.
pub const MAX_CALL_ANSWER: u64 = 1 << 20;

/// Longest an instance's calls go as records after its last exact frame:
/// its function's `checkpoint_ms`, and 10 s at most (a function may ask
/// for an hour). A call past it takes a frame, which starts the chain
/// again, so that recovery runs at most this much of an instance's
/// calls again.
const MAX_REPLAY_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest frame read back: 8 GiB, as a snapshot.
const MAX_FRAME: u64 = crate::snapshot::MAX_SNAPSHOT_BYTES;

/// A generation's journal grows to at least this before it rolls: 64 MiB.
const MIN_ROLL_BYTES: u64 = 64 << 20;

/// How long a waiter for the disk waits before it looks again, should
/// the wake it waits for not come: 10 ms.
const RECHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// Bytes written to the file at once: 1 MiB.
const WRITE_BUFFER: usize = 1 << 20;

/// Zeros kept written ahead of a journal's frames: 4 MiB.
const ZERO_AHEAD: u64 = 4 << 20;

/// Syncs of one journal under way at once: 2. Two syncs of a file zeroed
/// ahead overlap on the disk (1.55× the syncs a second of one at a time,
/// measured on ext4 over virtio); a third added none, and made calls
/// wait longer.
const SYNCS_IN_FLIGHT: usize = 2;

/// A journal's syncer threads.
#[derive(Debug, Default)]
struct Syncers {
    /// A sync was asked for that no thread has taken up yet.
    wanted: bool,
    /// Threads running.
    threads: usize,
    /// Of those, the ones waiting for a sync to be asked for.
    idle: usize,
    /// Idle threads woken for a sync that have not run yet: the first of
    /// them to run takes what was asked for meanwhile too, so that a
    /// burst of asks wakes one thread, not every idle one.
    woken: usize,
}

/// How long a syncer thread waits for work before it ends: 1 s.
const SYNCER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The syncs of a journal, in the order they started: each is answered
/// once every one before it was.
#[derive(Debug, Default)]
struct Order {
    /// Syncs started.
    started: u64,
    /// Syncs answered: the next to answer is this one.
    answered: u64,
    /// Syncs that ended before their turn, by their place.
    done: std::collections::BTreeMap<u64, (Batch, std::io::Result<()>)>,
}

/// Frames written to the file for one sync.
#[derive(Debug)]
struct Batch {
    /// Its place in the order the syncs started.
    seq: u64,
    /// It covers the frames up to this one.
    upto: u64,
    file: Option<Arc<File>>,
    /// Where its bytes begin in the file.
    at: u64,
    /// How writing them went.
    written: std::io::Result<()>,
}

/// What the journal has of one instance.
#[derive(Debug)]
struct Capture {
    /// The id its frames carry (kept across restarts).
    jid: u64,
    sent: Sent,
    /// The generation of its last fresh copy.
    based: u64,
    /// Bytes of that copy.
    fresh_bytes: u64,
    /// Its invocation count at its last exact frame.
    invocations: u64,
    at: Instant,
    /// The invocation count up to which its last exact frame and the call
    /// records after it hold every invocation, with the log's
    /// `fresh_from` then (a loss since breaks the chain): a call may go to
    /// the journal as its record only when it is the next
    /// ([`Journal::call`]).
    chain: Option<(u64, u64)>,
}

/// The file frames go to.
#[derive(Debug)]
struct Log {
    /// The journal's folder: a staged journal's moves when it takes the
    /// place of the tenant's ([`Journal::take_place`]).
    dir: PathBuf,
    /// Replaced by a staged journal: it writes no more.
    closed: bool,
    generation: u64,
    file: Option<Arc<File>>,
    /// Bytes of the generation's file, `buf` included.
    bytes: u64,
    /// Bytes written to the file: `buf` goes there next.
    flushed: u64,
    /// The file's length: its frames, then zeros written and synced ahead
    /// of them ([`Journal::zero_ahead`]), so that a sync writes data into
    /// blocks the file has, not the blocks' allocation too.
    zeroed: u64,
    /// Small frames not yet written to the file: the next sync seals and
    /// writes them, so that a frame costs the invocation a copy, not a
    /// hash and a write.
    buf: Vec<u8>,
    /// The payloads in `buf`, as ranges of it: their checksums are filled
    /// in ([`seal_all`]) before `buf` goes to the file.
    unsealed: Vec<std::ops::Range<usize>>,
    /// Frames written, counted from the journal's opening.
    written: u64,
    /// Frames a sync started already covers ([`Journal::take_batch`]).
    taken: u64,
    /// Call records written ([`Journal::call`]): a journal without any
    /// writes no zeros ahead ([`Journal::zero_ahead`]).
    records: u64,
    next_jid: u64,
    /// Generations on disk.
    generations: BTreeSet<u64>,
    /// Every instance whose fresh copy is older than this generation
    /// makes one next, exact frames included: frames were lost, so what
    /// its tracker marked clean may not be on disk.
    fresh_from: u64,
    /// The generation every job's latest record was last written to: the
    /// checkpointer writes them all again after a roll, before the
    /// generations that held them can go.
    jobs_in: u64,
}

/// How far the frames are on disk.
#[derive(Debug, Default)]
struct Synced {
    /// Frames written and synced.
    durable: u64,
    /// A committer runs ([`Journal::commit`]).
    committing: bool,
    /// The last sync failed with this; cleared by the next that works.
    failed: Option<String>,
    /// Frames up to this one were lost to a failed write or sync.
    failed_upto: u64,
    /// Frames written and not yet synced: (frame, instance, the instance's
    /// invocation count the frame covers).
    unsynced: Vec<(u64, u64, u64)>,
    /// By instance: the invocation count its synced frames cover.
    covered: HashMap<u64, u64>,
    /// Who waits for what: each is woken when it has it, so that a sync
    /// wakes the answers it made durable and no others.
    waiters: Vec<Waiter>,
    /// Instances a waiter wants an exact frame of, with their function:
    /// the committer takes each through one of its pool's slots.
    wanted: HashMap<u64, Arc<Function>>,
    /// Of those, the ones the committer found running on another slot:
    /// their holder writes the frame as its invocation ends
    /// ([`Journal::wants`]).
    busy: std::collections::HashSet<u64>,
}

/// An answer waiting for the disk.
#[derive(Debug)]
struct Waiter {
    want: Want,
    /// An error: the frame it wants could not be written.
    wake: tokio::sync::oneshot::Sender<Result<(), String>>,
}

#[derive(Debug, Clone, Copy)]
enum Want {
    /// Frame `n` synced (or lost).
    Frame(u64),
    /// A synced frame of `instance` covering its first `count`
    /// invocations (or the instance gone).
    Covered { instance: u64, count: u64 },
}

impl Synced {
    /// Registers a waiter for `want`.
    fn wait(&mut self, want: Want) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
        let (wake, rx) = tokio::sync::oneshot::channel();
        self.waiters.push(Waiter { want, wake });
        rx
    }

    /// Whether `want` is met: on disk, lost, or (an instance's) gone.
    fn has(&self, want: Want) -> bool {
        match want {
            Want::Frame(n) => n <= self.durable || n <= self.failed_upto,
            Want::Covered { instance, count } => {
                self.covered.get(&instance).is_some_and(|&c| c >= count)
            }
        }
    }

    /// Fails every waiter for a frame of `instance`: it could not be
    /// written.
    fn refuse(&mut self, instance: u64, error: &str) {
        let mut i = 0;
        while i < self.waiters.len() {
            match self.waiters[i].want {
                Want::Covered { instance: w, .. } if w == instance => {
                    let _ = self
                        .waiters
                        .swap_remove(i)
                        .wake
                        .send(Err(error.to_string()));
                }
                _ => i += 1,
            }
        }
    }

    /// Whether a frame written and not yet synced meets `want`.
    fn written(&self, want: Want) -> bool {
        match want {
            Want::Frame(_) => true,
            Want::Covered { instance, count } => self
                .unsynced
                .iter()
                .any(|&(_, i, c)| i == instance && c >= count),
        }
    }

    /// Wakes every waiter that has what it wants; with `lost` (frames
    /// were lost to a failed write or sync), every waiter for an
    /// instance's frame too, with that error: what its invocation did is
    /// not on disk.
    fn wake(&mut self, lost: Option<&str>) {
        let mut i = 0;
        while i < self.waiters.len() {
            let w = &self.waiters[i];
            let answer = match (lost, w.want) {
                (Some(e), Want::Covered { .. }) => Some(Err(e.to_string())),
                _ if w.wake.is_closed() || self.has(w.want) => Some(Ok(())),
                _ => None,
            };
            match answer {
                Some(a) => {
                    let _ = self.waiters.swap_remove(i).wake.send(a);
                }
                None => i += 1,
            }
        }
    }
}

/// One tenant's journal.
pub struct Journal {
    tenant: TenantId,
    tracking: PageTracking,
    /// By the instance's id in this process.
    captures: Mutex<HashMap<u64, Capture>>,
    log: Mutex<Log>,
    synced: Mutex<Synced>,
    /// Wakes an idle committer: a waiter came, or a frame a waiter wanted
    /// was written.
    kick: tokio::sync::Notify,
    /// Zeros are being written ahead of the frames ([`Journal::zero_ahead`]).
    zeroing: std::sync::atomic::AtomicBool,
    /// The syncs under way, in the order they started.
    order: Mutex<Order>,
    /// The syncer threads (`Journal::request_sync`).
    syncers: Mutex<Syncers>,
    /// Wakes an idle syncer thread.
    sync_wanted: std::sync::Condvar,
    /// Held while syncs are answered, so that they are in order.
    publishing: Mutex<()>,
    /// The executor's journal metrics: syncs and bytes written.
    metrics: JournalMetrics,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        for (_, c) in lock(&self.captures).drain() {
            c.sent.stop();
        }
    }
}

/// A frame was taken but not written: the tenant keeps serving, and its
/// instances' next frames are fresh copies in a new generation.
fn io_error(what: &str, e: std::io::Error) -> ExecError {
    ExecError::Checkpoint(format!("{what}: {e}"))
}

/// The folder of `tenant`'s journal.
pub fn journal_dir(state_dir: &Path, tenant: &TenantId) -> PathBuf {
    state_dir.join(DURABLE_DIR).join(tenant.as_str())
}

/// Suffix of a staged journal's folder: the journal of a tenant built
/// beside the one here (a restore, a move onto a tenant here), which
/// takes the place of the tenant's at the commit. Tenant ids hold no dot.
const STAGED: &str = ".staged";

/// Suffix of a replaced journal's folder, between the two renames of
/// [`Journal::take_place`]: alone, it is the tenant's journal still.
const REPLACED: &str = ".replaced";

fn suffixed(state_dir: &Path, tenant: &TenantId, suffix: &str) -> PathBuf {
    state_dir
        .join(DURABLE_DIR)
        .join(format!("{}{suffix}", tenant.as_str()))
}

/// Syncs a folder, so that the names made or renamed in it are on disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn generation_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:08}.journal"))
}

/// The generations in `dir`, in order.
fn generations(dir: &Path) -> BTreeSet<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            name.strip_suffix(".journal")?.parse().ok()
        })
        .collect()
}

impl Journal {
    /// An empty journal of `tenant` under `state_dir` (nothing is written
    /// until its first frame), counted in `metrics`.
    pub fn new(
        state_dir: &Path,
        tenant: TenantId,
        tracking: PageTracking,
        metrics: JournalMetrics,
    ) -> Journal {
        let dir = journal_dir(state_dir, &tenant);
        Journal::in_dir(dir, tenant, tracking, metrics)
    }

    /// An empty journal of `tenant` staged beside the tenant's own (which
    /// stands until [`take_place`](Self::take_place)); what an earlier
    /// staging left there goes.
    pub fn staged(
        state_dir: &Path,
        tenant: TenantId,
        tracking: PageTracking,
        metrics: JournalMetrics,
    ) -> Journal {
        let dir = suffixed(state_dir, &tenant, STAGED);
        if let Err(e) = remove_dir(&dir) {
            tracing::warn!(%tenant, error = %e, "cannot remove an earlier staged journal");
        }
        Journal::in_dir(dir, tenant, tracking, metrics)
    }

    fn in_dir(
        dir: PathBuf,
        tenant: TenantId,
        tracking: PageTracking,
        metrics: JournalMetrics,
    ) -> Journal {
        Journal {
            tenant,
            tracking,
            metrics,
            captures: Mutex::new(HashMap::new()),
            log: Mutex::new(Log {
                dir,
                closed: false,
                generation: 1,
                file: None,
                bytes: 0,
                flushed: 0,
                zeroed: 0,
                buf: Vec::new(),
                unsealed: Vec::new(),
                written: 0,
                taken: 0,
                records: 0,
                next_jid: 1,
                generations: BTreeSet::new(),
                fresh_from: 0,
                // A tenant that arrives with jobs (a move, an import) has
                // them written at the first pass.
                jobs_in: 0,
            }),
            synced: Mutex::new(Synced::default()),
            kick: tokio::sync::Notify::new(),
            zeroing: std::sync::atomic::AtomicBool::new(false),
            order: Mutex::new(Order::default()),
            syncers: Mutex::new(Syncers::default()),
            sync_wanted: std::sync::Condvar::new(),
            publishing: Mutex::new(()),
        }
    }

    /// Writes a frame of `inst` (held by the caller) of function `f`: what
    /// changed since its last frame, or all of it. Returns the frame's
    /// number for [`durable`](Self::durable). Blocking.
    pub fn capture(&self, inst: &mut WarmInstance, f: &Function) -> Result<u64, ExecError> {
        let shared = inst.shared().clone();
        let globals = inst
            .globals(&f.mutable_globals)
            .map_err(|e| ExecError::Internal(format!("instance {}: {e}", shared.id)))?;
        self.write_capture(&shared, Some(globals), f)
    }

    /// Writes a frame of `shared` read while it may run (no globals, which
    /// only the instance's holder can read): what changed, or all of it
    /// when it has no fresh copy in this generation. Torn as it may be, it
    /// takes the bulk of the copy out of the instance's way: the exact
    /// frame that must follow ([`capture`](Self::capture)) carries only
    /// what was written meanwhile. Blocking.
    pub fn precopy(&self, shared: &Arc<InstanceShared>, f: &Function) -> Result<u64, ExecError> {
        self.write_capture(shared, None, f)
    }

    /// Whether `shared` has frames in this journal: a `strict` invocation
    /// of one that has none leaves its first to [`covered`](Self::covered),
    /// which copies the bulk while the instance runs.
    pub fn has_capture(&self, shared: &InstanceShared) -> bool {
        lock(&self.captures).contains_key(&shared.id)
    }

    /// A frame of `shared`, exact when `globals` (read by the instance's
    /// holder) are given, racy otherwise.
    fn write_capture(
        &self,
        shared: &Arc<InstanceShared>,
        globals: Option<Vec<tensor_wasm_shared::snapshot::GlobalSnapshot>>,
        f: &Function,
    ) -> Result<u64, ExecError> {
        let exact = globals.is_some();
        let size =
            shared.memory.region().map(|r| r.size).ok_or_else(|| {
                ExecError::Internal("a checkpoint of an instance that went".into())
            })?;
        let mut captures = lock(&self.captures);
        let mut log = lock(&self.log);
        let generation = log.generation;
        let entry = captures.entry(shared.id);
        let capture = entry.or_insert_with(|| {
            let jid = log.next_jid;
            log.next_jid += 1;
            Capture {
                jid,
                sent: Sent::new(shared.clone(), &self.tracking),
                based: 0,
                fresh_bytes: 0,
                invocations: 0,
                at: Instant::now(),
                chain: None,
            }
        });
        // An exact frame is a fresh copy only of an instance with none
        // (or after a loss): after a roll, the checkpointer's racy frame
        // makes the bulk of the new generation's copy, so that whoever
        // holds the instance copies only what changed.
        let fresh = capture.based < log.fresh_from
            || if exact {
                capture.based == 0
            } else {
                capture.based < generation
            };
        if fresh && capture.based != 0 {
            // A new generation: the copy starts over from nothing.
            let sent =
                std::mem::replace(&mut capture.sent, Sent::new(shared.clone(), &self.tracking));
            sent.stop();
        }
        let backend = f.setup.backend.clone();
        let flags = if fresh { FRESH } else { 0 } | if exact { 0 } else { RACY };
        let written = self.write_frame(&mut log, capture.jid, flags, |w| {
            let mut stats = RoundStats::default();
            let mut scratch = Vec::new();
            write_instance(
                w,
                &mut capture.sent,
                Named {
                    id: capture.jid,
                    function: &f.info.id,
                    size,
                    fresh,
                },
                &mut scratch,
                backend.as_ref(),
                &mut stats,
            )?;
            if let Some(globals) = globals {
                w.record(&Record::Globals {
                    instance: capture.jid,
                    globals,
                })?;
            }
            Ok(())
        });
        match written {
            Ok((n, bytes)) => {
                if fresh {
                    capture.based = generation;
                    capture.fresh_bytes = bytes;
                }
                if exact {
                    capture.invocations = shared
                        .invocations
                        .load(std::sync::atomic::Ordering::Relaxed);
                    capture.at = Instant::now();
                    capture.chain = Some((capture.invocations, log.fresh_from));
                    let mut s = lock(&self.synced);
                    s.unsynced.push((n, shared.id, capture.invocations));
                    if s.busy.remove(&shared.id) {
                        self.kick.notify_one();
                    }
                }
                self.roll_if_full(&captures, &mut log);
                Ok(n)
            }
            Err(e) => {
                // What the tracker marked clean never reached the disk:
                // every instance starts over in a new generation.
                self.roll(&mut log, true);
                Err(e)
            }
        }
    }

    /// Starts a new generation once the file holds twice what fresh
    /// copies of its instances (`captures`) take, 64 MiB at least.
    fn roll_if_full(&self, captures: &HashMap<u64, Capture>, log: &mut Log) {
        let fresh_total: u64 = captures.values().map(|c| c.fresh_bytes).sum();
        if log.bytes > MIN_ROLL_BYTES.max(2 * fresh_total) {
            self.roll(log, false);
        }
    }

    /// Whether a `strict` call that made `shared`'s invocation count
    /// `count` may go to the journal as its record: the instance has an
    /// exact frame, and every invocation since is in a record after it.
    pub fn chains(&self, shared: &InstanceShared, count: u64) -> bool {
        let fresh_from = lock(&self.log).fresh_from;
        lock(&self.captures)
            .get(&shared.id)
            .is_some_and(|c| c.chain == Some((count - 1, fresh_from)))
    }

    /// Writes the record of a `strict` call that `shared` (of function
    /// `f`, held by the caller) just answered, as its invocation `count`:
    /// its `request` and the XXH3-128 of its `answer`. Recovery runs it
    /// again on the instance as of its last exact frame, and every call
    /// after it in order, and checks each answer (`ARCHITECTURE.md`,
    /// "Durable state"). So a call that writes more than its request
    /// costs the disk its request, not its writes. `None` when the call
    /// cannot go as a record (see [`chains`](Self::chains)): it is left to
    /// a frame, and so is a call past `MAX_REPLAY_WINDOW` (10 s) of its
    /// instance's last exact frame. Returns the frame's number for
    /// [`durable`](Self::durable). Blocking.
    pub fn call(
        &self,
        shared: &InstanceShared,
        f: &Function,
        count: u64,
        request: &RequestBody,
        answer: u128,
    ) -> Option<Result<u64, ExecError>> {
        let record = CallRecord {
            function: f.info.id.to_string(),
            answer: format!("{answer:032x}"),
        };
        let info_json = serde_json::to_string(&record).ok()?;
        let mut captures = lock(&self.captures);
        let mut log = lock(&self.log);
        let capture = captures.get_mut(&shared.id)?;
        if capture.chain != Some((count - 1, log.fresh_from))
            || capture.at.elapsed() > f.config.checkpoint.min(MAX_REPLAY_WINDOW)
        {
            return None;
        }
        let written = self.write_frame(&mut log, capture.jid, CALL, |w| {
            w.record(&Record::Job {
                info_json,
                content_type: request.content_type.clone(),
                body: Some(request.body.len() as u64),
            })?;
            w.data(&request.body)
        });
        Some(match written {
            Ok((n, _)) => {
                capture.chain = Some((count, log.fresh_from));
                log.records += 1;
                self.roll_if_full(&captures, &mut log);
                Ok(n)
            }
            Err(e) => {
                self.roll(&mut log, true);
                Err(e)
            }
        })
    }

    /// Records that instance `shared` went, so that recovery drops it.
    pub fn gone(&self, shared: &InstanceShared) {
        let Some(c) = lock(&self.captures).remove(&shared.id) else {
            return;
        };
        c.sent.stop();
        let mut log = lock(&self.log);
        if let Err(e) = self.write_frame(&mut log, c.jid, GONE, |w| {
            w.record(&Record::Gone { instance: c.jid })
        }) {
            tracing::warn!(tenant = %self.tenant, error = %e, "cannot journal an instance that went");
            self.roll(&mut log, true);
        }
    }

    /// Starts a new generation, in which every instance is to make a
    /// fresh copy: its next racy frame, or, after frames were `lost`, its
    /// next frame. The old file gets its frames and a sync first (the
    /// syncs that follow are of the new one).
    fn roll(&self, log: &mut Log, mut lost: bool) {
        if let Some(file) = log.file.take() {
            let buf = log.take_buf();
            // The zeros ahead go: the file ends with its last frame.
            let synced = file
                .write_all_at(&buf, log.flushed)
                .and_then(|()| match log.zeroed > log.bytes {
                    true => file.set_len(log.bytes),
                    false => Ok(()),
                })
                .and_then(|()| file.sync_data());
            if let Err(e) = synced {
                self.lost(log.written, &format!("writing a journal: {e}"));
                let _ = file.set_len(log.flushed);
                lost = true;
            }
        }
        log.buf.clear();
        log.unsealed.clear();
        log.generation += 1;
        if lost {
            log.fresh_from = log.generation;
        }
        log.bytes = 0;
        log.flushed = 0;
        log.zeroed = 0;
    }

    /// Frames up to `upto` never reached the disk: their waiters are
    /// answered with `msg`.
    fn lost(&self, upto: u64, msg: &str) {
        let mut s = lock(&self.synced);
        s.failed = Some(msg.to_string());
        s.failed_upto = s.failed_upto.max(upto);
        s.unsynced.retain(|&(n, _, _)| n > upto);
        s.wake(Some(msg));
    }

    /// Writes one frame whose payload `body` writes; returns its number
    /// and the payload's bytes. On failure the file is cut back to where
    /// the frame began.
    fn write_frame(
        &self,
        log: &mut Log,
        jid: u64,
        flags: u32,
        body: impl FnOnce(&mut Writer<&mut Tee<'_>>) -> std::io::Result<()>,
    ) -> Result<(u64, u64), ExecError> {
        if log.closed {
            return Err(ExecError::Checkpoint(
                "the tenant's state was replaced meanwhile".into(),
            ));
        }
        let file = match &log.file {
            Some(f) => f.clone(),
            None => {
                let made = !log.dir.exists();
                std::fs::create_dir_all(&log.dir)
                    .map_err(|e| io_error("creating the journal's folder", e))?;
                let path = generation_path(&log.dir, log.generation);
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_error("opening the journal", e))?;
                log.bytes = f
                    .metadata()
                    .map_err(|e| io_error("reading the journal's size", e))?
                    .len();
                log.flushed = log.bytes;
                log.zeroed = log.bytes;
                // The file's name (and its folder's) must outlive a crash
                // as its frames do: once per generation.
                sync_dir(&log.dir)
                    .and_then(|()| match (made, log.dir.parent()) {
                        (true, Some(root)) => sync_dir(root),
                        _ => Ok(()),
                    })
                    .map_err(|e| io_error("syncing the journal's folder", e))?;
                let f = Arc::new(f);
                log.file = Some(f.clone());
                log.generations.insert(log.generation);
                f
            }
        };
        let start = log.bytes;
        let result = (|| -> std::io::Result<u64> {
            let mut tee = Tee {
                file: &file,
                at: start + HEADER as u64,
                buf: Vec::new(),
                spilled: false,
                hasher: blake3::Hasher::new(),
                len: 0,
            };
            {
                let mut w = Writer::unsealed(&mut tee)?;
                w.record(&Record::Tenant {
                    tenant: self.tenant.to_string(),
                    kind: StreamKind::Round,
                })?;
                body(&mut w)?;
                w.finish_unsealed()?;
            }
            let len = tee.len + END_LEN as u64;
            let header = header(flags, jid, len);
            if tee.spilled {
                // The payload went out as it came, hashed as it went; the
                // header goes last, so the frame is valid only once whole.
                tee.spill()?;
                let end = end_record(tee.hasher.finalize().as_bytes());
                file.write_all_at(&end, tee.at)?;
                file.write_all_at(&header, start)?;
            } else {
                // A small frame: sealed and written with the next sync (or
                // now, when the frames waiting pass the buffer), at once,
                // its checksum covering a tear.
                debug_assert_eq!(log.flushed + log.buf.len() as u64, start);
                log.buf.extend_from_slice(&header);
                let payload = log.buf.len();
                log.buf.extend_from_slice(&tee.buf);
                log.buf.extend_from_slice(&end_record(&[0; 32]));
                let end = log.buf.len();
                log.unsealed.push(payload..end);
                if log.buf.len() > 4 * WRITE_BUFFER {
                    let buf = log.take_buf();
                    file.write_all_at(&buf, log.flushed)?;
                    log.flushed += buf.len() as u64;
                }
            }
            Ok(len)
        })();
        match result {
            Ok(len) => {
                self.metrics.written_bytes.inc_by(HEADER as u64 + len);
                log.bytes = start + HEADER as u64 + len;
                if log.buf.is_empty() {
                    log.flushed = log.bytes;
                }
                log.written += 1;
                Ok((log.written, len))
            }
            Err(e) => {
                // The frames before it that were waiting in the buffer are
                // lost with it: a new generation starts over.
                if let Err(cut) = file.set_len(log.flushed) {
                    tracing::error!(tenant = %self.tenant, error = %cut, "cannot cut a failed frame off the journal");
                }
                log.buf.clear();
                log.unsealed.clear();
                log.bytes = log.flushed;
                let e = io_error("writing a checkpoint", e);
                self.lost(log.written, &e.to_string());
                Err(e)
            }
        }
    }

    /// Writes the frames waiting in the buffer to the file for a sync,
    /// under the log's lock, so that frames reach the file in order; sealed
    /// here, not by the invocations that took them while holding their
    /// instances. `None` when no frame came since the last batch.
    fn take_batch(&self) -> Option<Batch> {
        let mut log = lock(&self.log);
        if log.written <= log.taken && log.buf.is_empty() {
            return None;
        }
        log.taken = log.written;
        let buf = log.take_buf();
        let at = log.flushed;
        log.flushed += buf.len() as u64;
        let file = log.file.clone();
        let seq = {
            let mut order = lock(&self.order);
            order.started += 1;
            order.started - 1
        };
        let written = match &file {
            Some(f) if !buf.is_empty() => f.write_all_at(&buf, at),
            _ => Ok(()),
        };
        Some(Batch {
            seq,
            upto: log.written,
            file,
            at,
            written,
        })
    }

    /// Answers the frames of `batch`, whose sync gave `synced`, once every
    /// sync started before it was answered: durable, or lost with the
    /// file from where it began (its instances start over in a new
    /// generation, and every frame written so far is lost with it).
    fn publish(&self, batch: &Batch, synced: std::io::Result<()>) -> Result<(), ExecError> {
        let handled = batch.upto <= lock(&self.synced).failed_upto;
        if let Err(e) = &synced
            && !handled
        {
            let mut log = lock(&self.log);
            let msg = format!("syncing the journal: {e}");
            let upto = log.written;
            let current =
                matches!((&batch.file, &log.file), (Some(b), Some(l)) if Arc::ptr_eq(b, l));
            if current {
                if let Some(f) = log.file.take()
                    && let Err(cut) = f.set_len(batch.at)
                {
                    tracing::error!(tenant = %self.tenant, error = %cut, "cannot cut lost frames off the journal");
                }
                log.buf.clear();
                log.unsealed.clear();
            }
            self.roll(&mut log, true);
            drop(log);
            self.lost(upto, &msg);
        }
        // A journal replaced meanwhile ([`take_place`](Self::take_place))
        // lost these frames with its folder: they are not answered as
        // durable (the log's lock, taken first, orders this with that).
        let log = lock(&self.log);
        let synced = match synced {
            Ok(()) if log.closed => Err(std::io::Error::other(
                "the tenant's state was replaced meanwhile",
            )),
            other => other,
        };
        let mut s = lock(&self.synced);
        drop(log);
        let out = match synced {
            // Unless an earlier sync's failure lost its frames.
            Ok(()) if batch.upto > s.failed_upto => {
                let upto = batch.upto;
                s.durable = s.durable.max(upto);
                s.failed = None;
                let (done, left): (Vec<_>, Vec<_>) =
                    s.unsynced.drain(..).partition(|&(n, _, _)| n <= upto);
                s.unsynced = left;
                for (_, instance, count) in done {
                    let c = s.covered.entry(instance).or_insert(0);
                    *c = (*c).max(count);
                }
                Ok(())
            }
            Ok(()) => Ok(()),
            Err(e) => Err(ExecError::Checkpoint(format!("syncing the journal: {e}"))),
        };
        s.wake(None);
        out
    }

    /// Writes zeros past the journal's frames, and syncs them, once fewer
    /// than a quarter of [`ZERO_AHEAD`] are left, in a journal that takes
    /// call records: the syncs of the frames that go there then write data
    /// only, into blocks the file has, and take about two thirds as long
    /// as an append's (measured on ext4). Only there, because call records
    /// are what waits for these syncs; a migration's destination syncs its
    /// last round inside the tenant's pause, and that sync would carry
    /// zeros written just before. Recovery reads zeros after the last
    /// frame as the journal's end ([`scan`]). A full disk leaves the file
    /// as it was. Blocking, on a syncer thread once its sync was answered.
    fn zero_ahead(&self) {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let file = {
            let mut log = lock(&self.log);
            let Some(file) = log.file.clone() else { return };
            if log.closed || log.records == 0 || log.zeroed >= log.bytes + ZERO_AHEAD / 4 {
                return;
            }
            // Under the log's lock: no frame is written meanwhile.
            let from = log.zeroed.max(log.bytes);
            let mut at = from;
            let written = loop {
                if at >= from + ZERO_AHEAD {
                    break Ok(());
                }
                if let Err(e) = file.write_all_at(&ZEROS, at) {
                    break Err(e);
                }
                at += ZEROS.len() as u64;
            };
            if let Err(e) = written {
                tracing::debug!(tenant = %self.tenant, error = %e, "cannot write zeros ahead of the journal");
                if let Err(e) = file.set_len(from) {
                    tracing::warn!(tenant = %self.tenant, error = %e, "cannot cut zeros off the journal");
                }
                return;
            }
            log.zeroed = at;
            self.metrics.written_bytes.inc_by(at - from);
            file
        };
        if let Err(e) = file.sync_data() {
            tracing::debug!(tenant = %self.tenant, error = %e, "cannot sync the zeros ahead of the journal");
        }
    }

    /// Writes the record of job `info` (with its waiting request, if
    /// any); returns the frame's number for [`durable`](Self::durable).
    /// Blocking.
    pub fn job(&self, info: &JobInfo, request: Option<&RequestBody>) -> Result<u64, ExecError> {
        self.job_frame(JOB, info, request)
    }

    /// Writes that job `info` was cancelled or forgotten. Blocking.
    pub fn job_gone(&self, info: &JobInfo) -> Result<u64, ExecError> {
        self.job_frame(JOB | GONE, info, None)
    }

    fn job_frame(
        &self,
        flags: u32,
        info: &JobInfo,
        request: Option<&RequestBody>,
    ) -> Result<u64, ExecError> {
        self.job_frame_in(&mut lock(&self.log), flags, info, request)
    }

    fn job_frame_in(
        &self,
        log: &mut Log,
        flags: u32,
        info: &JobInfo,
        request: Option<&RequestBody>,
    ) -> Result<u64, ExecError> {
        let info_json =
            serde_json::to_string(info).map_err(|e| ExecError::Internal(e.to_string()))?;
        let (n, _) = self.write_frame(log, 0, flags, |w| {
            w.record(&Record::Job {
                info_json: info_json.clone(),
                content_type: request.and_then(|r| r.content_type.clone()),
                body: request.map(|r| r.body.len() as u64),
            })?;
            if let Some(r) = request {
                w.data(&r.body)?;
            }
            Ok(())
        })?;
        Ok(n)
    }

    /// Whether the jobs' records are to be written again (a new
    /// generation started since they last were).
    pub fn jobs_stale(&self) -> bool {
        let log = lock(&self.log);
        log.jobs_in < log.generation
    }

    /// Writes every job's record again, into the current generation: the
    /// records `jobs` gives, read while this journal takes no other frame.
    /// Blocking.
    ///
    /// `jobs` must give each job as its latest frame has it, or newer
    /// (`JobTable::journal_records`). It is read and written under one hold
    /// of the journal's lock, so no frame of a job can come between the
    /// read and the write of its record, to be buried under an older one:
    /// a job's own frames come either before the read, which then sees what
    /// they hold, or after the rewrite, and win on replay.
    pub fn rewrite_jobs(
        &self,
        jobs: impl FnOnce() -> Vec<(JobInfo, Option<RequestBody>)>,
    ) -> Result<(), ExecError> {
        let mut log = lock(&self.log);
        let generation = log.generation;
        for (info, request) in jobs() {
            self.job_frame_in(&mut log, JOB, &info, request.as_ref())?;
        }
        if log.generation == generation {
            log.jobs_in = generation;
        }
        Ok(())
    }

    /// Makes this staged journal ([`staged`](Self::staged)) the tenant's,
    /// in place of `old` (the journal of the tenant it replaces, if it
    /// has one open), which writes no more: what `old` had not synced is
    /// lost with the state it was of, and its waiters are told so. The
    /// folders swap by two renames; a crash between them leaves the old
    /// journal aside, where recovery finds it ([`settle_swaps`]). A
    /// failure leaves both as they were. Blocking.
    pub fn take_place(&self, state_dir: &Path, old: Option<&Journal>) -> Result<(), ExecError> {
        let main = journal_dir(state_dir, &self.tenant);
        let aside = suffixed(state_dir, &self.tenant, REPLACED);
        // The old journal waits: nothing of it is written while its
        // folder moves.
        let mut old_log = old.map(|j| lock(&j.log));
        let mut log = lock(&self.log);
        if log.dir == main {
            return Ok(());
        }
        remove_dir(&aside).map_err(|e| io_error("removing a replaced journal", e))?;
        let moved_aside = match std::fs::rename(&main, &aside) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_error("setting the replaced journal aside", e)),
        };
        match std::fs::rename(&log.dir, &main) {
            Ok(()) => {}
            // Nothing was staged (no journaled function): the tenant's
            // journal starts empty.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                if moved_aside {
                    let _ = std::fs::rename(&aside, &main);
                }
                return Err(io_error("putting a staged journal in place", e));
            }
        }
        log.dir = main;
        if let Err(e) = sync_dir(&state_dir.join(DURABLE_DIR)) {
            tracing::warn!(tenant = %self.tenant, error = %e, "cannot sync the journals' folder after a swap");
        }
        drop(log);
        if let (Some(old), Some(old_log)) = (old, old_log.as_mut()) {
            old_log.closed = true;
            old_log.file = None;
            old_log.buf.clear();
            old_log.unsealed.clear();
            old.lost(old_log.written, "the tenant's state was replaced meanwhile");
        }
        drop(old_log);
        if let Err(e) = remove_dir(&aside) {
            tracing::warn!(tenant = %self.tenant, error = %e, "cannot remove a replaced journal");
        }
        Ok(())
    }

    /// Whether the committer wants an exact frame of `shared` from its
    /// holder, having found it running on another of its pool's slots: a
    /// `strict` invocation that ends on it writes one before its instance
    /// goes back (others leave theirs to the committer).
    pub fn wants(&self, shared: &InstanceShared) -> bool {
        lock(&self.synced).busy.contains(&shared.id)
    }

    /// Registers a waiter for `want` (a frame of an instance of `f`, if
    /// given) and makes sure a committer runs.
    fn wait(
        self: &Arc<Self>,
        mut s: std::sync::MutexGuard<'_, Synced>,
        want: Want,
        f: Option<&Arc<Function>>,
    ) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
        if let (Some(f), Want::Covered { instance, .. }) = (f, want) {
            s.wanted.insert(instance, f.clone());
        }
        let rx = s.wait(want);
        match want {
            // A frame written: a sync serves it.
            Want::Frame(_) => {
                drop(s);
                self.request_sync();
            }
            // A frame to take first: the committer's.
            Want::Covered { .. } if !s.committing => {
                s.committing = true;
                tokio::spawn(self.clone().commit());
            }
            Want::Covered { .. } => self.kick.notify_one(),
        }
        rx
    }

    /// Asks for a sync of every frame written so far: an idle syncer
    /// thread of this journal takes them, or, with none idle, one is
    /// started (up to [`SYNCS_IN_FLIGHT`]); with all of them busy, the
    /// first to end takes them. The syncs run on threads of their own, so
    /// that a busy runtime does not keep a sync from starting, nor its
    /// answer from going out.
    fn request_sync(self: &Arc<Self>) {
        let mut st = lock(&self.syncers);
        st.wanted = true;
        if st.woken > 0 {
            return;
        }
        if st.idle > 0 {
            st.woken += 1;
            self.sync_wanted.notify_one();
            return;
        }
        if st.threads >= SYNCS_IN_FLIGHT {
            return;
        }
        st.threads += 1;
        drop(st);
        let journal = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tw-journal-sync".into())
            .spawn(move || journal.syncer());
        if let Err(e) = spawned {
            tracing::error!(tenant = %self.tenant, error = %e, "cannot start a journal sync thread");
            lock(&self.syncers).threads -= 1;
        }
    }

    /// A syncer thread: while syncs are asked for, takes what was written
    /// since the last batch ([`take_batch`](Self::take_batch)) and syncs it
    /// ([`sync_batch`](Self::sync_batch)); ends once none was asked for in
    /// [`SYNCER_IDLE`].
    fn syncer(self: Arc<Self>) {
        loop {
            {
                let mut st = lock(&self.syncers);
                while !st.wanted {
                    st.idle += 1;
                    let (next, waited) = self
                        .sync_wanted
                        .wait_timeout(st, SYNCER_IDLE)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    st = next;
                    st.idle -= 1;
                    st.woken = st.woken.saturating_sub(1);
                    if waited.timed_out() && !st.wanted {
                        st.threads -= 1;
                        return;
                    }
                }
                st.wanted = false;
            }
            if let Some(batch) = self.take_batch() {
                self.sync_batch(batch);
            }
        }
    }

    /// Waits, without holding a thread, until frame `n` is on disk.
    pub async fn durable(self: &Arc<Self>, n: u64) -> Result<(), ExecError> {
        loop {
            let woken = {
                let s = lock(&self.synced);
                if s.durable >= n {
                    return Ok(());
                }
                if n <= s.failed_upto {
                    return Err(ExecError::Checkpoint(s.failed.clone().unwrap_or_default()));
                }
                self.wait(s, Want::Frame(n), None)
            };
            // Woken once it is on disk (or lost); a look now and then in
            // case the committer went.
            let _ = tokio::time::timeout(RECHECK, woken).await;
        }
    }

    /// Waits until a synced frame covers the first `count` invocations of
    /// `shared` (of function `f`), whose invocation left its frame to the
    /// committer: one frame and one sync then answer every invocation
    /// that ended meanwhile (`ARCHITECTURE.md`, "Durable state").
    pub async fn covered(
        self: &Arc<Self>,
        f: &Arc<Function>,
        shared: &Arc<InstanceShared>,
        count: u64,
    ) -> Result<(), ExecError> {
        let want = Want::Covered {
            instance: shared.id,
            count,
        };
        loop {
            let woken = {
                let s = lock(&self.synced);
                if s.has(want) {
                    return Ok(());
                }
                self.wait(s, want, Some(f))
            };
            if let Ok(Ok(Err(e))) = tokio::time::timeout(RECHECK, woken).await {
                return Err(ExecError::Checkpoint(e));
            }
        }
    }

    /// The committer: while anyone waits for a frame of an instance,
    /// writes an exact frame of every instance a waiter wants (taken
    /// through one of its pool's slots, as the checkpointer does, after a
    /// racy copy of the bulk if it has no frame yet) and asks for a sync
    /// ([`request_sync`](Self::request_sync)), whose answer wakes the
    /// waiters. One frame and one sync serve every invocation that ended
    /// meanwhile: a `strict` function's calls cost the disk once per batch
    /// (group commit), and its instance never waits for the disk.
    async fn commit(self: Arc<Self>) {
        // However it ends (a panic), a later waiter starts another.
        struct Done<'a>(&'a Journal, bool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                if self.1 {
                    lock(&self.0.synced).committing = false;
                }
            }
        }
        let mut done = Done(&self, true);
        loop {
            let wanted: Vec<(u64, Arc<Function>)> = {
                let mut s = lock(&self.synced);
                s.wake(None);
                if !s
                    .waiters
                    .iter()
                    .any(|w| matches!(w.want, Want::Covered { .. }))
                {
                    // Decided under the lock: a waiter that comes next
                    // starts another committer.
                    s.wanted.clear();
                    s.busy.clear();
                    s.committing = false;
                    done.1 = false;
                    return;
                }
                let need: std::collections::HashSet<u64> = s
                    .waiters
                    .iter()
                    .filter_map(|w| match w.want {
                        Want::Covered { instance, .. } if !s.written(w.want) => Some(instance),
                        _ => None,
                    })
                    .collect();
                let Synced { wanted, busy, .. } = &mut *s;
                wanted.retain(|id, _| need.contains(id));
                busy.retain(|id| need.contains(id));
                wanted
                    .iter()
                    .filter(|(id, _)| !busy.contains(id))
                    .map(|(id, f)| (*id, f.clone()))
                    .collect()
            };
            if !wanted.is_empty() {
                self.clone().capture_wanted(wanted).await;
            }
            // The frames written (here, or by the holders of instances
            // found busy) go to disk with the next sync.
            if lock(&self.log).written > lock(&self.synced).durable {
                self.request_sync();
            }
            // A sync answers (it kicks), or a waiter comes. What is wanted
            // and runs on other slots is written by its holder: should
            // that not come (its invocation failed), look again.
            if tokio::time::timeout(RECHECK, self.kick.notified())
                .await
                .is_err()
            {
                lock(&self.synced).busy.clear();
            }
        }
    }

    /// Takes each of `wanted` (idle instances a waiter wants a frame of)
    /// through one of its pool's slots and writes an exact frame of it,
    /// after a racy copy of its bulk when it has no frame yet.
    async fn capture_wanted(self: Arc<Self>, wanted: Vec<(u64, Arc<Function>)>) {
        // By function: one slot of each takes all its idle instances.
        let mut by_function: Vec<(Arc<Function>, Vec<u64>)> = Vec::new();
        for (id, f) in wanted {
            let Some(shared) = f.pool.live().into_iter().find(|s| s.id == id) else {
                // It went (a trap, a deadline), its state with it.
                lock(&self.synced).covered.insert(id, u64::MAX);
                continue;
            };
            if !self.has_capture(&shared) {
                // Its first frame: a racy copy of its memory while it
                // may run, which the exact frame below completes.
                let (journal, g) = (self.clone(), f.clone());
                let copied = tokio::task::spawn_blocking(move || journal.precopy(&shared, &g))
                    .await
                    .map_err(ExecError::task("checkpoint"))
                    .and_then(|r| r);
                if let Err(e) = copied {
                    tracing::warn!(tenant = %self.tenant, error = %e, "a checkpoint failed; the tenant keeps serving");
                    lock(&self.synced).refuse(id, &e.to_string());
                    continue;
                }
            }
            match by_function.iter_mut().find(|(g, _)| Arc::ptr_eq(g, &f)) {
                Some((_, ids)) => ids.push(id),
                None => by_function.push((f, vec![id])),
            }
        }
        // A slow function's busy slots do not hold up another's.
        let slots =
            futures_util::future::join_all(by_function.iter().map(|(f, _)| f.pool.acquire())).await;
        let held: Vec<_> = by_function
            .into_iter()
            .zip(slots)
            .filter_map(|((f, ids), slot)| slot.ok().map(|slot| (f, slot, ids)))
            .collect();
        if held.is_empty() {
            return;
        }
        let journal = self.clone();
        let taken = tokio::task::spawn_blocking(move || {
            for (f, slot, ids) in held {
                for id in ids {
                    let Some(mut p) = f.pool.take_idle(&slot, id) else {
                        lock(&journal.synced).busy.insert(id);
                        continue;
                    };
                    let written = journal.capture(&mut p.inst, &f);
                    f.pool.checkin(p);
                    if let Err(e) = written {
                        tracing::warn!(tenant = %journal.tenant, error = %e, "a checkpoint failed; the tenant keeps serving");
                        lock(&journal.synced).refuse(id, &e.to_string());
                    }
                }
            }
        })
        .await;
        if let Err(e) = taken {
            tracing::error!(tenant = %self.tenant, error = %e, "a checkpoint task failed");
        }
    }

    /// Syncs `batch`, then answers every sync that ended, in the order
    /// they started ([`settle`](Self::settle)), and wakes the committer,
    /// whose waiters it may have answered; keeps zeros written ahead of the
    /// frames once it worked. Blocking.
    fn sync_batch(self: &Arc<Self>, batch: Batch) {
        // However it ends (a panic), its place in the order is settled, so
        // that the syncs after it answer.
        struct Settle<'a>(&'a Arc<Journal>, Option<Batch>);
        impl Drop for Settle<'_> {
            fn drop(&mut self) {
                if let Some(batch) = self.1.take() {
                    self.0
                        .settle(batch, Err(std::io::Error::other("a journal sync failed")));
                }
            }
        }
        let mut guard = Settle(self, Some(batch));
        let Some(batch) = guard.1.as_ref() else {
            return;
        };
        let synced = match (&batch.written, &batch.file) {
            (Err(e), _) => Err(std::io::Error::new(e.kind(), e.to_string())),
            (Ok(()), Some(f)) => {
                let _timer = self.metrics.sync_duration.start_timer();
                f.sync_data()
            }
            (Ok(()), None) => Ok(()),
        };
        let worked = synced.is_ok();
        if let Some(batch) = guard.1.take() {
            self.settle(batch, synced);
        }
        self.kick.notify_one();
        if worked && !self.zeroing.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.zero_ahead();
            self.zeroing
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Records that `batch`'s sync gave `synced`, and answers every sync
    /// whose turn came ([`publish`](Self::publish)): in the order they
    /// started, so that a failure is answered before any success after
    /// it. Blocking.
    fn settle(&self, batch: Batch, synced: std::io::Result<()>) {
        let _turn = lock(&self.publishing);
        let ready = {
            let mut order = lock(&self.order);
            order.done.insert(batch.seq, (batch, synced));
            let mut ready = Vec::new();
            while let Some(next) = {
                let seq = order.answered;
                order.done.remove(&seq)
            } {
                order.answered += 1;
                ready.push(next);
            }
            ready
        };
        for (batch, synced) in ready {
            if let Err(e) = self.publish(&batch, synced) {
                tracing::warn!(tenant = %self.tenant, error = %e, "a checkpoint sync failed; the tenant keeps serving");
            }
        }
    }

    /// Frames written so far: [`durable`](Self::durable) of it syncs them
    /// all (a checkpoint pass's end).
    pub fn written(&self) -> u64 {
        lock(&self.log).written
    }

    /// Whether `shared` (of a function with `durability`, checkpointed
    /// every `interval`) has a frame due: it has none in this generation,
    /// or it ran since its last and `interval` has passed.
    pub fn due(&self, shared: &InstanceShared, interval: std::time::Duration) -> bool {
        let generation = lock(&self.log).generation;
        match lock(&self.captures).get(&shared.id) {
            None => true,
            Some(c) => {
                c.based < generation
                    || (c.invocations
                        != shared
                            .invocations
                            .load(std::sync::atomic::Ordering::Relaxed)
                        && c.at.elapsed() >= interval)
            }
        }
    }

    /// Journals the instances that went since the last look (not in
    /// `live`), and removes the generations no instance needs: those
    /// before the oldest fresh copy's, and one more kept in case that copy
    /// is found damaged.
    pub fn tidy(&self, live: &[u64]) {
        let went: Vec<Arc<InstanceShared>> = lock(&self.captures)
            .values()
            .filter(|c| !live.contains(&c.sent.shared.id))
            .map(|c| c.sent.shared.clone())
            .collect();
        for shared in went {
            self.gone(&shared);
        }
        let oldest = {
            let captures = lock(&self.captures);
            let log = lock(&self.log);
            captures
                .values()
                .map(|c| c.based)
                .min()
                .unwrap_or(log.generation)
                .min(log.generation)
                .min(log.jobs_in)
        };
        let mut log = lock(&self.log);
        let old: Vec<u64> = log
            .generations
            .iter()
            .copied()
            .filter(|&g| g + 1 < oldest)
            .collect();
        for g in old {
            let path = generation_path(&log.dir, g);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    log.generations.remove(&g);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    log.generations.remove(&g);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an old journal")
                }
            }
        }
    }
}

fn header(flags: u32, jid: u64, len: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..16].copy_from_slice(&jid.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&h[..24]);
    h[24..].copy_from_slice(&sum.to_le_bytes());
    h
}

/// A frame's header, if it is valid: (flags, instance, payload length).
fn parse_header(h: &[u8; HEADER]) -> Option<(u32, u64, u64)> {
    let sum = u64::from_le_bytes(h[24..].try_into().ok()?);
    if &h[..4] != MAGIC || xxhash_rust::xxh3::xxh3_64(&h[..24]) != sum {
        return None;
    }
    let flags = u32::from_le_bytes(h[4..8].try_into().ok()?);
    let jid = u64::from_le_bytes(h[8..16].try_into().ok()?);
    let len = u64::from_le_bytes(h[16..24].try_into().ok()?);
    (flags & !(FRESH | GONE | JOB | RACY | CALL) == 0 && len <= MAX_FRAME)
        .then_some((flags, jid, len))
}

impl Log {
    /// The frames waiting in the buffer, sealed, for the file.
    fn take_buf(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.buf);
        seal_all(&mut buf, &std::mem::take(&mut self.unsealed));
        buf
    }
}

/// Fills in the checksums of the payloads at `ranges` of `buf`.
fn seal_all(buf: &mut [u8], ranges: &[std::ops::Range<usize>]) {
    for r in ranges {
        let sealed = tensor_wasm_shared::snapshot::stream::seal(&mut buf[r.clone()]);
        debug_assert!(sealed, "a buffered frame ends with End");
    }
}

/// Writes at a position of a file through a buffer, counting what goes
/// by. What fits in the buffer stays there until the frame ends (`spilled`
/// false), unhashed; once the frame spills, what goes to the file is
/// hashed as it goes.
struct Tee<'a> {
    file: &'a File,
    at: u64,
    buf: Vec<u8>,
    spilled: bool,
    hasher: blake3::Hasher,
    len: u64,
}

impl Write for Tee<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.len += b.len() as u64;
        if self.buf.len() + b.len() > WRITE_BUFFER {
            self.spilled = true;
            self.spill()?;
        }
        if b.len() >= WRITE_BUFFER {
            self.spilled = true;
            self.hasher.update(b);
            self.file.write_all_at(b, self.at)?;
            self.at += b.len() as u64;
        } else {
            self.buf.extend_from_slice(b);
        }
        Ok(b.len())
    }

    /// Writes out what is buffered once the frame has spilled; a frame
    /// that has not stays whole in the buffer.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.spilled {
            self.spill()?;
        }
        Ok(())
    }
}

impl Tee<'_> {
    fn spill(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.hasher.update(&self.buf);
            self.file.write_all_at(&self.buf, self.at)?;
            self.at += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

/// One good frame found on disk.
#[derive(Debug, Clone, Copy)]
struct Frame {
    generation: u64,
    /// Offset of its payload.
    at: u64,
    flags: u32,
    jid: u64,
    len: u64,
}

/// What a recovery found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub frames: u64,
    pub instances: usize,
    pub jobs: usize,
    /// Bytes cut off the journal at its first damaged frame.
    pub damaged_bytes: u64,
    /// `strict` calls run again from their records.
    pub replayed: u64,
    /// Instances whose replay diverged: they stand as of their last exact
    /// frame.
    pub diverged: usize,
}

/// Where frames are read from: a journal's file, or its bytes.
trait Source {
    fn size(&self) -> std::io::Result<u64>;
    fn read_exact_at(&self, out: &mut [u8], at: u64) -> std::io::Result<()>;
}

impl Source for File {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_exact_at(&self, out: &mut [u8], at: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, out, at)
    }
}

impl Source for [u8] {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn read_exact_at(&self, out: &mut [u8], at: u64) -> std::io::Result<()> {
        let at = usize::try_from(at).map_err(std::io::Error::other)?;
        let bytes = at
            .checked_add(out.len())
            .and_then(|end| self.get(at..end))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(bytes);
        Ok(())
    }
}

/// The good frames of generation `g` of `dir`, in order, and where the
/// first damaged one starts (`None` when the file is whole).
fn scan(dir: &Path, g: u64) -> std::io::Result<(Vec<Frame>, u64, Option<u64>)> {
    let file = File::open(generation_path(dir, g))?;
    scan_source(&file, g)
}

/// Cuts generation `g` of `dir` to `end` bytes, if it is longer.
fn trim(dir: &Path, g: u64, end: u64) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(generation_path(dir, g))?;
    if f.metadata()?.len() > end {
        f.set_len(end)?;
        f.sync_all()?;
    }
    Ok(())
}

/// A frame as the journal lays it out around `payload` (a stream, which
/// the frame's checks expect sealed): what tests and the fuzzer build
/// journals from.
pub fn encode_frame(flags: u32, jid: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = header(flags, jid, payload.len() as u64).to_vec();
    f.extend_from_slice(payload);
    f
}

/// How many good frames `bytes` (a journal file's) hold, and where the
/// first damaged one starts (`None` when they are whole, zeros after the
/// last one included): what recovery checks before it applies anything.
pub fn check_frames(bytes: &[u8]) -> (usize, Option<u64>) {
    match scan_source(bytes, 1) {
        Ok((frames, _, damaged)) => (frames.len(), damaged),
        Err(_) => (0, Some(0)),
    }
}

fn scan_source<S: Source + ?Sized>(
    file: &S,
    g: u64,
) -> std::io::Result<(Vec<Frame>, u64, Option<u64>)> {
    let size = file.size()?;
    let mut frames = Vec::new();
    let mut at = 0u64;
    let mut buf = vec![0u8; WRITE_BUFFER];
    while at < size {
        let mut h = [0u8; HEADER];
        let header = if size - at < HEADER as u64 {
            None
        } else {
            file.read_exact_at(&mut h, at)
                .ok()
                .and_then(|()| parse_header(&h))
        };
        let Some((flags, jid, len)) = header else {
            // Zeros written ahead ([`Journal::zero_ahead`]) end it cleanly:
            // the frames end here.
            if zeros(file, at, size, &mut buf)? {
                return Ok((frames, at, None));
            }
            return Ok((frames, size, Some(at)));
        };
        let payload = at + HEADER as u64;
        if len > size - payload || len < MIN_PAYLOAD {
            return Ok((frames, size, Some(at)));
        }
        // The stream's End carries the checksum of its bytes before it.
        let body = len - END_LEN as u64;
        let mut hasher = blake3::Hasher::new();
        let mut off = 0u64;
        while off < body {
            let n = (body - off).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], payload + off)?;
            hasher.update(&buf[..n]);
            off += n as u64;
        }
        let mut end = [0u8; END_LEN];
        file.read_exact_at(&mut end, payload + body)?;
        if end_checksum(&end).as_ref() != Some(hasher.finalize().as_bytes()) {
            return Ok((frames, size, Some(at)));
        }
        frames.push(Frame {
            generation: g,
            at: payload,
            flags,
            jid,
            len,
        });
        at = payload + len;
    }
    Ok((frames, size, None))
}

/// Whether bytes `[at, end)` of `file` are all zeros.
fn zeros<S: Source + ?Sized>(file: &S, at: u64, end: u64, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut off = at;
    while off < end {
        let n = (end - off).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], off)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// Rebuilds `tenant`'s instances (its functions registered already) from
/// its journal, up to the last good frame, and returns its journal, which
/// goes on from there. A damaged frame and everything after it is cut off
/// (and logged): each instance stands as of its last good frame, or its
/// previous generation's. The `strict` calls recorded after an
/// instance's last exact frame then run again on it, in order; one whose
/// answer differs from the one it gave (or that fails) ends the replay of
/// that instance, which then stands as of its last exact frame (logged:
/// the calls after it are lost). Blocking.
pub fn recover(registry: &Registry, tenant: &Arc<Tenant>) -> Result<RecoveredTenant, ExecError> {
    let journal = Journal::new(
        registry.state_dir(),
        tenant.id.clone(),
        registry.page_tracking().clone(),
        registry.metrics.journal.clone(),
    );
    let dir = journal_dir(registry.state_dir(), &tenant.id);
    let mut found = generations(&dir);
    let mut frames = Vec::new();
    let mut damaged_bytes = 0;
    let mut end = None;
    for &g in &found {
        let (mut good, size, damaged) =
            scan(&dir, g).map_err(|e| io_error("reading a journal", e))?;
        frames.append(&mut good);
        if damaged.is_none() {
            // Zeros ahead of its frames go: it is written on from its end.
            trim(&dir, g, size).map_err(|e| io_error("cutting zeros off a journal", e))?;
        }
        if let Some(at) = damaged {
            damaged_bytes += size - at;
            end = Some((g, at));
            break;
        }
    }
    if let Some((g, at)) = end {
        tracing::error!(tenant = %tenant.id, generation = g, offset = at, bytes = damaged_bytes, "a damaged checkpoint frame: the tenant resumes from the frames before it");
        let cut = std::fs::OpenOptions::new()
            .write(true)
            .open(generation_path(&dir, g))
            .and_then(|f| f.set_len(at).and_then(|()| f.sync_all()));
        if let Err(e) = cut {
            return Err(io_error("cutting a damaged journal", e));
        }
        for later in found.split_off(&(g + 1)) {
            let _ = std::fs::remove_file(generation_path(&dir, later));
        }
    }
    // A racy frame counts only when an exact frame of its instance follows
    // it; the last ones of an instance whose exact frame never came (a
    // crash between the two) are left out, so it stands as before them.
    let mut confirmed = std::collections::HashSet::new();
    let mut usable = vec![true; frames.len()];
    for (i, fr) in frames.iter().enumerate().rev() {
        if fr.flags & (JOB | CALL) != 0 {
            continue;
        }
        if fr.flags & RACY != 0 {
            usable[i] = confirmed.contains(&fr.jid);
        } else {
            confirmed.insert(fr.jid);
        }
    }
    let usable: Vec<Frame> = frames
        .iter()
        .zip(&usable)
        .filter(|(_, u)| **u)
        .map(|(fr, _)| *fr)
        .collect();
    // Instances whose replay diverged: built again without it.
    let mut unreplayed = std::collections::HashSet::new();
    let pass = loop {
        let pass = rebuild(registry, tenant, &journal, &dir, &usable, &unreplayed)?;
        if pass.diverged.is_empty() {
            break pass;
        }
        unreplayed.extend(pass.diverged.iter().copied());
        for (_, sent) in pass.sents {
            sent.stop();
        }
    };
    let Pass {
        inbound,
        based,
        jobs,
        sents: mut made,
        replayed,
        ..
    } = pass;
    let adopted = inbound.adopt_staged();
    let report = Recovered {
        frames: usable.len() as u64,
        instances: adopted.len(),
        jobs: jobs.len(),
        damaged_bytes,
        replayed: replayed.values().sum(),
        diverged: unreplayed.len(),
    };
    {
        let mut captures = lock(&journal.captures);
        let mut log = lock(&journal.log);
        log.generations = found.clone();
        log.generation = found.last().copied().unwrap_or(1);
        log.next_jid = frames.iter().map(|f| f.jid).max().unwrap_or(0) + 1;
        // The jobs' records go to the current generation again at the
        // first pass (with what recovery changed in them).
        log.jobs_in = if jobs.is_empty() { log.generation } else { 0 };
        for (jid, shared) in adopted {
            let (g, bytes) = based.get(&jid).copied().unwrap_or((0, 0));
            let invocations = shared
                .invocations
                .load(std::sync::atomic::Ordering::Relaxed);
            // What replay wrote is tracked from before it ran, so the
            // instance's next frame carries it; until then its calls'
            // records, after its last exact frame, hold it.
            let chain = (!unreplayed.contains(&jid)).then_some((invocations, log.fresh_from));
            let sent = made
                .remove(&jid)
                .unwrap_or_else(|| Sent::synced(shared.clone(), &journal.tracking));
            captures.insert(
                shared.id,
                Capture {
                    jid,
                    sent,
                    based: g,
                    fresh_bytes: bytes,
                    invocations,
                    at: Instant::now(),
                    chain,
                },
            );
        }
    }
    for (_, sent) in made {
        sent.stop();
    }
    Ok(RecoveredTenant {
        journal,
        report,
        jobs: jobs.into_values().collect(),
    })
}

/// One rebuild of a tenant from its journal's usable frames.
struct Pass {
    inbound: Inbound,
    /// By instance: the generation and bytes of its fresh copy.
    based: HashMap<u64, (u64, u64)>,
    jobs: std::collections::BTreeMap<String, (JobInfo, Option<RequestBody>)>,
    /// The tracking of every staged instance, started before its calls
    /// ran again.
    sents: HashMap<u64, Sent>,
    /// By instance: the calls run again.
    replayed: HashMap<u64, u64>,
    /// Instances whose replay diverged.
    diverged: Vec<u64>,
}

/// Applies `frames` to instances built off to the side, then runs again,
/// on every instance not in `unreplayed`, the calls recorded after its
/// last exact frame. Blocking.
fn rebuild(
    registry: &Registry,
    tenant: &Arc<Tenant>,
    journal: &Journal,
    dir: &Path,
    frames: &[Frame],
    unreplayed: &std::collections::HashSet<u64>,
) -> Result<Pass, ExecError> {
    let inbound = Inbound::new(tenant.clone(), None);
    let mut based: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut jobs = std::collections::BTreeMap::new();
    // By instance: its calls recorded after its last frame of state.
    let mut calls: HashMap<u64, Vec<Frame>> = HashMap::new();
    let mut files = Files::new(dir);
    for fr in frames {
        if fr.flags & CALL != 0 {
            if based.contains_key(&fr.jid) {
                calls.entry(fr.jid).or_default().push(*fr);
            }
            continue;
        }
        let mut reader = files.reader(fr)?;
        if fr.flags & JOB != 0 {
            match read_job(&mut reader) {
                Ok((info, _)) if fr.flags & GONE != 0 => {
                    jobs.remove(info.id.as_str());
                }
                Ok((info, request)) => {
                    jobs.insert(info.id.to_string(), (info, request));
                }
                Err(e) => {
                    tracing::warn!(tenant = %tenant.id, error = %e, "a journaled job cannot be read; skipped")
                }
            }
            continue;
        }
        // A frame of state holds every call before it.
        calls.remove(&fr.jid);
        if fr.flags & (FRESH | GONE) != 0 {
            inbound.forget_instance(fr.jid);
            based.remove(&fr.jid);
        }
        if fr.flags & GONE != 0 {
            continue;
        }
        if fr.flags & FRESH == 0 && !based.contains_key(&fr.jid) {
            continue; // an instance dropped earlier: nothing to change
        }
        match inbound.apply_frame(registry, &mut reader, fr.jid) {
            Ok(_) => {
                if fr.flags & FRESH != 0 {
                    based.insert(fr.jid, (fr.generation, fr.len));
                }
            }
            Err(e) => {
                tracing::warn!(tenant = %tenant.id, instance = fr.jid, error = %e, "a checkpointed instance cannot be rebuilt; it starts cold");
                based.remove(&fr.jid);
            }
        }
    }
    let sents: HashMap<u64, Sent> = inbound
        .staged_instances()
        .into_iter()
        .map(|(jid, shared)| (jid, Sent::synced(shared, &journal.tracking)))
        .collect();
    let mut replayed = HashMap::new();
    let mut diverged = Vec::new();
    for (jid, list) in calls {
        if unreplayed.contains(&jid) || !sents.contains_key(&jid) {
            continue;
        }
        let mut ran = 0u64;
        for fr in &list {
            let again = files
                .reader(fr)
                .and_then(|mut r| read_call(&mut r))
                .and_then(|(call, request)| replay(tenant, &inbound, jid, &call, request));
            match again {
                Ok(()) => ran += 1,
                Err(e) => {
                    tracing::error!(tenant = %tenant.id, instance = jid, call = ran + 1, lost = list.len() as u64 - ran, error = %e, "a recorded call did not run again as it had: the instance resumes from its last checkpoint, without the calls recorded after it");
                    diverged.push(jid);
                    break;
                }
            }
        }
        replayed.insert(jid, ran);
    }
    Ok(Pass {
        inbound,
        based,
        jobs,
        sents,
        replayed,
        diverged,
    })
}

/// Runs recorded `call` (with its `request`) again on staged instance
/// `jid`; an error when it fails or answers otherwise than it did.
fn replay(
    tenant: &Arc<Tenant>,
    inbound: &Inbound,
    jid: u64,
    call: &CallRecord,
    request: RequestBody,
) -> Result<(), ExecError> {
    let f = tenant
        .function(&call.function)
        .ok_or_else(|| ExecError::FunctionNotFound(call.function.clone()))?;
    let backend = tenant.backend.clone();
    let answered = inbound
        .with_staged(jid, |inst, function| {
            if function.as_str() != call.function {
                return Err(ExecError::InvalidInput(format!(
                    "a call of function {} recorded for an instance of {function}",
                    call.function
                )));
            }
            let request = request.decode(backend.as_ref())?;
            // As much time again as the call had: it ran once within it.
            let resp = inst
                .invoke(request, 2 * f.deadline(), None)
                .map_err(ExecError::Invoke)?;
            answer_digest(&resp, backend.as_ref())
                .ok_or_else(|| ExecError::Internal("its answer cannot be read back".into()))
        })
        .ok_or_else(|| ExecError::Internal(format!("no staged instance {jid}")))??;
    if format!("{answered:032x}") != call.answer {
        return Err(ExecError::Internal(format!(
            "its answer differs (XXH3-128 {answered:032x}, recorded {})",
            call.answer
        )));
    }
    Ok(())
}

/// The XXH3-128 of an invocation's answer (its raw bytes, and each output
/// with its name, type, shape and bytes): what a call's record keeps, and
/// what its replay must give again. `None` when its outputs pass
/// [`MAX_CALL_ANSWER`] or cannot be read back.
pub fn answer_digest(resp: &Response, backend: &dyn Backend) -> Option<u128> {
    let total: u64 = resp.outputs.iter().map(|(_, t)| t.nbytes()).sum();
    if total > MAX_CALL_ANSWER {
        return None;
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(resp.raw.len() as u64).to_le_bytes());
    h.update(&resp.raw);
    for (name, t) in &resp.outputs {
        let bytes = backend.to_bytes(t).ok()?;
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&[t.dtype() as u8]);
        h.update(&(t.dims().len() as u64).to_le_bytes());
        for &d in t.dims() {
            h.update(&(d as u64).to_le_bytes());
        }
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Some(h.digest128())
}

/// What a call's record names besides its request.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CallRecord {
    function: String,
    /// XXH3-128 of its answer ([`answer_digest`]), in hex.
    answer: String,
}

/// The journal's files, each opened once, for reading frames.
struct Files<'a> {
    dir: &'a Path,
    open: HashMap<u64, File>,
}

impl<'a> Files<'a> {
    fn new(dir: &'a Path) -> Files<'a> {
        Files {
            dir,
            open: HashMap::new(),
        }
    }

    /// A reader of frame `fr`'s payload.
    fn reader(&mut self, fr: &Frame) -> Result<Reader<Positioned<'_>>, ExecError> {
        let file = match self.open.entry(fr.generation) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                File::open(generation_path(self.dir, fr.generation))
                    .map_err(|e| io_error("reading a journal", e))?,
            ),
        };
        let payload = Positioned {
            file,
            at: fr.at,
            end: fr.at + fr.len,
        };
        Reader::new(payload, None, MAX_FRAME).map_err(ExecError::Snapshot)
    }
}

/// A tenant rebuilt from its journal.
#[derive(Debug)]
pub struct RecoveredTenant {
    pub journal: Journal,
    pub report: Recovered,
    /// Its jobs' latest records, with the requests of those that waited.
    pub jobs: Vec<(JobInfo, Option<RequestBody>)>,
}

/// A job frame's record and request.
fn read_job(reader: &mut Reader<impl Read>) -> Result<(JobInfo, Option<RequestBody>), ExecError> {
    read_request_frame(reader, "job")
}

/// A call frame's record and request.
fn read_call(reader: &mut Reader<impl Read>) -> Result<(CallRecord, RequestBody), ExecError> {
    match read_request_frame(reader, "call")? {
        (call, Some(request)) => Ok((call, request)),
        (_, None) => Err(ExecError::InvalidInput(
            "a journaled call: no request".into(),
        )),
    }
}

/// A frame of one `Job` record (its JSON of a `T`) and the request in the
/// `Data` after it, if any.
fn read_request_frame<T: serde::de::DeserializeOwned>(
    reader: &mut Reader<impl Read>,
    what: &str,
) -> Result<(T, Option<RequestBody>), ExecError> {
    let bad = |m: &str| ExecError::InvalidInput(format!("a journaled {what}: {m}"));
    let snap = ExecError::Snapshot;
    if !matches!(
        reader.next_record().map_err(snap)?,
        Some(Record::Tenant { .. })
    ) {
        return Err(bad("no tenant record"));
    }
    let Some(Record::Job {
        info_json,
        content_type,
        body,
    }) = reader.next_record().map_err(snap)?
    else {
        return Err(bad("no record"));
    };
    let info: T = serde_json::from_str(&info_json).map_err(|e| bad(&e.to_string()))?;
    let request = match body {
        Some(len) => Some(RequestBody {
            content_type,
            body: bytes::Bytes::from(crate::inbound::read_data(reader, len)?),
        }),
        None => None,
    };
    if reader.next_record().map_err(snap)?.is_some() {
        return Err(bad("records after its own"));
    }
    Ok((info, request))
}

/// The bytes `[at, end)` of a file, read in order.
struct Positioned<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl Read for Positioned<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.end - self.at).min(out.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut out[..n], self.at)?;
        self.at += got as u64;
        Ok(got)
    }
}

/// Whether instances of functions with `d` are journaled.
pub fn journaled(d: Durability) -> bool {
    d != Durability::None
}

/// Settles what a crash left of journal swaps ([`Journal::take_place`])
/// before any journal is read: a staged journal never took its place and
/// goes; a replaced one goes if the staged one took its place, and is the
/// tenant's journal again if the crash came between the two renames.
fn settle_swaps(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        let result = if name.ends_with(STAGED) {
            remove_dir(&path)
        } else if let Some(tenant) = name.strip_suffix(REPLACED) {
            let main = root.join(tenant);
            if main.exists() {
                remove_dir(&path)
            } else {
                std::fs::rename(&path, &main).and_then(|()| sync_dir(root))
            }
        } else {
            continue;
        };
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot settle a journal swap a crash interrupted");
        }
    }
}

/// Removes the journal a staged tenant wrote ([`Journal::staged`]): the
/// staging was abandoned.
pub fn remove_staged_journal(state_dir: &Path, tenant: &TenantId) {
    if let Err(e) = remove_dir(&suffixed(state_dir, tenant, STAGED)) {
        tracing::warn!(%tenant, error = %e, "cannot remove a staged journal");
    }
}

/// Removes `tenant`'s journal (the tenant left this executor).
pub fn remove_journal(state_dir: &Path, tenant: &TenantId) {
    if let Err(e) = remove_dir(&journal_dir(state_dir, tenant)) {
        tracing::warn!(%tenant, error = %e, "cannot remove the tenant's journal");
    }
}

impl Registry {
    /// One pass of the checkpointer over every tenant that takes work: a
    /// frame of each instance of a journaled function that has one due
    /// (it ran since its last frame and its function's interval passed,
    /// or it has no fresh copy in the current generation), taken while
    /// holding one of its pool's slots, then one sync per tenant. A tenant
    /// being frozen waits for its pass, as for an invocation. `last` (a
    /// graceful stop): every instance that ran since its last frame, the
    /// interval regardless.
    pub async fn checkpoint_pass(self: &Arc<Self>, last: bool) {
        for t in self.tenant_list() {
            let Ok(admitted) = t.admit() else {
                continue;
            };
            let mut live = Vec::new();
            let mut wrote = false;
            for f in t.function_list() {
                if !journaled(f.config.durability) {
                    continue;
                }
                let journal = self.journal(&t);
                for shared in f.pool.live() {
                    live.push(shared.id);
                    let interval = if last {
                        std::time::Duration::ZERO
                    } else {
                        f.config.checkpoint
                    };
                    if !journal.due(&shared, interval) {
                        continue;
                    }
                    // The bulk while it runs, then only what it wrote
                    // meanwhile while it is held: a checkpoint never holds
                    // an instance for a copy of its whole memory.
                    let (j, g, sh) = (journal.clone(), f.clone(), shared.clone());
                    match tokio::task::spawn_blocking(move || j.precopy(&sh, &g)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(tenant = %t.id, error = %e, "a checkpoint failed; the tenant keeps serving");
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(tenant = %t.id, error = %e, "a checkpoint task failed");
                            continue;
                        }
                    }
                    let Ok(slot) = f.pool.acquire().await else {
                        continue;
                    };
                    let (journal, f, id) = (journal.clone(), f.clone(), shared.id);
                    let taken = tokio::task::spawn_blocking(move || {
                        // Running or gone: the next pass looks again.
                        let mut p = f.pool.take_idle(&slot, id)?;
                        let result = journal.capture(&mut p.inst, &f);
                        f.pool.checkin(p);
                        Some(result)
                    })
                    .await;
                    match taken {
                        Ok(Some(Ok(_))) => wrote = true,
                        Ok(Some(Err(e))) => {
                            tracing::warn!(tenant = %t.id, error = %e, "a checkpoint failed; the tenant keeps serving")
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(tenant = %t.id, error = %e, "a checkpoint task failed")
                        }
                    }
                }
            }
            if t.jobs().records().next().is_some() {
                self.journal(&t);
            }
            if let Some(journal) = t.journal.get().cloned() {
                let stale = journal.jobs_stale();
                let (j, t3) = (journal.clone(), t.clone());
                let rewritten = tokio::task::spawn_blocking(move || {
                    if !stale {
                        return Ok(false);
                    }
                    j.rewrite_jobs(|| t3.jobs().journal_records())
                        .map(|()| true)
                })
                .await
                .map_err(ExecError::task("checkpoint"))
                .and_then(|r| r);
                // Synced before an old generation, which may hold the jobs'
                // earlier records, can go.
                let synced = match rewritten {
                    Ok(again) if wrote || again => journal.durable(journal.written()).await,
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                };
                match synced {
                    Ok(()) => {
                        let _ = tokio::task::spawn_blocking(move || journal.tidy(&live)).await;
                    }
                    Err(e) => {
                        tracing::warn!(tenant = %t.id, error = %e, "a checkpoint sync failed; the tenant keeps serving")
                    }
                }
            }
            drop(admitted);
        }
    }

    /// Writes a full copy of every instance of a journaled function that
    /// has no frames, and then every job, of the tenants that came back
    /// warm (their older journals went as their warm state loaded), and
    /// syncs them: at start, before the listener, so that the warm state
    /// loaded is on disk as checkpoints before its files go. A tenant
    /// whose journal cannot be written keeps serving; the checkpointer
    /// tries again.
    pub async fn journal_warm(self: &Arc<Self>) {
        for t in self.tenant_list() {
            if t.instance_count() == 0 {
                continue;
            }
            if let Err(e) = self.journal_tenant(&t).await {
                tracing::warn!(tenant = %t.id, error = %e, "the warm state loaded is not in the tenant's journal yet; the checkpointer tries again");
            }
        }
    }

    /// Writes a full copy of every idle instance of `t`'s journaled
    /// functions that has no frames, then every job of `t`, and syncs
    /// them: a tenant that arrived whole (warm state loaded, a snapshot
    /// imported) is on disk before it is answered for. An instance that
    /// runs meanwhile makes its own first frame as it ends (`strict`) or
    /// at the checkpointer's next pass.
    pub async fn journal_tenant(self: &Arc<Self>, t: &Arc<Tenant>) -> Result<(), ExecError> {
        let registry = self.clone();
        let t2 = t.clone();
        let written = tokio::task::spawn_blocking(move || -> Result<Option<u64>, ExecError> {
            let mut journal = None;
            let mut wrote = false;
            for f in t2.function_list() {
                if !journaled(f.config.durability) {
                    continue;
                }
                let j = journal.get_or_insert_with(|| registry.journal(&t2));
                f.pool.with_idle(|idle| {
                    idle.iter_mut()
                        .filter(|p| !j.has_capture(p.inst.shared()))
                        .try_for_each(|p| {
                            wrote = true;
                            j.capture(&mut p.inst, &f).map(drop)
                        })
                })?;
            }
            let Some(j) = journal.filter(|_| wrote) else {
                return Ok(None);
            };
            j.rewrite_jobs(|| t2.jobs().journal_records())?;
            Ok(Some(j.written()))
        })
        .await
        .map_err(ExecError::task("checkpoint"))??;
        if let Some(n) = written {
            t.journal
                .get()
                .ok_or_else(|| ExecError::Internal("a journal that went".into()))?
                .durable(n)
                .await?;
        }
        Ok(())
    }

    /// Puts back the jobs a journal held: finished ones as they were,
    /// waiting ones to run, and one that was running when the executor
    /// stopped as failed (`job_interrupted`): it may or may not have taken
    /// effect, and running it again could apply it twice.
    fn restore_jobs(self: &Arc<Self>, t: &Arc<Tenant>, jobs: Vec<(JobInfo, Option<RequestBody>)>) {
        let mut pending = Vec::new();
        {
            let mut table = t.jobs();
            for (mut info, request) in jobs {
                if info.status == JobStatus::Running {
                    info.status = JobStatus::Failed;
                    info.finished_at = Some(crate::sync::now_rfc3339());
                    info.error = Some(ApiError::new(
                        ErrorCode::JobInterrupted,
                        "the executor stopped while the job ran: it may or may not have \
                         taken effect, and it is not run again",
                    ));
                }
                let id = info.id.clone();
                if table.restore(info, request) {
                    pending.push(id);
                }
            }
        }
        for id in pending {
            self.spawn_job(t.clone(), id);
        }
    }

    /// Rebuilds the warm state of every tenant that did not come back warm
    /// from its journal (its functions are registered already); a tenant
    /// that came back warm, whose state is newer, starts a new journal.
    /// Returns how many tenants resumed from a journal.
    pub async fn recover_journals(self: &Arc<Self>) -> usize {
        let root = self.state_dir().join(DURABLE_DIR);
        settle_swaps(&root);
        let Ok(entries) = std::fs::read_dir(&root) else {
            return 0;
        };
        let mut resumed = 0;
        for entry in entries.flatten() {
            let Some(tenant) = entry
                .file_name()
                .to_str()
                .and_then(|s| TenantId::new(s).ok())
            else {
                continue;
            };
            let t = match self.existing_tenant(&tenant) {
                Some(t) if t.instance_count() == 0 && t.function_count() > 0 => t,
                // Back warm: its old journal went when its warm state
                // loaded; this one is new ([`journal_warm`](Self::journal_warm)).
                Some(t) if t.instance_count() > 0 => continue,
                _ => {
                    remove_journal(self.state_dir(), &tenant);
                    continue;
                }
            };
            let registry = self.clone();
            let t2 = t.clone();
            let started = Instant::now();
            match tokio::task::spawn_blocking(move || recover(&registry, &t2)).await {
                Ok(Ok(RecoveredTenant {
                    journal,
                    report,
                    jobs,
                })) => {
                    tracing::info!(%tenant, frames = report.frames, instances = report.instances, jobs = report.jobs, replayed = report.replayed, diverged = report.diverged, damaged_bytes = report.damaged_bytes, elapsed = ?started.elapsed(), "tenant resumed from its checkpoints");
                    let _ = t.journal.set(Arc::new(journal));
                    self.restore_jobs(&t, jobs);
                    resumed += 1;
                }
                Ok(Err(e)) => {
                    tracing::error!(%tenant, error = %e, "cannot resume the tenant from its checkpoints; it starts cold")
                }
                Err(e) => tracing::error!(%tenant, error = %e, "a recovery task failed"),
            }
        }
        resumed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as `write_frame` lays it out: a stream of one Tenant
    /// record named `name`.
    fn frame(flags: u32, jid: u64, name: &str) -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), None).unwrap();
        w.record(&Record::Tenant {
            tenant: name.into(),
            kind: StreamKind::Round,
        })
        .unwrap();
        encode_frame(flags, jid, &w.finish().unwrap())
    }

    #[test]
    fn whole_frames_are_read_and_damage_ends_the_journal() {
        let mut bytes = frame(FRESH, 1, "the first");
        let second = bytes.len() as u64;
        bytes.extend(frame(0, 1, "the second, a little longer"));
        assert_eq!(check_frames(&bytes), (2, None));
        // Cut short, as a crash mid-write leaves it.
        for cut in [1, 10, 33, 40] {
            assert_eq!(
                check_frames(&bytes[..bytes.len() - cut]),
                (1, Some(second)),
                "cut {cut}"
            );
        }
        // A bit flipped in a payload, a checksum, a header.
        for at in [HEADER + 2, second as usize - 1, second as usize + 20] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x20;
            let (good, damaged) = check_frames(&flipped);
            assert!(damaged.is_some() && good < 2, "flip at {at}");
        }
        // A header that claims more than the file holds, or unknown flags.
        let mut long = frame(0, 1, "x");
        long[..HEADER].copy_from_slice(&header(0, 1, 1 << 40));
        assert_eq!(check_frames(&long), (0, Some(0)));
        let odd = frame(64, 1, "x");
        assert_eq!(check_frames(&odd), (0, Some(0)));
        // Zeros after the last frame (written ahead of the frames to
        // come) end the journal cleanly, however many.
        let first = frame(0, 1, "a");
        for zeros in [1, 31, 32, 96, 3 << 20] {
            let mut tail = first.clone();
            tail.extend(vec![0u8; zeros]);
            assert_eq!(check_frames(&tail), (1, None), "{zeros} zeros");
        }
        // A hole (zeros) where a frame should start, and a frame after it,
        // as a frame written past one never flushed leaves it: damage.
        let mut hole = first.clone();
        hole.extend(vec![0u8; 96]);
        hole.extend(frame(0, 1, "b"));
        assert_eq!(check_frames(&hole), (1, Some(first.len() as u64)));
        assert_eq!(check_frames(&[]), (0, None));
    }

    /// What a crash leaves of a swap of journals, at each step of it.
    #[test]
    fn a_swap_cut_short_by_a_crash_settles_to_one_journal() {
        let root = tempfile::tempdir().unwrap();
        let dir = |name: &str| root.path().join(name);
        let make = |name: &str, content: &str| {
            std::fs::create_dir_all(dir(name)).unwrap();
            std::fs::write(dir(name).join("00000001.journal"), content).unwrap();
        };
        let content = |name: &str| std::fs::read_to_string(dir(name).join("00000001.journal")).ok();
        // Before the first rename: the staged one never took the place.
        make("a", "a old");
        make("a.staged", "a new");
        // Between the two: the old one is the tenant's still.
        make("b.replaced", "b old");
        make("b.staged", "b new");
        // After both: the new one is.
        make("c", "c new");
        make("c.replaced", "c old");
        settle_swaps(root.path());
        let mut names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(content("a").as_deref(), Some("a old"));
        assert_eq!(content("b").as_deref(), Some("b old"));
        assert_eq!(content("c").as_deref(), Some("c new"));
    }
}
