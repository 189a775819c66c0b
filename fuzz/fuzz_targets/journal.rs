//! Any bytes found in a checkpoint journal (a disk that lost or flipped
//! them): a count of good frames and where the damage starts, never a
//! panic, a hang or an allocation the bytes did not pay for. The bytes are
//! scanned as they are, and again as frames with valid headers around the
//! payloads they describe (sealed when asked), so that the scan's checks
//! past the header are reached too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensor_wasm_executor::durable::{check_frames, encode_frame};
use tensor_wasm_shared::snapshot::stream::seal;

/// The smallest good frame: a header, a stream's header and its End.
const MIN_FRAME: usize = 32 + 16 + 69;

fn check(bytes: &[u8]) {
    let (good, damaged) = check_frames(bytes);
    if let Some(at) = damaged {
        assert!(at <= bytes.len() as u64);
    }
    assert!(good * MIN_FRAME <= bytes.len());
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // Each frame: flags, whether to seal, a 16-bit length, the payload.
    let mut journal = Vec::new();
    let mut rest = data;
    while let [flags, sealed, lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let mut payload = tail[..len].to_vec();
        if sealed & 1 == 1 {
            seal(&mut payload);
        }
        journal.extend(encode_frame(u32::from(*flags & 0x1f), 1, &payload));
        rest = &tail[len..];
    }
    check(&journal);
});
