//! Which pages of an instance's linear memory were written since the last
//! look: what a migration round must carry (`ARCHITECTURE.md`, "Tracking
//! written pages").
//!
//! Two methods, one per executor, chosen at start ([`PageTracking::open`]):
//!
//! - **write-protect**: the instance's memory is registered with a
//!   userfaultfd in asynchronous write-protect mode
//!   ([`crate::sys::WriteTracker`]); a round costs what was written.
//! - **hashing**: where userfaultfd is not allowed, each round hashes every
//!   page (XXH3) and reports those whose hash changed; a round costs a pass
//!   over the whole memory.
//!
//! Either way a round reads memory while the guest may run. A page written
//! during its copy is reported again by the next round (write-protect marks
//! it clean before the copy; hashing hashes the bytes it copied), so only
//! the last round, taken with the tenant frozen, needs to be exact, and is.
//!
//! An instance may have several readers at once (a migration's session and
//! the checkpoint journal, [`crate::durable`]), each with its own idea of
//! what it has. The kernel keeps one mark per page, so with write-protect
//! every reader goes through the instance's [`Readers`]: a look takes the
//! kernel's marks once and hands them to every reader's own set.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::sync::lock;
use crate::sys::{MemoryView, WriteTracker};

/// Bytes of a page: the unit both methods report.
pub const PAGE: usize = 4096;

/// What an operator asks for (`--page-tracking`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrackingChoice {
    /// Write-protect where the kernel offers it, else hashing.
    #[default]
    Auto,
    /// Hashing, even where write-protect is offered.
    Hashing,
}

/// How this executor tracks written pages.
#[derive(Clone, Debug)]
pub enum PageTracking {
    WriteProtect(Arc<WriteTracker>),
    Hashing,
}

impl PageTracking {
    /// Write-protect where the kernel offers it, else hashing (logged once,
    /// with the reason).
    pub fn open() -> PageTracking {
        Self::choose(TrackingChoice::Auto)
    }

    /// As the operator chose: [`open`](Self::open), or hashing.
    pub fn choose(choice: TrackingChoice) -> PageTracking {
        if choice == TrackingChoice::Hashing {
            tracing::info!("migration rounds hash memory (--page-tracking hashing)");
            return PageTracking::Hashing;
        }
        match WriteTracker::open() {
            Ok(t) => PageTracking::WriteProtect(Arc::new(t)),
            Err(e) => {
                tracing::info!(error = %e, "no write-protect page tracking; migration rounds hash memory");
                PageTracking::Hashing
            }
        }
    }

    /// `"write-protect"` or `"hashing"`.
    pub fn name(&self) -> &'static str {
        match self {
            PageTracking::WriteProtect(_) => "write-protect",
            PageTracking::Hashing => "hashing",
        }
    }

    /// Starts tracking an instance's memory (its `view`, read by
    /// `readers`). Every page counts as written until the first
    /// [`MemoryTracker::changed`].
    pub fn start(&self, view: &MemoryView, readers: &Readers) -> MemoryTracker {
        let reader = match self {
            PageTracking::WriteProtect(wt) => match readers.join(view, wt) {
                Ok(reader) => reader,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write-protect an instance's memory; hashing it");
                    None
                }
            },
            PageTracking::Hashing => None,
        };
        MemoryTracker {
            state: match reader {
                Some(id) => State::WriteProtect(id),
                None => State::Hashing(Vec::new()),
            },
            first: true,
        }
    }

    /// Starts tracking memory whose reader has it as it is now (an
    /// instance just rebuilt from it): the first
    /// [`MemoryTracker::changed`] reports only what is written from here
    /// on. Hashing reads the memory once to know it.
    pub fn start_synced(&self, view: &MemoryView, readers: &Readers) -> MemoryTracker {
        let mut t = self.start(view, readers);
        let mut scratch = Vec::new();
        if t.changed(view, readers, &mut scratch).is_err() {
            tracing::debug!("an instance went as its tracking started");
        }
        t
    }
}

enum State {
    /// One of the instance's [`Readers`], by id.
    WriteProtect(u64),
    /// XXH3 of each page at the last look.
    Hashing(Vec<u64>),
}

/// Those reading one instance's memory with write-protect, each with the
/// pages written since its own last look (a bit per page). The memory is
/// registered with the write tracker while any reader is.
#[derive(Debug, Default)]
pub struct Readers(Mutex<ReaderSets>);

#[derive(Debug, Default)]
struct ReaderSets {
    next: u64,
    sets: Vec<(u64, Vec<u64>)>,
}

impl Readers {
    /// A new reader, registering the memory with `wt` if it is the first;
    /// `None` when the instance is gone.
    fn join(&self, view: &MemoryView, wt: &Arc<WriteTracker>) -> std::io::Result<Option<u64>> {
        let mut r = lock(&self.0);
        if r.sets.is_empty() && !view.track_writes(wt)? {
            return Ok(None);
        }
        r.next += 1;
        let id = r.next;
        r.sets.push((id, Vec::new()));
        Ok(Some(id))
    }

    /// Takes the kernel's marks into every reader's set, then empties the
    /// set of `id` into `out`. False when the instance is gone; on a scan
    /// error every reader counts every page of `size` as written.
    fn take(
        &self,
        view: &MemoryView,
        id: u64,
        size: usize,
        out: &mut Vec<Range<usize>>,
    ) -> std::io::Result<bool> {
        let mut r = lock(&self.0);
        let mut written = Vec::new();
        let scanned = view.written(&mut written);
        if matches!(scanned, Ok(false)) {
            return Ok(false);
        }
        if scanned.is_err() {
            written = whole(size);
        }
        for (_, set) in &mut r.sets {
            for range in &written {
                for page in range.start / PAGE..range.end.div_ceil(PAGE) {
                    let (word, bit) = (page / 64, page % 64);
                    if set.len() <= word {
                        set.resize(word + 1, 0);
                    }
                    set[word] |= 1 << bit;
                }
            }
        }
        if let Some((_, set)) = r.sets.iter_mut().find(|(s, _)| *s == id) {
            for (word, bits) in std::mem::take(set).into_iter().enumerate() {
                let mut bits = bits;
                while bits != 0 {
                    let page = word * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    out.push(page * PAGE..(page + 1) * PAGE);
                }
            }
        }
        scanned.map(|_| true)
    }

    /// Removes reader `id`; the last one unregisters the memory.
    fn leave(&self, view: &MemoryView, id: u64) {
        let mut r = lock(&self.0);
        r.sets.retain(|(s, _)| *s != id);
        if r.sets.is_empty() {
            view.untrack_writes();
        }
    }
}

/// One instance's memory, tracked across rounds.
pub struct MemoryTracker {
    state: State,
    first: bool,
}

impl std::fmt::Debug for MemoryTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTracker")
            .field("first", &self.first)
            .finish_non_exhaustive()
    }
}

/// The instance went while it was being read.
#[derive(Debug, thiserror::Error)]
#[error("the instance is gone")]
pub struct Gone;

impl MemoryTracker {
    /// Whether this tracker write-protects (else it hashes).
    pub fn write_protects(&self) -> bool {
        matches!(self.state, State::WriteProtect(_))
    }

    /// The byte ranges of `[0, size)` to send now, coalesced and in order,
    /// `size` being the memory's size as `view` knows it: at the first
    /// call the pages that may not be zeros (the reader's copy starts
    /// zeroed: with write-protection the whole memory, which the caller
    /// reads once and sends without its zero pages; hashing, which reads
    /// it anyway, the pages that are not zeros), then the pages written
    /// since the call before. `scratch` holds a page-aligned read buffer
    /// between calls.
    pub fn changed(
        &mut self,
        view: &MemoryView,
        readers: &Readers,
        scratch: &mut Vec<u8>,
    ) -> Result<Vec<Range<usize>>, Gone> {
        let size = view.region().ok_or(Gone)?.size;
        let first = std::mem::replace(&mut self.first, false);
        match &mut self.state {
            State::WriteProtect(id) => {
                let mut written = Vec::new();
                match readers.take(view, *id, size, &mut written) {
                    Ok(true) => {}
                    Ok(false) => return Err(Gone),
                    Err(e) => {
                        tracing::warn!(error = %e, "page scan failed; sending the whole memory");
                        return Ok(whole(size));
                    }
                }
                if first {
                    // The marks were taken before the copy, so that a
                    // write during it is reported next time.
                    return Ok(whole(size));
                }
                Ok(coalesce(
                    written
                        .into_iter()
                        .map(|r| r.start.min(size)..r.end.min(size))
                        .filter(|r| !r.is_empty()),
                ))
            }
            State::Hashing(hashes) => {
                let pages = size / PAGE;
                let mut out = Vec::new();
                let zero = xxhash_rust::xxh3::xxh3_64(&[0u8; PAGE]);
                for_each_chunk(view, size, scratch, |offset, bytes| {
                    for (i, page) in bytes.chunks(PAGE).enumerate() {
                        let n = offset / PAGE + i;
                        let h = xxhash_rust::xxh3::xxh3_64(page);
                        // A page the reader has not had is zeros there.
                        let before = hashes.get(n).copied().unwrap_or(zero);
                        if (first || h != before) && (h != zero || hashes.get(n).is_some()) {
                            out.push(n * PAGE..(n + 1) * PAGE);
                        }
                        if n < hashes.len() {
                            hashes[n] = h;
                        } else {
                            hashes.push(h);
                        }
                    }
                })?;
                hashes.truncate(pages);
                Ok(coalesce(out.into_iter()))
            }
        }
    }

    /// Stops tracking (the instance may live on).
    pub fn stop(self, view: &MemoryView, readers: &Readers) {
        if let State::WriteProtect(id) = self.state {
            readers.leave(view, id);
        }
    }
}

/// Bytes read from memory at once: 1 MiB.
const READ_CHUNK: usize = 1 << 20;

/// Calls `f` with each chunk of `[0, size)` read through `view`.
fn for_each_chunk(
    view: &MemoryView,
    size: usize,
    scratch: &mut Vec<u8>,
    mut f: impl FnMut(usize, &[u8]),
) -> Result<(), Gone> {
    scratch.resize(READ_CHUNK, 0);
    let mut offset = 0;
    while offset < size {
        let n = READ_CHUNK.min(size - offset);
        if !view.read(offset, &mut scratch[..n]) {
            return Err(Gone);
        }
        f(offset, &scratch[..n]);
        offset += n;
    }
    Ok(())
}

/// `[0, size)` as the ranges to send (none when empty).
fn whole(size: usize) -> Vec<Range<usize>> {
    std::iter::once(0..size).filter(|r| !r.is_empty()).collect()
}

/// The runs of pages of `bytes` that are not all zeros, as ranges of it.
pub fn nonzero_runs(bytes: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        // A fold without an early exit, which the compiler vectorizes.
        let zero = |p: &[u8]| p.iter().fold(0u8, |acc, &b| acc | b) == 0;
        while at < bytes.len() && zero(&bytes[at..(at + PAGE).min(bytes.len())]) {
            at += PAGE;
        }
        if at >= bytes.len() {
            return None;
        }
        let start = at;
        while at < bytes.len() && !zero(&bytes[at..(at + PAGE).min(bytes.len())]) {
            at += PAGE;
        }
        Some(start..at.min(bytes.len()))
    })
}

/// Sorted ranges with touching ones merged.
fn coalesce(ranges: impl Iterator<Item = Range<usize>>) -> Vec<Range<usize>> {
    let mut v: Vec<Range<usize>> = ranges.collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page-aligned buffer standing in for an instance's memory.
    struct Mem {
        buf: Vec<u8>,
        pad: usize,
        view: MemoryView,
        readers: Readers,
    }

    impl Mem {
        fn new(pages: usize) -> Mem {
            let mut buf = vec![0u8; (pages + 1) * PAGE];
            let addr = buf.as_mut_ptr() as usize;
            let pad = (PAGE - addr % PAGE) % PAGE;
            let view = MemoryView::default();
            view.update(buf[pad..].as_mut_ptr(), pages * PAGE, pages * PAGE);
            Mem {
                buf,
                pad,
                view,
                readers: Readers::default(),
            }
        }

        fn write(&mut self, offset: usize, b: u8) {
            self.buf[self.pad + offset] = b;
        }
    }

    fn check(tracking: PageTracking) {
        let mut mem = Mem::new(64);
        let mut t = tracking.start(&mem.view, &mem.readers);
        let mut scratch = Vec::new();
        mem.write(5 * PAGE + 7, 1);
        mem.write(6 * PAGE, 2);
        mem.write(40 * PAGE + 100, 3);
        // First: the pages that may not be zeros (write-protect: all of
        // them, of which the caller sends the non-zero runs).
        let first = t.changed(&mem.view, &mem.readers, &mut scratch).unwrap();
        let nonzero = vec![5 * PAGE..7 * PAGE, 40 * PAGE..41 * PAGE];
        if t.write_protects() {
            assert_eq!(first, whole(64 * PAGE));
            let mut all = vec![0u8; 64 * PAGE];
            assert!(mem.view.read(0, &mut all));
            assert_eq!(nonzero_runs(&all).collect::<Vec<_>>(), nonzero);
        } else {
            assert_eq!(first, nonzero);
        }
        // Nothing written since.
        assert_eq!(
            t.changed(&mem.view, &mem.readers, &mut scratch).unwrap(),
            vec![]
        );
        // A page written back to zero is reported too.
        mem.write(40 * PAGE + 100, 0);
        mem.write(63 * PAGE + 4095, 9);
        assert_eq!(
            t.changed(&mem.view, &mem.readers, &mut scratch).unwrap(),
            vec![40 * PAGE..41 * PAGE, 63 * PAGE..64 * PAGE]
        );
        mem.view.close();
        assert!(
            t.changed(&mem.view, &mem.readers, &mut scratch).is_err(),
            "gone"
        );
        t.stop(&mem.view, &mem.readers);
    }

    /// Writes 4 bytes of its raw body at the offset its first 4 name;
    /// grows its memory by a page when the offset is past it.
    const POKE: &str = r#"(module
      (import "tensor" "input_read" (func $input_read (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1 64)
      (data (i32.const 8192) "image")
      (func (export "handle") (result i32)
        (drop (call $input_read (i32.const 0) (i32.const 0) (i32.const 8)))
        (if (i32.ge_u (i32.load (i32.const 0)) (i32.mul (memory.size) (i32.const 65536)))
          (then (drop (memory.grow (i32.const 1)))))
        (i32.store (i32.load (i32.const 0)) (i32.load (i32.const 4)))
        (i32.const 0)))"#;

    fn instance() -> crate::instance::WarmInstance {
        use std::collections::HashMap;
        use std::time::Duration;

        use crate::config::EngineLimits;
        use crate::engine::Runtime;
        use crate::instance::{InstanceSetup, WarmInstance};
        use crate::memory::{HostBudget, HostUsage};

        let rt = Runtime::new(
            EngineLimits {
                total_instances: 4,
                ..EngineLimits::default()
            },
            None,
        )
        .unwrap();
        let info = crate::wasm::inspect(&wat::parse_str(POKE).unwrap(), 1 << 20).unwrap();
        let module = rt.compile(&info.rewritten).unwrap();
        let pre = rt.linker().instantiate_pre(&module).unwrap();
        let setup = InstanceSetup {
            backend: Arc::new(tensor_wasm_kernels::CpuBackend::default()),
            assets: Arc::new(HashMap::new()),
            usage: Arc::new(crate::tensors::TenantUsage::new(1 << 30, 1 << 20)),
            host: Arc::new(HostUsage::new(u64::MAX, HostBudget::new(u64::MAX))),
            log: crate::logs::FunctionLog::new(1024),
            metrics: Arc::new(crate::metrics::Metrics::new("cpu", &[])),
            memory_limit: 64 * 65536,
            max_output_bytes: 1 << 20,
            max_error_message: 1024,
            max_table_elements: 1000,
        };
        WarmInstance::create(&pre, &setup, true, Duration::from_secs(10)).unwrap()
    }

    fn poke(inst: &mut crate::instance::WarmInstance, offset: u32, value: u32) {
        let mut body = offset.to_le_bytes().to_vec();
        body.extend_from_slice(&value.to_le_bytes());
        inst.invoke(
            crate::instance::Request {
                body: body.into(),
                ..Default::default()
            },
            std::time::Duration::from_secs(10),
            None,
        )
        .unwrap();
    }

    /// The memory of a real instance (the engine's pooling allocator, its
    /// copy-on-write image of data segments), written by the guest.
    fn check_instance(tracking: PageTracking) {
        let mut inst = instance();
        let shared = inst.shared().clone();
        let (view, readers) = (&shared.memory, &shared.readers);
        let mut t = tracking.start(view, readers);
        let mut scratch = Vec::new();
        poke(&mut inst, 20000, 7);
        let first = t.changed(view, readers, &mut scratch).unwrap();
        if t.write_protects() {
            assert_eq!(first, whole(65536), "the whole memory, read once");
            assert_eq!(
                nonzero_runs(&{
                    let mut all = vec![0u8; 65536];
                    assert!(view.read(0, &mut all));
                    all
                })
                .collect::<Vec<_>>(),
                vec![0..PAGE, 2 * PAGE..3 * PAGE, 4 * PAGE..5 * PAGE],
                "of which the caller sends the pages that are not zeros"
            );
        } else {
            assert_eq!(
                first,
                vec![0..PAGE, 2 * PAGE..3 * PAGE, 4 * PAGE..5 * PAGE],
                "the body at 0, the data segment at 8192, the poke at 20000"
            );
        }
        assert_eq!(t.changed(view, readers, &mut scratch).unwrap(), vec![]);
        // A write in the image's page, and one in a page grown since.
        poke(&mut inst, 8200, 1);
        poke(&mut inst, 65536 + 100, 2);
        let mut got = t.changed(view, readers, &mut scratch).unwrap();
        got.retain(|r| r.start != 0);
        assert_eq!(got, vec![2 * PAGE..3 * PAGE, 16 * PAGE..17 * PAGE]);
        let mut bytes = [0u8; 4];
        assert!(view.read(65536 + 100, &mut bytes));
        assert_eq!(u32::from_le_bytes(bytes), 2);
        t.stop(view, readers);
        drop(inst);
        assert!(
            !view.read(0, &mut bytes),
            "no read once the instance is gone"
        );
    }

    #[test]
    fn hashing_tracks_an_instances_memory() {
        check_instance(PageTracking::Hashing);
    }

    #[test]
    fn write_protect_tracks_an_instances_memory() {
        let tracking = PageTracking::open();
        if write_protect_expected() {
            check_instance(tracking);
        }
    }

    /// Two readers of one memory each see every page written since their
    /// own last look, though the kernel keeps one mark per page.
    fn check_two_readers(tracking: PageTracking) {
        let mut mem = Mem::new(16);
        let mut scratch = Vec::new();
        let mut a = tracking.start(&mem.view, &mem.readers);
        let mut b = tracking.start(&mem.view, &mem.readers);
        a.changed(&mem.view, &mem.readers, &mut scratch).unwrap();
        b.changed(&mem.view, &mem.readers, &mut scratch).unwrap();
        mem.write(3 * PAGE, 1);
        assert_eq!(
            a.changed(&mem.view, &mem.readers, &mut scratch).unwrap(),
            vec![3 * PAGE..4 * PAGE]
        );
        mem.write(9 * PAGE, 1);
        assert_eq!(
            b.changed(&mem.view, &mem.readers, &mut scratch).unwrap(),
            vec![3 * PAGE..4 * PAGE, 9 * PAGE..10 * PAGE],
            "b sees the page a's look took from the kernel"
        );
        assert_eq!(
            a.changed(&mem.view, &mem.readers, &mut scratch).unwrap(),
            vec![9 * PAGE..10 * PAGE]
        );
        // One reader going leaves the other tracking.
        a.stop(&mem.view, &mem.readers);
        mem.write(0, 5);
        assert_eq!(
            b.changed(&mem.view, &mem.readers, &mut scratch).unwrap(),
            vec![0..PAGE]
        );
        b.stop(&mem.view, &mem.readers);
    }

    #[test]
    fn hashing_serves_two_readers() {
        check_two_readers(PageTracking::Hashing);
    }

    #[test]
    fn write_protect_serves_two_readers() {
        if write_protect_expected() {
            check_two_readers(PageTracking::open());
        }
    }

    #[test]
    fn hashing_reports_the_pages_written() {
        check(PageTracking::Hashing);
    }

    /// Whether this process may use asynchronous write-protect: Linux 6.7
    /// or later, root (or unprivileged userfaultfd allowed), no seccomp
    /// filter.
    fn write_protect_expected() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok());
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let unfiltered = status
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "0"]));
        let allowed = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
            .is_ok_and(|s| s.trim() == "1")
            || status
                .lines()
                .any(|l| l.split_whitespace().eq(["Uid:", "0", "0", "0", "0"]));
        (major, minor) >= (6, 7) && unfiltered && allowed
    }

    #[test]
    fn write_protect_reports_the_pages_written_where_the_kernel_allows_it() {
        let tracking = PageTracking::open();
        if write_protect_expected() {
            assert!(
                matches!(tracking, PageTracking::WriteProtect(_)),
                "this kernel and process should offer write-protect tracking: {:?}",
                WriteTracker::open().err()
            );
            check(tracking);
        } else {
            assert!(matches!(tracking, PageTracking::Hashing));
        }
    }
}
