//! Any bytes given to the snapshot reader: a typed error or a snapshot,
//! never a panic, a hang or an allocation the bytes did not pay for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensor_wasm_shared::snapshot;

/// Small enough that a hostile length field cannot make the reader
/// allocate much.
const MAX_PAYLOAD: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = snapshot::decode(data, None, MAX_PAYLOAD);
    let _ = snapshot::decode(data, Some(b"fuzz-key"), MAX_PAYLOAD);
    let _ = snapshot::decode_bound(data, Some(b"fuzz-key"), MAX_PAYLOAD, Some("m1"));
    let _ = snapshot::sealed_for_move(data);
    // Framing accepted, archive fuzzed: rebuild a valid header around the
    // bytes so that rkyv's validation sees them.
    if data.len() > 8 {
        let payload = &data[8..];
        let mut framed = Vec::with_capacity(snapshot::HEADER_LEN + payload.len());
        framed.extend_from_slice(&snapshot::MAGIC);
        framed.extend_from_slice(&snapshot::FORMAT_VERSION.to_le_bytes());
        framed.extend_from_slice(&0u32.to_le_bytes());
        framed.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        framed.extend_from_slice(&snapshot::checksum(payload));
        framed.resize(snapshot::HEADER_LEN, 0);
        framed.extend_from_slice(payload);
        if let Ok(s) = snapshot::decode(&framed, None, MAX_PAYLOAD) {
            // A decoded snapshot re-encodes to the same payload.
            let again = snapshot::encode(&s, None).expect("encodes");
            let back = snapshot::decode(&again, None, MAX_PAYLOAD).expect("decodes");
            assert_eq!(back, s);
        }
    }
});
