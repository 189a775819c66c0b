//! The executor's only `unsafe`: loading compiled modules from its cache,
//! mapping its own assets files, and lowering the priority of its guests'
//! threads.

#![allow(unsafe_code)]

use wasmtime::{Engine, Module};

/// Bytes that this executor serialized with `Module::serialize` and
/// authenticated since (see `engine::ModuleCache`).
#[derive(Debug)]
pub struct Authenticated<'a>(pub(crate) &'a [u8]);

/// Loads a compiled module.
pub fn deserialize_module(engine: &Engine, bytes: Authenticated<'_>) -> wasmtime::Result<Module> {
    // SAFETY: `Module::deserialize` is unsafe because it maps the bytes as
    // executable code without validating them. `Authenticated` can only be
    // built by the module cache after checking an HMAC, under a key that
    // never leaves this machine's state directory, over bytes this executor
    // wrote with `Module::serialize`; so these are our own compiler's output,
    // and wasmtime additionally refuses bytes from another version or with
    // other engine settings.
    unsafe { Module::deserialize(engine, bytes.0) }
}

/// Starts writing `file`'s dirty pages from `offset` on to disk, without
/// waiting: a later `fsync` then has little left to write. Best effort (an
/// error only means the `fsync` does it all).
pub fn start_writeback(file: &std::fs::File, offset: u64) {
    use std::os::fd::AsRawFd;
    let Ok(offset) = libc::off64_t::try_from(offset) else {
        return;
    };
    // SAFETY: `sync_file_range` reads no memory of ours; the descriptor is
    // open for the whole call (borrowed from `file`), and a length of 0
    // means "to the end of the file".
    let _ =
        unsafe { libc::sync_file_range(file.as_raw_fd(), offset, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// The calling thread's kernel id.
pub fn thread_id() -> libc::pid_t {
    // SAFETY: `gettid` takes nothing and cannot fail.
    unsafe { libc::gettid() }
}

/// Makes thread `tid` of this process `SCHED_IDLE`, for good (an
/// unprivileged process cannot bring it back). Best effort: a thread that
/// ended meanwhile is an error, ignored.
pub fn idle_thread(tid: libc::pid_t) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `sched_setscheduler` reads one `sched_param` through a pointer
    // to a live local. Lowering the priority of a thread of one's own
    // process needs no privilege; `tid` is one of ours, and a recycled id
    // could only be another of our threads the caller has stopped tracking.
    let _ = unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) };
}

/// A file mapped read-only.
#[derive(Debug)]
pub struct MappedFile(memmap2::Mmap);

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Maps `file` read-only. For the executor's own content-addressed files
/// (assets), which nothing writes after they are renamed into place.
pub fn map_readonly(file: &std::fs::File) -> std::io::Result<MappedFile> {
    // SAFETY: a mapping is unsafe because another process could change or
    // truncate the file while it is mapped, changing bytes behind shared
    // references (or faulting on a truncated page). The files mapped here
    // live in the executor's state directory under names that are their
    // contents' SHA-256; the executor writes each once, syncs it, renames it
    // into place and never opens it for writing again, and removes it only
    // by unlinking, which leaves an existing mapping intact. The state
    // directory belongs to the executor alone (`docs/CONFIG.md`).
    unsafe { memmap2::Mmap::map(file) }.map(MappedFile)
}

/// A live instance's linear memory as seen from outside the instance: read
/// while the guest may be running (the rounds of a migration), and never
/// once the instance is going.
#[derive(Debug, Default)]
pub struct MemoryView {
    state: std::sync::RwLock<ViewState>,
}

#[derive(Debug, Default)]
struct ViewState {
    region: Option<Region>,
    /// The tracker its pages are registered with, while they are.
    tracker: Option<std::sync::Arc<WriteTracker>>,
}

/// Where a memory lives: its base address, the bytes known accessible, and
/// the bytes reserved for it (its limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub base: usize,
    pub size: usize,
    pub reserved: usize,
}

impl Region {
    /// The reserved bytes, rounded up to whole pages: what is registered.
    fn tracked_len(&self) -> usize {
        self.reserved.div_ceil(4096) * 4096
    }
}

impl MemoryView {
    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, ViewState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, ViewState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Records where the memory is, as its owner sees it after a call: it
    /// never shrinks, so bytes below `size` stay readable until
    /// [`close`](Self::close).
    pub fn update(&self, base: *mut u8, size: usize, reserved: usize) {
        self.write_state().region = Some(Region {
            base: base as usize,
            size,
            reserved: reserved.max(size),
        });
    }

    /// The memory's region, unless the instance is gone.
    pub fn region(&self) -> Option<Region> {
        self.read_state().region
    }

    /// Copies `out.len()` bytes at `offset`; false when the instance is
    /// gone or the range lies past the bytes known accessible.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        let guard = self.read_state();
        let Some(r) = guard.region else {
            return false;
        };
        if offset.checked_add(out.len()).is_none_or(|end| end > r.size) {
            return false;
        }
        // SAFETY: `[base, base + size)` is the instance's linear memory, in
        // the pooling allocator's slot for it: mapped and accessible, since
        // a wasm memory never shrinks, for as long as the instance lives.
        // The instance's owner calls `close` (taking the write lock this
        // read lock excludes) before the instance and its slot go, so the
        // slot cannot be unmapped or handed to another instance during this
        // copy. The guest (or a host call on its behalf) may write these
        // bytes while they are copied; the copy is then torn, never out of
        // bounds, and is only ever used as bytes: every reader tracks the
        // pages written since it copied them and copies them again, and the
        // last copy is taken with the instance stopped.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (r.base + offset) as *const u8,
                out.as_mut_ptr(),
                out.len(),
            );
        }
        true
    }

    /// Registers the memory's reserved pages with `tracker`, all marked
    /// clean; false when the instance is gone.
    pub fn track_writes(&self, tracker: &std::sync::Arc<WriteTracker>) -> std::io::Result<bool> {
        let mut st = self.write_state();
        let Some(r) = st.region else {
            return Ok(false);
        };
        if st.tracker.is_none() {
            tracker.track(r.base, r.tracked_len())?;
            st.tracker = Some(tracker.clone());
        }
        Ok(true)
    }

    /// Appends the byte ranges (offsets into the memory) written since the
    /// last call, or since [`track_writes`](Self::track_writes), and marks
    /// them clean; false when the instance is gone.
    pub fn written(&self, out: &mut Vec<std::ops::Range<usize>>) -> std::io::Result<bool> {
        let st = self.read_state();
        let (Some(r), Some(t)) = (st.region, &st.tracker) else {
            return Ok(false);
        };
        // Only the accessible bytes: a page past them cannot have been
        // written (wasm memory never shrinks, and one grown since the last
        // scan keeps its mark until a scan covers it). The whole
        // reservation is registered; scanning it all would cost with the
        // memory's limit, not its size.
        let mut pages = Vec::new();
        t.written(r.base, r.size.div_ceil(4096) * 4096, &mut pages)?;
        out.extend(pages.into_iter().map(|p| p.start - r.base..p.end - r.base));
        Ok(true)
    }

    /// Stops tracking writes (the instance may live on).
    pub fn untrack_writes(&self) {
        let mut st = self.write_state();
        if let (Some(r), Some(t)) = (st.region, st.tracker.take())
            && let Err(e) = t.untrack(r.base, r.tracked_len())
        {
            tracing::debug!(error = %e, "untracking an instance's memory");
        }
    }

    /// The instance is going: no read starts after this returns, none is
    /// under way, and its pages are no longer registered with any tracker
    /// (its slot may go to another instance next).
    pub fn close(&self) {
        let mut st = self.write_state();
        if let (Some(r), Some(t)) = (st.region, st.tracker.take())
            && let Err(e) = t.untrack(r.base, r.tracked_len())
        {
            tracing::warn!(error = %e, "untracking a closing instance's memory");
        }
        st.region = None;
    }
}

/// Tracks the pages written in ranges of this process's memory, through a
/// userfaultfd in asynchronous write-protect mode (Linux 6.7 and later):
/// the kernel marks a page written at its first write after the last scan,
/// with no fault for anyone to handle, and `PAGEMAP_SCAN` reads the marks
/// and write-protects the pages again in one call.
#[derive(Debug)]
pub struct WriteTracker {
    uffd: std::os::fd::OwnedFd,
    pagemap: std::fs::File,
}

mod uapi {
    //! Constants and structs of `linux/userfaultfd.h` and `linux/fs.h`
    //! (6.7), which the libc crate does not all carry yet.
    const fn iowr(ty: u64, nr: u64, size: usize) -> u64 {
        (3 << 30) | ((size as u64) << 16) | (ty << 8) | nr
    }
    const fn ior(ty: u64, nr: u64, size: usize) -> u64 {
        (2 << 30) | ((size as u64) << 16) | (ty << 8) | nr
    }

    pub const UFFD_API: u64 = 0xAA;
    pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;
    pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
    pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
    pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
    pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

    #[repr(C)]
    #[derive(Default)]
    pub struct UffdioApi {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    pub struct UffdioRange {
        pub start: u64,
        pub len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    pub struct UffdioRegister {
        pub range: UffdioRange,
        pub mode: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    pub struct UffdioWriteprotect {
        pub range: UffdioRange,
        pub mode: u64,
    }
    pub const UFFDIO_API: u64 = iowr(UFFD_API, 0x3F, size_of::<UffdioApi>());
    pub const UFFDIO_REGISTER: u64 = iowr(UFFD_API, 0x00, size_of::<UffdioRegister>());
    pub const UFFDIO_UNREGISTER: u64 = ior(UFFD_API, 0x01, size_of::<UffdioRange>());
    pub const UFFDIO_WRITEPROTECT: u64 = iowr(UFFD_API, 0x06, size_of::<UffdioWriteprotect>());

    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    pub struct PageRegion {
        pub start: u64,
        pub end: u64,
        pub categories: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    pub struct PmScanArg {
        pub size: u64,
        pub flags: u64,
        pub start: u64,
        pub end: u64,
        pub walk_end: u64,
        pub vec: u64,
        pub vec_len: u64,
        pub max_pages: u64,
        pub category_inverted: u64,
        pub category_mask: u64,
        pub category_anyof_mask: u64,
        pub return_mask: u64,
    }
    pub const PAGEMAP_SCAN: u64 = iowr(b'f' as u64, 16, size_of::<PmScanArg>());
    pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
    pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
    pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
}

/// Regions one `PAGEMAP_SCAN` call returns at most; it is called again
/// from where it stopped.
const SCAN_REGIONS: usize = 1024;

impl WriteTracker {
    /// A tracker, or why this kernel or sandbox offers none (no
    /// userfaultfd, no asynchronous write-protect, no `PAGEMAP_SCAN`).
    pub fn open() -> std::io::Result<WriteTracker> {
        use std::os::fd::FromRawFd;
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes only flags and returns a
        // new file descriptor (or -1); nothing is read or written through
        // pointers. Without the privilege to catch kernel-mode faults,
        // user-mode-only faults are all this tracker needs (a write-protect
        // fault in asynchronous mode is resolved by the kernel either way).
        let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            // SAFETY: as above.
            fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | uapi::UFFD_USER_MODE_ONLY) };
        }
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor the kernel just returned to us and
        // nothing else owns.
        let uffd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as libc::c_int) };
        let wanted = uapi::UFFD_FEATURE_WP_ASYNC
            | uapi::UFFD_FEATURE_WP_UNPOPULATED
            | uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        let mut api = uapi::UffdioApi {
            api: uapi::UFFD_API,
            features: wanted,
            ioctls: 0,
        };
        ioctl(&uffd, uapi::UFFDIO_API, &mut api)?;
        if api.features & wanted != wanted {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the kernel lacks asynchronous write-protect",
            ));
        }
        let pagemap = std::fs::File::open("/proc/self/pagemap")?;
        let t = WriteTracker { uffd, pagemap };
        // PAGEMAP_SCAN (6.7) on an empty range: ENOTTY where it is missing.
        t.scan(0, 0, &mut Vec::new())?;
        Ok(t)
    }

    /// Starts tracking `[start, start + len)` (page-aligned), every page
    /// marked clean.
    pub fn track(&self, start: usize, len: usize) -> std::io::Result<()> {
        let range = uapi::UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        let mut reg = uapi::UffdioRegister {
            range,
            mode: uapi::UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(&self.uffd, uapi::UFFDIO_REGISTER, &mut reg)?;
        let mut wp = uapi::UffdioWriteprotect {
            range,
            mode: uapi::UFFDIO_WRITEPROTECT_MODE_WP,
        };
        if let Err(e) = ioctl(&self.uffd, uapi::UFFDIO_WRITEPROTECT, &mut wp) {
            let _ = self.untrack(start, len);
            return Err(e);
        }
        Ok(())
    }

    /// Appends to `out` the page ranges of `[start, start + len)` written
    /// since they were last tracked or scanned, and marks them clean.
    pub fn written(
        &self,
        start: usize,
        len: usize,
        out: &mut Vec<std::ops::Range<usize>>,
    ) -> std::io::Result<()> {
        self.scan(start, len, out)
    }

    fn scan(
        &self,
        start: usize,
        len: usize,
        out: &mut Vec<std::ops::Range<usize>>,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let end = start + len;
        let mut from = start;
        let mut regions = vec![uapi::PageRegion::default(); SCAN_REGIONS];
        loop {
            let mut arg = uapi::PmScanArg {
                size: size_of::<uapi::PmScanArg>() as u64,
                flags: uapi::PM_SCAN_WP_MATCHING | uapi::PM_SCAN_CHECK_WPASYNC,
                start: from as u64,
                end: end as u64,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                category_mask: uapi::PAGE_IS_WRITTEN,
                return_mask: uapi::PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: `arg` is a valid `pm_scan_arg` whose `vec` points at
            // `regions`, `vec_len` entries long, which the kernel fills and
            // which outlive the call; the range is this process's own.
            let n = unsafe {
                libc::ioctl(
                    self.pagemap.as_raw_fd(),
                    uapi::PAGEMAP_SCAN as _,
                    &mut arg as *mut uapi::PmScanArg,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for r in &regions[..n as usize] {
                out.push(r.start as usize..r.end as usize);
            }
            if arg.walk_end as usize >= end || (n as usize) < regions.len() {
                return Ok(());
            }
            from = arg.walk_end as usize;
        }
    }

    /// Stops tracking `[start, start + len)`.
    pub fn untrack(&self, start: usize, len: usize) -> std::io::Result<()> {
        let mut range = uapi::UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        ioctl(&self.uffd, uapi::UFFDIO_UNREGISTER, &mut range)
    }
}

/// One userfaultfd ioctl with its argument struct.
fn ioctl<T>(fd: &std::os::fd::OwnedFd, request: u64, arg: &mut T) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: every request passed here is a userfaultfd ioctl whose
    // argument is the `repr(C)` struct of `uapi` it is paired with at the
    // call site, valid for reads and writes for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
