//! Device discovery on a real machine (feature `cuda`; `#[ignore]`d, run by
//! `scripts/gpu-check`): NVML's view against `nvidia-smi`'s.
//!
//! `scripts/gpu-check` sets `TENSOR_WASM_CHECK_GPUS` to the UUIDs of the
//! GPUs whose current MIG mode `nvidia-smi` reports as not enabled, comma
//! separated. Each must be discovered as a whole GPU, bindable by its UUID,
//! with its memory; a GPU in MIG mode must not appear whole.

use tensor_wasm_kernels::discovery::{DeviceKind, discover_system};

#[test]
#[ignore = "needs an NVIDIA GPU and TENSOR_WASM_CHECK_GPUS"]
fn discovery_reports_whole_gpus_as_nvidia_smi_does() {
    let listed = std::env::var("TENSOR_WASM_CHECK_GPUS")
        .expect("TENSOR_WASM_CHECK_GPUS: the UUIDs of the GPUs not in MIG mode");
    let expected: Vec<&str> = listed.split(',').filter(|s| !s.is_empty()).collect();
    let found = discover_system();
    for d in &found {
        eprintln!(
            "discovered {} {:?} {} {:?} {} bytes -> executor {}",
            d.uuid,
            d.kind,
            d.name,
            d.mig_profile,
            d.memory_total,
            d.executor_id()
        );
    }
    let whole: Vec<_> = found.iter().filter(|d| d.kind == DeviceKind::Gpu).collect();
    let mut got: Vec<&str> = whole.iter().map(|d| d.uuid.as_str()).collect();
    let mut want = expected.clone();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(
        got, want,
        "whole GPUs: NVML (left) against nvidia-smi (right)"
    );
    for d in whole {
        assert!(d.uuid.starts_with("GPU-"), "{}", d.uuid);
        assert_eq!(d.cuda_visible_devices(), d.uuid);
        assert!(d.mig_profile.is_none() && d.parent_uuid.is_none(), "{d:?}");
        assert!(d.memory_total > 0, "{d:?}");
        assert!(d.executor_id().starts_with("gpu"), "{d:?}");
    }
    for d in found.iter().filter(|d| d.kind == DeviceKind::MigSlice) {
        assert!(d.uuid.starts_with("MIG-"), "{d:?}");
        assert!(d.mig_profile.is_some(), "{d:?}");
    }
}
