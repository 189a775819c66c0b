//! Any bytes given to the assets check: a typed error or an index whose
//! every range lies inside the file, in order and without overlap, and
//! whose every tensor the backend then makes from the bytes.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tensor_wasm_executor::assets;
use tensor_wasm_kernels::{Backend, CpuBackend, Limits, SharedBytes};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_tensor_bytes: 1 << 20,
        ..Limits::default()
    };
    let Ok(index) = assets::inspect(data, &limits) else {
        return;
    };
    let mut end = 0;
    let mut total = 0u64;
    for e in &index.entries {
        assert!(e.range.start >= end, "ranges in order, no overlap");
        assert!(e.range.end <= data.len(), "inside the file");
        end = e.range.end;
        total += e.range.len() as u64;
    }
    assert_eq!(total, index.data_bytes);
    let bytes: SharedBytes = Arc::new(data.to_vec());
    let cpu = CpuBackend::new(limits);
    for e in &index.entries {
        let t = cpu
            .from_shared(e.dtype, &e.dims, bytes.clone(), e.range.clone())
            .expect("an indexed tensor is made");
        assert_eq!(cpu.to_bytes(&t).unwrap(), &data[e.range.clone()]);
    }
});
