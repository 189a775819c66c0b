//! Any bytes found in a checkpoint journal (a disk that lost or flipped
//! them): a count of good frames and where the damage starts, never a
//! panic, a hang or an allocation the bytes did not pay for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensor_wasm_executor::durable::check_frames;

fuzz_target!(|data: &[u8]| {
    let (good, damaged) = check_frames(data);
    if let Some(at) = damaged {
        assert!(at <= data.len() as u64);
    }
    // Good frames are at least a header and a checksum each.
    assert!(good * 64 <= data.len());
});
