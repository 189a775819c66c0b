//! Device discovery: which GPUs and MIG slices this machine has, through
//! NVML, so that `tensor-wasm up` can start one executor per device.
//!
//! # Why it looks like this
//!
//! - **Bind by UUID, never by index.** NVML numbers GPUs in PCI bus order;
//!   CUDA numbers them fastest-first unless `CUDA_DEVICE_ORDER=PCI_BUS_ID`,
//!   and NVML ignores `CUDA_VISIBLE_DEVICES` altogether. An index that names
//!   GPU 0 here may name another GPU inside the executor. Every
//!   [`DeviceInfo`] therefore carries the UUID that the executor must be
//!   started with ([`DeviceInfo::cuda_visible_devices`]): `GPU-…` for a whole
//!   GPU, `MIG-…` for a slice. A CUDA process sees exactly one MIG slice, and
//!   only when it is named this way before the first CUDA call.
//! - **Counting MIG slices.** `nvmlDeviceGetMaxMigDeviceCount` is the number
//!   of *slots*, not the number of slices that exist: a GPU split into one
//!   3g and one 2g slice still reports 7. Slices are found by trying every
//!   slot up to that maximum and skipping the empty ones (`NotFound`); the
//!   populated slots need not be contiguous.
//! - **Current, not pending, MIG mode.** A MIG mode change only takes effect
//!   after a GPU reset; until then the GPU still runs (and must be used) in
//!   its current mode. A GPU whose *current* mode is enabled is reported as
//!   its slices only (its whole-GPU handle cannot run CUDA work); every other
//!   GPU, including one with MIG merely pending, as a whole GPU.
//! - **Read-only.** Discovery only reads. It never changes MIG mode, clocks
//!   or any other device setting: operators own those, and on shared
//!   machines a stray change would break other tenants' work.
//! - **Degrade, don't fail.** A machine with no NVIDIA driver has no GPUs
//!   (`discover_system` returns an empty list and the caller falls back to
//!   CPU executors); a device that errors is logged and skipped, so one bad
//!   GPU does not hide the healthy ones.
//!
//! The logic lives in [`discover`], a pure function over the [`NvmlSource`]
//! trait, so it is tested with fake devices (including MIG layouts and
//! driver versions no single machine has); [`NvmlSystem`] is the real
//! source.

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::OnceLock;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use serde::{Deserialize, Serialize};

/// What an executor runs on: a whole GPU or one MIG slice of a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Gpu,
    MigSlice,
}

/// One device an executor can be bound to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub kind: DeviceKind,
    /// NVML index of the physical GPU (the parent, for a MIG slice). Used
    /// only for stable names (`gpu0`); never to bind a process to a device.
    pub gpu_index: u32,
    /// NVML UUID: `GPU-…` for a whole GPU, `MIG-…` for a slice.
    pub uuid: String,
    /// Product name as NVML reports it (for a slice, it includes the
    /// profile, e.g. `NVIDIA H100 80GB HBM3 MIG 1g.10gb`).
    pub name: String,
    /// MIG profile (`1g.18gb`, `3g.71gb`, …) of a slice; `None` for a GPU.
    pub mig_profile: Option<String>,
    /// Device memory, bytes: the slice's own memory for a MIG slice.
    pub memory_total: u64,
    /// Memory in use at discovery time, bytes (includes the driver's
    /// reservation).
    pub memory_used: u64,
    /// UUID of the physical GPU a MIG slice belongs to; `None` for a GPU.
    pub parent_uuid: Option<String>,
}

/// Hex digits of a MIG UUID that name its executor: 8 hex digits (32 bits)
/// keep ids short while a collision among the ≤ 7 slices of a GPU, or the
/// few dozen of a machine, stays negligible.
const MIG_ID_HEX_DIGITS: usize = 8;

impl DeviceInfo {
    /// The executor id (`ARCHITECTURE.md`, "Executor ids"), stable across
    /// restarts: `gpu<N>` for a whole GPU (its NVML index, which follows
    /// PCI order), and `mig-<first 8 hex digits of the UUID after "MIG-">`
    /// for a slice (slice indices change when slices are recreated; UUIDs
    /// name them).
    ///
    /// Drivers before R470 used `MIG-GPU-<gpu uuid>/<gi>/<ci>` UUIDs, whose
    /// leading digits are the *parent's* and so shared by every slice; those
    /// get `mig-<parent uuid8>-<gi>-<ci>` instead so that ids stay unique.
    pub fn executor_id(&self) -> String {
        match self.kind {
            DeviceKind::Gpu => format!("gpu{}", self.gpu_index),
            DeviceKind::MigSlice => {
                let rest = self.uuid.strip_prefix("MIG-").unwrap_or(&self.uuid);
                if let Some(legacy) = rest.strip_prefix("GPU-") {
                    let mut parts = legacy.split('/');
                    let parent = hex_prefix(parts.next().unwrap_or_default());
                    let tail: Vec<&str> = parts.collect();
                    if tail.is_empty() {
                        format!("mig-{parent}")
                    } else {
                        format!("mig-{parent}-{}", tail.join("-"))
                    }
                } else {
                    format!("mig-{}", hex_prefix(rest))
                }
            }
        }
    }

    /// The value to put in the executor's `CUDA_VISIBLE_DEVICES`: the UUID
    /// itself, never an index (see the module docs).
    pub fn cuda_visible_devices(&self) -> &str {
        &self.uuid
    }

    /// Whether this is the device whose UUID CUDA reports as `hex` (the
    /// 16 bytes in NVML's `8-4-4-4-12` text form, without the `GPU-` or
    /// `MIG-` prefix NVML adds; any case).
    pub fn has_cuda_uuid(&self, hex: &str) -> bool {
        let own = self
            .uuid
            .strip_prefix("GPU-")
            .or_else(|| self.uuid.strip_prefix("MIG-"))
            .unwrap_or(&self.uuid);
        own.eq_ignore_ascii_case(hex)
    }
}

/// CUDA's 16 UUID bytes in NVML's text form without its prefix:
/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase.
pub fn uuid_text(bytes: &[u8; 16]) -> String {
    let (a, rest) = bytes.split_at(4);
    let (b, rest) = rest.split_at(2);
    let (c, rest) = rest.split_at(2);
    let (d, e) = rest.split_at(2);
    [a, b, c, d, e].map(hex::encode).join("-")
}

/// The first [`MIG_ID_HEX_DIGITS`] hex digits of `s`, lowercased, skipping
/// dashes.
fn hex_prefix(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_hexdigit)
        .take(MIG_ID_HEX_DIGITS)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// The MIG profile in a slice's NVML name: the token after `MIG`
/// (`NVIDIA H100 80GB HBM3 MIG 1g.10gb` → `1g.10gb`, also `1g.10gb+me` and
/// compute-instance profiles such as `1c.3g.40gb`), or else the last token
/// shaped like `<n>g.<m>gb`.
pub fn parse_mig_profile(name: &str) -> Option<String> {
    let tokens: Vec<&str> = name.split_whitespace().collect();
    let after_mig = tokens
        .iter()
        .position(|t| t.eq_ignore_ascii_case("MIG"))
        .and_then(|i| tokens.get(i + 1))
        .filter(|t| looks_like_profile(t));
    after_mig
        .or_else(|| tokens.iter().rev().find(|t| looks_like_profile(t)))
        .map(|t| (*t).to_owned())
}

/// `<digits>g.<digits>gb`, optionally with a `<digits>c.` prefix and a `+…`
/// suffix (`+me`, `+gfx`).
fn looks_like_profile(token: &str) -> bool {
    let base = token.split('+').next().unwrap_or_default();
    let mut parts: Vec<&str> = base.split('.').collect();
    if parts.len() == 3 {
        // Compute-instance profile: `<n>c.<n>g.<m>gb`.
        let ci = parts.remove(0);
        if !digits_then(ci, "c") {
            return false;
        }
    }
    parts.len() == 2 && digits_then(parts[0], "g") && digits_then(parts[1], "gb")
}

/// `s` is one or more ASCII digits followed by exactly `suffix`.
fn digits_then(s: &str, suffix: &str) -> bool {
    s.strip_suffix(suffix)
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Device memory as NVML reports it, bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryUsage {
    pub total: u64,
    pub used: u64,
}

/// A GPU's MIG mode: `current` is what it runs now, `pending` what it will
/// run after the next reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigModeState {
    pub current: bool,
    pub pending: bool,
}

/// The read-only NVML calls discovery needs, so that its logic can run
/// against fake devices. Every method only reads; implementations must
/// never change device state.
pub trait NvmlSource {
    /// Number of physical GPUs. An error here is fatal to discovery.
    fn device_count(&self) -> Result<u32, NvmlError>;

    /// The physical GPU at NVML `index` (`0..device_count()`).
    fn device(&self, index: u32) -> Result<Box<dyn GpuSource + '_>, NvmlError>;
}

/// One physical GPU.
pub trait GpuSource {
    fn uuid(&self) -> Result<String, NvmlError>;
    fn name(&self) -> Result<String, NvmlError>;
    fn memory(&self) -> Result<MemoryUsage, NvmlError>;
    /// MIG mode; `Err(NotSupported)` on GPUs without MIG.
    fn mig_mode(&self) -> Result<MigModeState, NvmlError>;
    /// The number of MIG *slots*: an upper bound, not the slices present.
    fn max_mig_device_count(&self) -> Result<u32, NvmlError>;
    /// The slice in slot `index`, or `Ok(None)` when the slot is empty
    /// (NVML's `NotFound`).
    fn mig_device(&self, index: u32) -> Result<Option<Box<dyn MigSource + '_>>, NvmlError>;
}

/// One MIG slice.
pub trait MigSource {
    fn uuid(&self) -> Result<String, NvmlError>;
    fn name(&self) -> Result<String, NvmlError>;
    fn memory(&self) -> Result<MemoryUsage, NvmlError>;
}

/// Discovery failed as a whole (per-device failures are only logged).
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("NVML could not count GPUs")]
    DeviceCount(#[source] NvmlError),
}

/// Every device an executor can run on, in NVML order (slices in slot
/// order after their GPU's index). See the module docs for the rules.
pub fn discover(source: &dyn NvmlSource) -> Result<Vec<DeviceInfo>, DiscoveryError> {
    let count = source.device_count().map_err(DiscoveryError::DeviceCount)?;
    let mut devices = Vec::new();
    for index in 0..count {
        if let Err(err) = discover_gpu(source, index, &mut devices) {
            tracing::warn!(gpu_index = index, error = %err, "skipping GPU: NVML query failed");
        }
    }
    Ok(devices)
}

/// Appends GPU `index` (or its MIG slices) to `out`. An error returned here
/// means nothing of this GPU was appended; a failing MIG slice is logged and
/// skipped on its own, without returning.
fn discover_gpu(
    source: &dyn NvmlSource,
    index: u32,
    out: &mut Vec<DeviceInfo>,
) -> Result<(), NvmlError> {
    let gpu = source.device(index)?;
    let uuid = gpu.uuid()?;
    let mig = match gpu.mig_mode() {
        Ok(mode) => mode,
        // Not MIG-capable (most GPUs), or a driver too old to know MIG.
        Err(NvmlError::NotSupported | NvmlError::FunctionNotFound) => MigModeState {
            current: false,
            pending: false,
        },
        Err(err) => return Err(err),
    };
    if mig.current != mig.pending {
        tracing::info!(
            gpu_index = index,
            %uuid,
            current = mig.current,
            pending = mig.pending,
            "MIG mode change is pending a GPU reset; using the current mode"
        );
    }
    if !mig.current {
        let memory = gpu.memory()?;
        out.push(DeviceInfo {
            kind: DeviceKind::Gpu,
            gpu_index: index,
            name: gpu.name()?,
            uuid,
            mig_profile: None,
            memory_total: memory.total,
            memory_used: memory.used,
            parent_uuid: None,
        });
        return Ok(());
    }

    let slots = gpu.max_mig_device_count()?;
    let before = out.len();
    for slot in 0..slots {
        match mig_slice(gpu.as_ref(), index, &uuid, slot) {
            Ok(Some(info)) => out.push(info),
            Ok(None) => {}
            Err(err) => tracing::warn!(
                gpu_index = index,
                mig_slot = slot,
                error = %err,
                "skipping MIG slice: NVML query failed"
            ),
        }
    }
    if out.len() == before {
        tracing::info!(
            gpu_index = index,
            %uuid,
            "MIG is enabled but no slice exists; the GPU gets no executor"
        );
    }
    Ok(())
}

/// The slice in `slot` of a MIG-enabled GPU, or `None` for an empty slot.
fn mig_slice(
    gpu: &dyn GpuSource,
    gpu_index: u32,
    parent_uuid: &str,
    slot: u32,
) -> Result<Option<DeviceInfo>, NvmlError> {
    let Some(slice) = gpu.mig_device(slot)? else {
        return Ok(None);
    };
    let name = slice.name()?;
    let memory = slice.memory()?;
    Ok(Some(DeviceInfo {
        kind: DeviceKind::MigSlice,
        gpu_index,
        uuid: slice.uuid()?,
        mig_profile: parse_mig_profile(&name),
        name,
        memory_total: memory.total,
        memory_used: memory.used,
        parent_uuid: Some(parent_uuid.to_owned()),
    }))
}

/// The real [`NvmlSource`]: one initialized NVML library. Devices borrow
/// it, so keep one for the life of the process.
pub struct NvmlSystem {
    nvml: Nvml,
}

impl fmt::Debug for NvmlSystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NvmlSystem").finish_non_exhaustive()
    }
}

impl NvmlSystem {
    /// Loads `libnvidia-ml.so.1` and initializes NVML. Fails (never panics)
    /// when there is no NVIDIA driver.
    pub fn init() -> Result<Self, NvmlError> {
        Ok(NvmlSystem {
            nvml: Nvml::init()?,
        })
    }
}

impl NvmlSource for NvmlSystem {
    fn device_count(&self) -> Result<u32, NvmlError> {
        self.nvml.device_count()
    }

    fn device(&self, index: u32) -> Result<Box<dyn GpuSource + '_>, NvmlError> {
        Ok(Box::new(NvmlDevice(self.nvml.device_by_index(index)?)))
    }
}

/// A GPU or MIG handle of the real NVML (NVML uses one handle type for both).
struct NvmlDevice<'nvml>(nvml_wrapper::Device<'nvml>);

fn memory_of(device: &nvml_wrapper::Device<'_>) -> Result<MemoryUsage, NvmlError> {
    let info = device.memory_info()?;
    Ok(MemoryUsage {
        total: info.total,
        used: info.used,
    })
}

impl GpuSource for NvmlDevice<'_> {
    fn uuid(&self) -> Result<String, NvmlError> {
        self.0.uuid()
    }

    fn name(&self) -> Result<String, NvmlError> {
        self.0.name()
    }

    fn memory(&self) -> Result<MemoryUsage, NvmlError> {
        memory_of(&self.0)
    }

    fn mig_mode(&self) -> Result<MigModeState, NvmlError> {
        /// `NVML_DEVICE_MIG_ENABLE` in nvml.h.
        const MIG_ENABLED: u32 = 1;
        let mode = self.0.mig_mode()?;
        Ok(MigModeState {
            current: mode.current == MIG_ENABLED,
            pending: mode.pending == MIG_ENABLED,
        })
    }

    fn max_mig_device_count(&self) -> Result<u32, NvmlError> {
        // nvml-wrapper's `mig_device_count` wraps
        // `nvmlDeviceGetMaxMigDeviceCount`: the slot count.
        self.0.mig_device_count()
    }

    fn mig_device(&self, index: u32) -> Result<Option<Box<dyn MigSource + '_>>, NvmlError> {
        match self.0.mig_device_by_index(index) {
            Ok(device) => Ok(Some(Box::new(NvmlDevice(device)))),
            Err(NvmlError::NotFound) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

impl MigSource for NvmlDevice<'_> {
    fn uuid(&self) -> Result<String, NvmlError> {
        self.0.uuid()
    }

    fn name(&self) -> Result<String, NvmlError> {
        self.0.name()
    }

    fn memory(&self) -> Result<MemoryUsage, NvmlError> {
        memory_of(&self.0)
    }
}

/// The process's NVML, initialized on first use; `None` when there is no
/// driver. One instance for the process: NVML init costs tens of
/// milliseconds and callers (health reports) ask repeatedly.
static SYSTEM: OnceLock<Option<NvmlSystem>> = OnceLock::new();

/// The GPUs and MIG slices of this machine. Empty when NVML is missing
/// (no driver: one info line is logged, once) or cannot count devices (a
/// warning); the caller then falls back to CPU executors. Never panics.
pub fn discover_system() -> Vec<DeviceInfo> {
    let system = SYSTEM.get_or_init(|| match NvmlSystem::init() {
        Ok(system) => Some(system),
        Err(err) => {
            tracing::info!(error = %err, "NVML unavailable (no NVIDIA driver?); no GPUs discovered");
            None
        }
    });
    let Some(system) = system else {
        return Vec::new();
    };
    match discover(system) {
        Ok(devices) => devices,
        Err(DiscoveryError::DeviceCount(err)) => {
            tracing::warn!(error = %err, "NVML could not count GPUs; no GPUs discovered");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// How a fake call answers: a value, or an NVML error made fresh on
    /// each call (`NvmlError` is not `Clone`).
    #[derive(Clone, Debug)]
    enum Fake<T> {
        Ok(T),
        NotSupported,
        GpuLost,
    }

    impl<T: Clone> Fake<T> {
        fn get(&self) -> Result<T, NvmlError> {
            match self {
                Fake::Ok(v) => Ok(v.clone()),
                Fake::NotSupported => Err(NvmlError::NotSupported),
                Fake::GpuLost => Err(NvmlError::GpuLost),
            }
        }
    }

    #[derive(Clone, Debug)]
    struct FakeMig {
        uuid: Fake<String>,
        name: String,
        memory: MemoryUsage,
    }

    #[derive(Clone, Debug)]
    struct FakeGpu {
        handle: Fake<()>,
        uuid: String,
        name: String,
        memory: MemoryUsage,
        mig_mode: Fake<MigModeState>,
        max_mig: u32,
        /// Slot → slice; a missing slot answers NotFound.
        slots: Vec<(u32, FakeMig)>,
    }

    #[derive(Debug, Default)]
    struct FakeNvml {
        count: Option<u32>,
        gpus: Vec<FakeGpu>,
    }

    impl NvmlSource for FakeNvml {
        fn device_count(&self) -> Result<u32, NvmlError> {
            Ok(self.count.unwrap_or(self.gpus.len() as u32))
        }

        fn device(&self, index: u32) -> Result<Box<dyn GpuSource + '_>, NvmlError> {
            let gpu = self.gpus.get(index as usize).ok_or(NvmlError::InvalidArg)?;
            gpu.handle.get()?;
            Ok(Box::new(gpu.clone()))
        }
    }

    impl GpuSource for FakeGpu {
        fn uuid(&self) -> Result<String, NvmlError> {
            Ok(self.uuid.clone())
        }
        fn name(&self) -> Result<String, NvmlError> {
            Ok(self.name.clone())
        }
        fn memory(&self) -> Result<MemoryUsage, NvmlError> {
            Ok(self.memory)
        }
        fn mig_mode(&self) -> Result<MigModeState, NvmlError> {
            self.mig_mode.get()
        }
        fn max_mig_device_count(&self) -> Result<u32, NvmlError> {
            Ok(self.max_mig)
        }
        fn mig_device(&self, index: u32) -> Result<Option<Box<dyn MigSource + '_>>, NvmlError> {
            assert!(index < self.max_mig, "slot {index} beyond the maximum");
            Ok(self
                .slots
                .iter()
                .find(|(slot, _)| *slot == index)
                .map(|(_, mig)| Box::new(mig.clone()) as Box<dyn MigSource>))
        }
    }

    impl MigSource for FakeMig {
        fn uuid(&self) -> Result<String, NvmlError> {
            self.uuid.get()
        }
        fn name(&self) -> Result<String, NvmlError> {
            Ok(self.name.clone())
        }
        fn memory(&self) -> Result<MemoryUsage, NvmlError> {
            Ok(self.memory)
        }
    }

    fn gpu(n: u32) -> FakeGpu {
        FakeGpu {
            handle: Fake::Ok(()),
            uuid: format!("GPU-{n}aaaaaaa-1111-2222-3333-444444444444"),
            name: "NVIDIA H200".to_owned(),
            memory: MemoryUsage {
                total: 141 * GIB,
                used: GIB / 2,
            },
            mig_mode: Fake::Ok(MigModeState {
                current: false,
                pending: false,
            }),
            max_mig: 7,
            slots: Vec::new(),
        }
    }

    fn mig(uuid: &str, profile: &str, total: u64) -> FakeMig {
        FakeMig {
            uuid: Fake::Ok(uuid.to_owned()),
            name: format!("NVIDIA H200 MIG {profile}"),
            memory: MemoryUsage { total, used: 0 },
        }
    }

    fn mig_enabled() -> Fake<MigModeState> {
        Fake::Ok(MigModeState {
            current: true,
            pending: true,
        })
    }

    #[test]
    fn cuda_uuids_match_nvml_names() {
        let bytes: [u8; 16] = [
            0x9a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6, 0xd7,
            0xe8, 0xf9,
        ];
        let text = uuid_text(&bytes);
        assert_eq!(text, "9a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9");
        let mut split = gpu(1);
        split.mig_mode = mig_enabled();
        split.slots = vec![(
            2,
            mig(
                "MIG-9A1B2C3D-4E5F-6071-8293-A4B5C6D7E8F9",
                "1g.18gb",
                17 * GIB,
            ),
        )];
        let devices = discover(&FakeNvml {
            count: None,
            gpus: vec![gpu(0), split],
        })
        .unwrap();
        let found: Vec<_> = devices.iter().filter(|d| d.has_cuda_uuid(&text)).collect();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, DeviceKind::MigSlice);
        assert_eq!(found[0].mig_profile.as_deref(), Some("1g.18gb"));
        let whole = &devices[0];
        let own = whole.uuid.strip_prefix("GPU-").unwrap();
        assert!(whole.has_cuda_uuid(own) && !whole.has_cuda_uuid(&text));
    }

    #[test]
    fn no_devices() {
        assert_eq!(discover(&FakeNvml::default()).unwrap(), vec![]);
    }

    #[test]
    fn two_whole_gpus() {
        let source = FakeNvml {
            gpus: vec![gpu(0), gpu(1)],
            ..FakeNvml::default()
        };
        let devices = discover(&source).unwrap();
        assert_eq!(devices.len(), 2);
        for (i, d) in devices.iter().enumerate() {
            assert_eq!(d.kind, DeviceKind::Gpu);
            assert_eq!(d.gpu_index, i as u32);
            assert_eq!(d.executor_id(), format!("gpu{i}"));
            assert_eq!(
                d.cuda_visible_devices(),
                format!("GPU-{i}aaaaaaa-1111-2222-3333-444444444444")
            );
            assert_eq!(d.name, "NVIDIA H200");
            assert_eq!(d.mig_profile, None);
            assert_eq!(d.parent_uuid, None);
            assert_eq!((d.memory_total, d.memory_used), (141 * GIB, GIB / 2));
        }
    }

    #[test]
    fn mig_gpu_with_gaps_next_to_whole_gpu() {
        let mut split = gpu(0);
        split.mig_mode = mig_enabled();
        // Slots 0, 3 and 6 hold slices; every other slot is NotFound. A
        // loop that stopped at the first empty slot, or ran to the number
        // of slices (3), would miss slices.
        split.slots = vec![
            (
                0,
                mig(
                    "MIG-3f2a9c1e-aaaa-5b6c-8d9e-0123456789ab",
                    "3g.71gb",
                    70 * GIB,
                ),
            ),
            (
                3,
                mig(
                    "MIG-0B1C2D3E-bbbb-5b6c-8d9e-0123456789ab",
                    "1g.18gb",
                    17 * GIB,
                ),
            ),
            (
                6,
                mig(
                    "MIG-77e10f00-cccc-5b6c-8d9e-0123456789ab",
                    "1g.18gb+me",
                    17 * GIB,
                ),
            ),
        ];
        let source = FakeNvml {
            gpus: vec![split, gpu(1)],
            ..FakeNvml::default()
        };
        let devices = discover(&source).unwrap();
        let ids: Vec<String> = devices.iter().map(DeviceInfo::executor_id).collect();
        assert_eq!(
            ids,
            ["mig-3f2a9c1e", "mig-0b1c2d3e", "mig-77e10f00", "gpu1"]
        );

        let first = &devices[0];
        assert_eq!(first.kind, DeviceKind::MigSlice);
        assert_eq!(first.gpu_index, 0);
        assert_eq!(first.mig_profile.as_deref(), Some("3g.71gb"));
        assert_eq!(first.memory_total, 70 * GIB);
        assert_eq!(
            first.cuda_visible_devices(),
            "MIG-3f2a9c1e-aaaa-5b6c-8d9e-0123456789ab"
        );
        assert_eq!(
            first.parent_uuid.as_deref(),
            Some("GPU-0aaaaaaa-1111-2222-3333-444444444444")
        );
        assert_eq!(devices[2].mig_profile.as_deref(), Some("1g.18gb+me"));
        assert_eq!(devices[3].kind, DeviceKind::Gpu);
        assert_eq!(devices[3].gpu_index, 1);
    }

    #[test]
    fn pending_mig_mode_is_treated_as_disabled() {
        let mut pending = gpu(0);
        pending.mig_mode = Fake::Ok(MigModeState {
            current: false,
            pending: true,
        });
        pending.slots = vec![(0, mig("MIG-11111111-0000", "7g.141gb", 140 * GIB))];
        let source = FakeNvml {
            gpus: vec![pending],
            ..FakeNvml::default()
        };
        let devices = discover(&source).unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].kind, DeviceKind::Gpu);
        assert_eq!(devices[0].executor_id(), "gpu0");
    }

    #[test]
    fn gpu_without_mig_support_is_a_whole_gpu() {
        let mut consumer = gpu(0);
        consumer.mig_mode = Fake::NotSupported;
        let source = FakeNvml {
            gpus: vec![consumer],
            ..FakeNvml::default()
        };
        let devices = discover(&source).unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].kind, DeviceKind::Gpu);
    }

    #[test]
    fn failing_devices_are_skipped() {
        let mut lost = gpu(0);
        lost.handle = Fake::GpuLost;
        let mut bad_mode = gpu(1);
        bad_mode.mig_mode = Fake::GpuLost;
        let mut split = gpu(2);
        split.mig_mode = mig_enabled();
        let mut broken_slice = mig("unused", "1g.18gb", 17 * GIB);
        broken_slice.uuid = Fake::GpuLost;
        split.slots = vec![
            (0, broken_slice),
            (1, mig("MIG-abcdef01-0000", "1g.18gb", 17 * GIB)),
        ];
        let source = FakeNvml {
            gpus: vec![lost, bad_mode, split, gpu(3)],
            ..FakeNvml::default()
        };
        let devices = discover(&source).unwrap();
        let ids: Vec<String> = devices.iter().map(DeviceInfo::executor_id).collect();
        assert_eq!(ids, ["mig-abcdef01", "gpu3"]);
    }

    #[test]
    fn device_count_failure_is_an_error() {
        struct NoCount;
        impl NvmlSource for NoCount {
            fn device_count(&self) -> Result<u32, NvmlError> {
                Err(NvmlError::DriverNotLoaded)
            }
            fn device(&self, _: u32) -> Result<Box<dyn GpuSource + '_>, NvmlError> {
                unreachable!("no device is asked for when counting fails")
            }
        }
        assert!(matches!(
            discover(&NoCount),
            Err(DiscoveryError::DeviceCount(NvmlError::DriverNotLoaded))
        ));
    }

    #[test]
    fn executor_ids_and_visible_devices() {
        let slice = |uuid: &str| DeviceInfo {
            kind: DeviceKind::MigSlice,
            gpu_index: 3,
            uuid: uuid.to_owned(),
            name: "NVIDIA H100 80GB HBM3 MIG 1g.10gb".to_owned(),
            mig_profile: Some("1g.10gb".to_owned()),
            memory_total: 10 * GIB,
            memory_used: 0,
            parent_uuid: Some("GPU-x".to_owned()),
        };
        let modern = slice("MIG-5C0FFEE1-2345-5678-9abc-def012345678");
        assert_eq!(modern.executor_id(), "mig-5c0ffee1");
        assert_eq!(
            modern.cuda_visible_devices(),
            "MIG-5C0FFEE1-2345-5678-9abc-def012345678"
        );
        // Pre-R470 UUIDs share the parent's digits; gi/ci keep ids unique.
        let legacy = slice("MIG-GPU-9d2a1b3c-0000-1111-2222-333344445555/2/0");
        assert_eq!(legacy.executor_id(), "mig-9d2a1b3c-2-0");
        assert_eq!(
            legacy.cuda_visible_devices(),
            "MIG-GPU-9d2a1b3c-0000-1111-2222-333344445555/2/0"
        );
        let whole = DeviceInfo {
            kind: DeviceKind::Gpu,
            gpu_index: 12,
            mig_profile: None,
            parent_uuid: None,
            ..slice("GPU-12345678-0000")
        };
        assert_eq!(whole.executor_id(), "gpu12");
        assert_eq!(whole.cuda_visible_devices(), "GPU-12345678-0000");
    }

    #[test]
    fn mig_profiles_parse_from_names() {
        let cases = [
            ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", Some("1g.10gb")),
            ("NVIDIA H200 MIG 3g.71gb", Some("3g.71gb")),
            ("NVIDIA A100-SXM4-40GB MIG 1g.5gb+me", Some("1g.5gb+me")),
            ("NVIDIA A100-SXM4-40GB MIG 1c.3g.20gb", Some("1c.3g.20gb")),
            ("NVIDIA H200", None),
            ("NVIDIA H100 80GB HBM3", None),
            ("MIG", None),
            ("", None),
        ];
        for (name, want) in cases {
            assert_eq!(parse_mig_profile(name).as_deref(), want, "{name}");
        }
    }

    #[test]
    fn device_info_serializes_with_snake_case_kind() {
        let d = DeviceInfo {
            kind: DeviceKind::MigSlice,
            gpu_index: 0,
            uuid: "MIG-1".to_owned(),
            name: "n".to_owned(),
            mig_profile: Some("1g.18gb".to_owned()),
            memory_total: 1,
            memory_used: 0,
            parent_uuid: None,
        };
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["kind"], "mig_slice");
        let back: DeviceInfo = serde_json::from_value(json).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn discover_system_without_a_driver_is_empty() {
        // This checks the no-driver path on machines without NVIDIA GPUs; on
        // a GPU machine it only checks that discovery does not panic.
        let devices = discover_system();
        if NvmlSystem::init().is_err() {
            assert!(devices.is_empty());
        }
        // A second call reuses the cached NVML state.
        assert_eq!(discover_system().len(), devices.len());
    }
}
