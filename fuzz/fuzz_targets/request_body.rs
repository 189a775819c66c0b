//! Any invoke body, under each content type the executor decodes: JSON
//! tensors, safetensors, raw bytes. A request or a typed error, never a
//! panic or an allocation beyond the backend's limits; and the check that
//! `invoke-async` runs at submission agrees with the decoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensor_wasm_executor::body;
use tensor_wasm_kernels::{Backend, CpuBackend, Limits};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let backend = CpuBackend::new(Limits {
        max_rank: 8,
        max_tensor_bytes: 1 << 20,
        max_op_work: 1 << 24,
    });
    let content_type = match selector % 3 {
        0 => "application/json",
        1 => "application/x-safetensors",
        _ => "application/octet-stream",
    };
    let body = bytes::Bytes::copy_from_slice(rest);
    let checked = body::check_request(Some(content_type), &body, backend.limits());
    let decoded = body::decode_request(Some(content_type), body, &backend);
    assert_eq!(
        checked.as_ref().err().map(|e| e.code()),
        decoded.as_ref().err().map(|e| e.code()),
        "{checked:?} vs {decoded:?}"
    );
    if let Ok(request) = decoded {
        for t in request.inputs.values() {
            assert!(t.nbytes() <= 1 << 20);
        }
    }
});
