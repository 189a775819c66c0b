//! Any bytes given to the format 2 stream reader (a migration round, as a
//! destination reads it from its source): records or a typed error, never a
//! panic, a hang or an allocation the bytes did not pay for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensor_wasm_shared::snapshot::stream::{Reader, Record, STREAM_HEADER_LEN, STREAM_VERSION};
use tensor_wasm_shared::snapshot::MAGIC;

/// Small enough that the reader's limit is met as well.
const MAX_STREAM: u64 = 16 << 20;

fn read_all(bytes: &[u8], key: Option<&[u8]>) {
    let Ok(mut r) = Reader::new(bytes, key, MAX_STREAM) else {
        return;
    };
    // Each record costs at least its 5-byte frame: the loop ends.
    while let Ok(Some(rec)) = r.next_record() {
        if let Record::Pages { bytes, .. } | Record::Data(bytes) = rec {
            r.recycle(bytes);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    read_all(data, None);
    read_all(data, Some(b"fuzz-key"));
    // Past the header: the records themselves, behind a valid header.
    let mut framed = Vec::with_capacity(STREAM_HEADER_LEN + data.len());
    framed.extend_from_slice(&MAGIC);
    framed.extend_from_slice(&STREAM_VERSION.to_le_bytes());
    framed.extend_from_slice(&0u32.to_le_bytes());
    framed.extend_from_slice(data);
    read_all(&framed, None);
});
