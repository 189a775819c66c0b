//! One CUDA device as the process sees it: its context, the kernel module,
//! the memory pool and its accounting. Shared by every backend (tenant
//! stream) on the device and created once per ordinal per process.

use std::collections::HashMap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, cudaError_enum};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, DriverError};
use cudarc::nvrtc::Ptx;
use tensor_wasm_shared::DType;

use super::jit;
use crate::error::{KernelError, Result};
use crate::sys::cuda::{
    disable_event_tracking, keep_pool_memory, missing_libraries, pool_reserved_bytes,
};

/// A CUDA driver error as a kernel error: out-of-memory is the tenant's
/// quota problem (ABI -5), anything else a device fault (ABI -8).
pub(crate) fn driver_error(op: &'static str, e: DriverError) -> KernelError {
    if e.0 == cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
        KernelError::OutOfMemory { op, bytes: 0 }
    } else {
        KernelError::Device(format!("{op}: {e}"))
    }
}

/// A device shared by every backend on it.
pub(crate) struct Device {
    pub(crate) ordinal: usize,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) name: String,
    /// `sm_XY`, from the compute capability.
    pub(crate) arch: String,
    pub(crate) sm_count: u32,
    /// Every kernel of kernels.cu, by name. The module stays loaded while
    /// the functions (which hold it) live.
    functions: HashMap<String, CudaFunction>,
    /// Bytes held by live tensors and workspaces of every backend on this
    /// device.
    pub(crate) used_bytes: AtomicU64,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("arch", &self.arch)
            .field("sm_count", &self.sm_count)
            .field("kernels", &self.functions.len())
            .field("used_bytes", &self.used_bytes.load(Ordering::Relaxed))
            .finish()
    }
}

impl Device {
    /// The device with `ordinal`, created on first use and kept for the
    /// life of the process (context creation costs ≈300 ms). A failed
    /// creation is not cached, so a later call may succeed.
    pub(crate) fn get(ordinal: usize) -> Result<Arc<Device>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
        let devices = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = devices
            .lock()
            .map_err(|_| KernelError::Device("CUDA device registry lock poisoned".into()))?;
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let dev = Arc::new(Device::open(ordinal)?);
        map.insert(ordinal, dev.clone());
        Ok(dev)
    }

    fn open(ordinal: usize) -> Result<Device> {
        let missing = missing_libraries();
        if !missing.is_empty() {
            return Err(KernelError::Unavailable(format!(
                "CUDA libraries not found: {} (install the NVIDIA driver and CUDA 13 \
                 runtime libraries, or check LD_LIBRARY_PATH)",
                missing.join(", ")
            )));
        }
        // cudarc panics on a missing symbol (an older driver than the
        // bindings expect): contain it and report the backend unavailable.
        match catch_unwind(AssertUnwindSafe(|| Device::open_checked(ordinal))) {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                Err(KernelError::Unavailable(format!(
                    "CUDA initialization failed: {msg}"
                )))
            }
        }
    }

    fn open_checked(ordinal: usize) -> Result<Device> {
        let unavailable = |what: &str, e: DriverError| {
            KernelError::Unavailable(format!("CUDA device {ordinal}: {what}: {e}"))
        };
        let count =
            CudaContext::device_count().map_err(|e| unavailable("cannot count devices", e))?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(KernelError::Unavailable(format!(
                "no CUDA device {ordinal}: {count} visible (check CUDA_VISIBLE_DEVICES)"
            )));
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| unavailable("cannot create a context", e))?;
        // Before any buffer exists: see the module docs of `crate::cuda`.
        disable_event_tracking(&ctx);
        let name = ctx
            .name()
            .map_err(|e| unavailable("cannot read the name", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| unavailable("cannot read the compute capability", e))?;
        let arch = format!("sm_{major}{minor}");
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| unavailable("cannot read the SM count", e))?;
        if ctx.has_async_alloc() {
            keep_pool_memory(&ctx)
                .map_err(|e| unavailable("cannot configure the memory pool", e))?;
        }
        let (cubin, _) = jit::module_for_arch(&arch)
            .map_err(|e| KernelError::Unavailable(format!("CUDA kernels for {arch}: {e}")))?;
        let module: Arc<CudaModule> = ctx
            .load_module(Ptx::from_binary(cubin.as_ref().clone()))
            .map_err(|e| unavailable("cannot load the kernel module", e))?;
        let mut functions = HashMap::new();
        for kname in kernel_names() {
            let f = module.load_function(&kname).map_err(|e| {
                KernelError::Unavailable(format!("kernel {kname} missing from the module: {e}"))
            })?;
            functions.insert(kname, f);
        }
        tracing::info!(ordinal, %name, %arch, sm_count, "CUDA device ready");
        Ok(Device {
            ordinal,
            ctx,
            name,
            arch,
            sm_count: u32::try_from(sm_count).unwrap_or(1).max(1),
            functions,
            used_bytes: AtomicU64::new(0),
        })
    }

    /// The kernel `name`; every name that `kernel_names` lists was loaded
    /// at startup, so a miss is a bug reported as a device error.
    pub(crate) fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| KernelError::Device(format!("kernel {name} is not loaded")))
    }

    /// The compute capability as one number (90 for `sm_90`).
    pub(crate) fn sm_version(&self) -> u32 {
        self.arch
            .strip_prefix("sm_")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Bytes the memory pool reserves from the driver.
    pub(crate) fn reserved_bytes(&self) -> Result<u64> {
        pool_reserved_bytes(&self.ctx).map_err(|e| driver_error("memory_reserved", e))
    }
}

/// Kernel-name suffix of a dtype.
pub(crate) fn dtype_suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::U8 => "u8",
    }
}

/// Float dtypes, in kernel order.
const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Element sizes of the dtype-agnostic copy kernels.
const ELEM_SIZES: [usize; 4] = [1, 2, 4, 8];

/// The fused attention kernels: dtype and head size.
pub(crate) const FLASH_ATTENTION: [(DType, usize); 4] = [
    (DType::BF16, 64),
    (DType::BF16, 128),
    (DType::F16, 64),
    (DType::F16, 128),
];

/// The fused attention kernel for `dtype` and head size `d`.
pub(crate) fn flash_attention_kernel(dtype: DType, d: usize) -> String {
    format!("flash_attn_{}_{d}", dtype_suffix(dtype))
}

/// Reduction names in kernel order.
pub(crate) const REDUCE_NAMES: [&str; 5] = ["sum", "mean", "max", "min", "argmax"];

/// Every `extern "C"` kernel that kernels.cu defines; loaded at startup so
/// that a missing one fails the backend's creation, not a tenant's op.
pub(crate) fn kernel_names() -> Vec<String> {
    let mut v = Vec::new();
    for d in DType::ALL {
        let t = dtype_suffix(d);
        v.push(format!("binary_same_{t}"));
        v.push(format!("binary_bcast_{t}"));
        v.push(format!("scalar_{t}"));
        for r in REDUCE_NAMES {
            v.push(format!("reduce_rows_{r}_{t}"));
            v.push(format!("reduce_cols_{r}_{t}"));
        }
        for e in DType::ALL {
            v.push(format!("cast_{t}_{}", dtype_suffix(e)));
        }
    }
    for d in FLOATS {
        let t = dtype_suffix(d);
        for k in [
            "unary",
            "softmax_rows",
            "softmax_cols",
            "layer_norm",
            "rms_norm",
            "attn_softmax",
        ] {
            v.push(format!("{k}_{t}"));
        }
    }
    for (t, d) in FLASH_ATTENTION {
        v.push(flash_attention_kernel(t, d));
    }
    for n in ELEM_SIZES {
        v.push(format!("permute_{n}"));
        v.push(format!("concat_{n}"));
        v.push(format!("gather_{n}_i32"));
        v.push(format!("gather_{n}_i64"));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::launch::{ArgKind, signature};
    use crate::sys::cuda::{NvrtcOutput, nvrtc_compile};

    #[test]
    fn kernel_names_are_unique() {
        let names = kernel_names();
        let set: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(set.len(), names.len());
        assert_eq!(names.len(), 152);
        for n in &names {
            assert!(signature(n).is_some(), "no launch signature for {n}");
        }
    }

    /// Compiles kernels.cu with NVRTC when libnvrtc is loadable (no GPU is
    /// needed to compile) and checks that it defines every kernel the
    /// backend loads. Machines without libnvrtc skip the check.
    #[test]
    fn kernel_source_compiles_and_defines_every_kernel() {
        if !missing_libraries()
            .iter()
            .all(|m| !m.starts_with("libnvrtc"))
        {
            // CI installs NVRTC and sets this, so the check runs there.
            assert!(
                std::env::var_os("TENSOR_WASM_REQUIRE_NVRTC").is_none(),
                "TENSOR_WASM_REQUIRE_NVRTC is set but libnvrtc cannot be loaded"
            );
            eprintln!("libnvrtc not found: skipping the NVRTC compile check");
            return;
        }
        let ptx = nvrtc_compile(
            jit::KERNEL_SOURCE,
            "kernels.cu",
            &jit::compile_options("sm_90"),
            NvrtcOutput::Ptx,
        )
        .unwrap();
        let ptx = String::from_utf8(ptx).unwrap();
        let entries = ptx_entries(&ptx);
        for name in kernel_names() {
            let params = entries
                .get(name.as_str())
                .unwrap_or_else(|| panic!("kernel {name} not defined"));
            let sig = signature(&name).unwrap_or_else(|| panic!("no signature for {name}"));
            let expected: Vec<&str> = sig
                .iter()
                .map(|k| match k {
                    ArgKind::Ptr | ArgKind::U64 => ".u64",
                    ArgKind::I32 => ".u32",
                    ArgKind::F32 => ".f32",
                    ArgKind::Dims => ".b8[128]",
                })
                .collect();
            assert_eq!(params, &expected, "parameters of {name}");
        }
        assert_eq!(entries.len(), kernel_names().len());
    }

    /// Kernel name → parameter types (`.u64`, `.u32`, `.f32`, or
    /// `.b8[N]` for a by-value struct) of every entry in `ptx`.
    fn ptx_entries(ptx: &str) -> HashMap<&str, Vec<String>> {
        let mut out = HashMap::new();
        let mut rest = ptx;
        while let Some(at) = rest.find(".visible .entry ") {
            rest = &rest[at + ".visible .entry ".len()..];
            let open = rest.find('(').unwrap();
            let close = rest.find(')').unwrap();
            let name = rest[..open].trim();
            let params = rest[open + 1..close]
                .split(',')
                .map(|p| {
                    let words: Vec<&str> = p.split_whitespace().collect();
                    match words.as_slice() {
                        [".param", ".align", _, ".b8", decl] => {
                            let n = decl.split('[').nth(1).unwrap_or("");
                            format!(".b8[{n}")
                        }
                        [".param", ty, _] => (*ty).to_string(),
                        other => panic!("unexpected parameter {other:?} of {name}"),
                    }
                })
                .collect();
            out.insert(name, params);
        }
        out
    }

    #[test]
    fn driver_errors_map_to_abi_codes() {
        let oom = driver_error("t", DriverError(cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY));
        assert!(matches!(oom, KernelError::OutOfMemory { .. }));
        assert_eq!(oom.abi().code(), -5);
    }
}
