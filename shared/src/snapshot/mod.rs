//! The tenant snapshot format (`docs/SNAPSHOT-COMPATIBILITY.md`): a 96-byte
//! header, then a 16-byte-aligned rkyv archive of [`TenantSnapshot`].
//!
//! Header, little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `TWSNAP\0\1` |
//! | 8 | 4 | format version ([`FORMAT_VERSION`]) |
//! | 12 | 4 | flags (bit 0: keyed; bit 1: sealed; bit 2: made for a move) |
//! | 16 | 8 | payload length in bytes |
//! | 24 | 32 | BLAKE3 of the payload |
//! | 56 | 32 | HMAC-SHA256 of the payload under `TENSOR_WASM_SNAPSHOT_KEY` (zeros when unkeyed) |
//! | 88 | 8 | the seal: keyed BLAKE3 of bytes 0–87 (and of the move id, for a move), its first 8 bytes; zeros when unsealed |
//!
//! [`decode`] checks, in this order and before anything else looks at the
//! payload: magic and version (this reader accepts its own version and the
//! one before), length, checksum, the HMAC when a key is configured (an
//! unkeyed snapshot is refused then), the seal, and rkyv's validation of
//! every pointer and length in the archive.
//!
//! The seal authenticates the header itself (its version and flags are
//! outside the HMAC, which older readers check alone) and binds a
//! snapshot made for a move to that move's id ([`encode_bound`],
//! [`decode_bound`]): an old signed snapshot cannot stand in for the one a
//! move made. It sits where the header had zeros, so readers of earlier
//! releases, which check the HMAC only, read sealed snapshots as before. The importer then checks semantic
//! limits (sizes, dims, quotas) before touching live state. Compiled code
//! never travels: modules are carried as wasm bytes and compiled on import.

use hmac::{Hmac, Mac};
use rkyv::rancor;
use sha2::Sha256;

pub mod stream;

/// First bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"TWSNAP\0\x01";
/// The format this build writes.
pub const FORMAT_VERSION: u32 = 1;
/// The oldest format this build reads (its own and the one before; version
/// 1 is the first, so only 1 for now).
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// Header size; the archive that follows starts 16-byte aligned.
pub const HEADER_LEN: usize = 96;
/// Flag bit: the HMAC field is set.
pub const FLAG_KEYED: u32 = 1;
/// Flag bit: the header carries its seal (bytes 88–95).
pub const FLAG_SEALED: u32 = 2;
/// Flag bit: the seal binds the snapshot to a move's id.
pub const FLAG_MOVE: u32 = 4;
/// Every flag this build knows.
const KNOWN_FLAGS: u32 = FLAG_KEYED | FLAG_SEALED | FLAG_MOVE;
/// Key derivation context of the seal's key.
const SEAL_CONTEXT: &str = "tensor-wasm snapshot format 1 header seal";
/// Fewest bytes of `TENSOR_WASM_SNAPSHOT_KEY` an executor signs with: 32,
/// as many as the keyed hash's own key (`openssl rand -hex 32` makes 64).
pub const MIN_KEY_BYTES: usize = 32;

/// A whole tenant: everything needed to resume it elsewhere.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct TenantSnapshot {
    pub tenant: String,
    pub functions: Vec<FunctionSnapshot>,
    pub jobs: Vec<JobSnapshot>,
}

/// One function: its original bytes, assets, record, and warm instances.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FunctionSnapshot {
    /// The function's record (`api::FunctionInfo`) as JSON.
    pub info_json: String,
    /// The original module bytes, as registered (before the rewrite).
    pub wasm: Vec<u8>,
    /// The original safetensors file of its assets, if any.
    pub assets: Option<Vec<u8>>,
    pub instances: Vec<InstanceSnapshot>,
}

/// One warm instance.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct InstanceSnapshot {
    /// The whole linear memory.
    pub memory: Vec<u8>,
    /// Every mutable global the module defines.
    pub globals: Vec<GlobalSnapshot>,
    /// Guest-owned tensors, by handle.
    pub tensors: Vec<TensorSnapshot>,
    /// Asset handles the guest holds, by name.
    pub asset_handles: Vec<AssetHandle>,
}

/// A global's value: `kind` 0 i32, 1 i64, 2 f32, 3 f64; `bits` its bits.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct GlobalSnapshot {
    pub index: u32,
    pub kind: u8,
    pub bits: u64,
}

/// A tensor with its handle number.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct TensorSnapshot {
    pub handle: i32,
    /// Guest ABI dtype code.
    pub dtype: u8,
    pub dims: Vec<u64>,
    /// Little-endian row-major elements.
    pub data: Vec<u8>,
}

/// An asset name and the handle an instance knows it by.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AssetHandle {
    pub name: String,
    pub handle: i32,
}

/// One job: finished ones answer `GET /jobs`, pending ones run after import.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JobSnapshot {
    /// The job's record (`api::JobInfo`) as JSON.
    pub info_json: String,
    /// For a pending job: its request's content type and body.
    pub content_type: Option<String>,
    pub body: Option<Vec<u8>>,
}

/// Why bytes are not a snapshot this reader accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    Truncated(usize),
    #[error("not a TensorWasm snapshot (bad magic)")]
    BadMagic,
    #[error(
        "snapshot format version {0} is not readable here (this build reads {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
    #[error("snapshot payload is {actual} bytes but its header says {declared}")]
    LengthMismatch { declared: u64, actual: u64 },
    #[error("snapshot payload is {0} bytes, over the limit of {1}")]
    TooLarge(u64, u64),
    #[error("snapshot checksum does not match its payload")]
    Checksum,
    #[error("snapshot is not keyed, and this reader requires TENSOR_WASM_SNAPSHOT_KEY signatures")]
    Unkeyed,
    #[error("snapshot signature does not match TENSOR_WASM_SNAPSHOT_KEY")]
    BadSignature,
    /// The seal does not hold, or binds the snapshot to another move (or to
    /// none when a move's is asked for).
    #[error("snapshot is not the one for this: {0}")]
    WrongSeal(String),
    #[error("snapshot archive is malformed: {0}")]
    Malformed(String),
    #[error("cannot encode the snapshot: {0}")]
    Encode(String),
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], payload: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(payload);
    m
}

/// Payloads from this size up are hashed on every core: 1 MiB, past which
/// splitting the work pays for the hand-off.
const PARALLEL_HASH_FROM: usize = 1 << 20;

/// The BLAKE3 checksum the header carries for `payload`.
pub fn checksum(payload: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    if payload.len() >= PARALLEL_HASH_FROM {
        h.update_rayon(payload);
    } else {
        h.update(payload);
    }
    *h.finalize().as_bytes()
}

/// The seal of `header` (its first 88 bytes), bound to `bound` (a move's
/// id) when given.
fn seal(key: &[u8], header: &[u8], bound: Option<&str>) -> [u8; 8] {
    let mut h = blake3::Hasher::new_keyed(&blake3::derive_key(SEAL_CONTEXT, key));
    h.update(&header[..88]);
    if let Some(id) = bound {
        h.update(b"move\0");
        h.update(id.as_bytes());
    }
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&h.finalize().as_bytes()[..8]);
    tag
}

/// Encodes a snapshot, signing and sealing it when `key` is given.
pub fn encode(snapshot: &TenantSnapshot, key: Option<&[u8]>) -> Result<Vec<u8>, SnapshotError> {
    encode_bound(snapshot, key, None)
}

/// As [`encode`]; with `bound` (a move's id) and a key, the seal binds the
/// snapshot to that move, and only [`decode_bound`] with the same id
/// reads it.
pub fn encode_bound(
    snapshot: &TenantSnapshot,
    key: Option<&[u8]>,
    bound: Option<&str>,
) -> Result<Vec<u8>, SnapshotError> {
    // The archive is written straight after a header-sized gap, so the
    // payload is never copied: rkyv's pointers are relative, and 96 is a
    // multiple of every alignment the archive uses (16 at most).
    let mut out = rkyv::api::high::to_bytes_in::<_, rancor::Error>(snapshot, vec![0u8; HEADER_LEN])
        .map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let (header, payload) = out.split_at_mut(HEADER_LEN);
    let sum = checksum(payload);
    let signature = key.map(|k| mac(k, payload).finalize().into_bytes());
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let flags = match (key, bound) {
        (None, _) => 0,
        (Some(_), None) => FLAG_KEYED | FLAG_SEALED,
        (Some(_), Some(_)) => FLAG_KEYED | FLAG_SEALED | FLAG_MOVE,
    };
    header[12..16].copy_from_slice(&flags.to_le_bytes());
    header[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header[24..56].copy_from_slice(&sum);
    if let (Some(sig), Some(k)) = (signature, key) {
        header[56..88].copy_from_slice(&sig);
        let tag = seal(k, header, bound);
        header[88..96].copy_from_slice(&tag);
    }
    Ok(out)
}

/// What a header says, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub keyed: bool,
    /// Its seal authenticates the header (checked when read with a key).
    pub sealed: bool,
    /// Made for a move, and readable only as that move's.
    pub for_move: bool,
    pub payload_len: u64,
}

/// Reads and checks the header and the payload's integrity (steps 1–4 of
/// the validation order), without decoding the archive.
pub fn verify(bytes: &[u8], key: Option<&[u8]>, max_payload: u64) -> Result<Header, SnapshotError> {
    verify_bound(bytes, key, max_payload, None)
}

/// As [`verify`]; with a key, a snapshot made for a move is read only
/// with that move's id as `bound`, and `bound` reads only a snapshot made
/// for it. Without a key nothing is authenticated, the seal included.
pub fn verify_bound(
    bytes: &[u8],
    key: Option<&[u8]>,
    max_payload: u64,
    bound: Option<&str>,
) -> Result<Header, SnapshotError> {
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated(bytes.len()));
    }
    let (header, payload) = bytes.split_at(HEADER_LEN);
    if header[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().unwrap_or([0; 4]));
    let version = u32_at(8);
    if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(SnapshotError::UnsupportedVersion(version));
    }
    let flags = u32_at(12);
    let declared = u64::from_le_bytes(header[16..24].try_into().unwrap_or([0; 8]));
    if declared != payload.len() as u64 {
        return Err(SnapshotError::LengthMismatch {
            declared,
            actual: payload.len() as u64,
        });
    }
    if declared > max_payload {
        return Err(SnapshotError::TooLarge(declared, max_payload));
    }
    if checksum(payload) != header[24..56] {
        return Err(SnapshotError::Checksum);
    }
    let keyed = flags & FLAG_KEYED != 0;
    if let Some(k) = key {
        if !keyed {
            return Err(SnapshotError::Unkeyed);
        }
        mac(k, payload)
            .verify_slice(&header[56..88])
            .map_err(|_| SnapshotError::BadSignature)?;
        check_seal(k, header, flags, bound)?;
    }
    Ok(Header {
        version,
        keyed,
        sealed: flags & FLAG_SEALED != 0,
        for_move: flags & FLAG_MOVE != 0,
        payload_len: declared,
    })
}

/// The seal of a signed header (its HMAC checked already): a sealed header
/// is as it was written, with no flag this reader does not know, and made
/// for the move `bound` names, or for none when `bound` is none. A header
/// of an earlier release has no seal, and is read as before, but never as
/// a move's.
fn check_seal(
    key: &[u8],
    header: &[u8],
    flags: u32,
    bound: Option<&str>,
) -> Result<(), SnapshotError> {
    let wrong = |why: &str| Err(SnapshotError::WrongSeal(why.into()));
    if flags & FLAG_SEALED == 0 {
        return match bound {
            Some(_) => wrong("it was not made for this move"),
            None => Ok(()),
        };
    }
    let for_move = flags & FLAG_MOVE != 0;
    let bound = match (bound, for_move) {
        (Some(id), true) => Some(id),
        (None, false) => None,
        (Some(_), false) => return wrong("it was not made for this move"),
        (None, true) => return wrong("it was made for a move, and only that move imports it"),
    };
    // `blake3::Hash` would compare in constant time; 8 bytes are compared
    // here the same way.
    let expected = seal(key, header, bound);
    let diff = expected
        .iter()
        .zip(&header[88..96])
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return wrong(if bound.is_some() {
            "it was made for another move, or its header was changed"
        } else {
            "its header was changed"
        });
    }
    if flags & !KNOWN_FLAGS != 0 {
        return wrong(&format!("flags {flags:#x} are not known to this reader"));
    }
    Ok(())
}

/// Whether `bytes`' header says the snapshot was sealed to a move, as its
/// writer set it: unchecked, for a proxy deciding how to ask for its
/// import (the importer checks the seal).
pub fn sealed_for_move(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER_LEN
        && bytes[..8] == MAGIC
        && u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) & FLAG_MOVE != 0
}

/// Checks and decodes a snapshot (steps 1–5 of the validation order).
pub fn decode(
    bytes: &[u8],
    key: Option<&[u8]>,
    max_payload: u64,
) -> Result<TenantSnapshot, SnapshotError> {
    decode_bound(bytes, key, max_payload, None)
}

/// As [`decode`], with the seal checked as [`verify_bound`] does.
pub fn decode_bound(
    bytes: &[u8],
    key: Option<&[u8]>,
    max_payload: u64,
    bound: Option<&str>,
) -> Result<TenantSnapshot, SnapshotError> {
    verify_bound(bytes, key, max_payload, bound)?;
    // The archive must sit 16-byte aligned: read it in place when it does,
    // else from an aligned copy.
    let payload = &bytes[HEADER_LEN..];
    let copy;
    let aligned: &[u8] = if (payload.as_ptr() as usize).is_multiple_of(16) {
        payload
    } else {
        let mut v = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
        v.extend_from_slice(payload);
        copy = v;
        &copy
    };
    let archived = rkyv::access::<ArchivedTenantSnapshot, rancor::Error>(aligned)
        .map_err(|e| SnapshotError::Malformed(e.to_string()))?;
    rkyv::deserialize::<TenantSnapshot, rancor::Error>(archived)
        .map_err(|e| SnapshotError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TenantSnapshot {
        TenantSnapshot {
            tenant: "t1".into(),
            functions: vec![FunctionSnapshot {
                info_json: "{}".into(),
                wasm: b"\0asm\x01\0\0\0".to_vec(),
                assets: None,
                instances: vec![InstanceSnapshot {
                    memory: vec![7; 100],
                    globals: vec![GlobalSnapshot {
                        index: 0,
                        kind: 0,
                        bits: 42,
                    }],
                    tensors: vec![TensorSnapshot {
                        handle: 3,
                        dtype: 0,
                        dims: vec![2],
                        data: vec![0; 8],
                    }],
                    asset_handles: vec![AssetHandle {
                        name: "w".into(),
                        handle: 1,
                    }],
                }],
            }],
            jobs: vec![JobSnapshot {
                info_json: "{}".into(),
                content_type: Some("text/plain".into()),
                body: Some(b"hi".to_vec()),
            }],
        }
    }

    const MAX: u64 = 1 << 30;

    #[test]
    fn round_trips_keyed_and_unkeyed() {
        let s = sample();
        let plain = encode(&s, None).unwrap();
        assert_eq!(&plain[..8], &MAGIC);
        assert_eq!(decode(&plain, None, MAX).unwrap(), s);
        let keyed = encode(&s, Some(b"k")).unwrap();
        assert_eq!(decode(&keyed, Some(b"k"), MAX).unwrap(), s);
        assert_eq!(decode(&keyed, None, MAX).unwrap(), s);
        assert_eq!(decode(&plain, Some(b"k"), MAX), Err(SnapshotError::Unkeyed));
        assert_eq!(
            decode(&keyed, Some(b"other"), MAX),
            Err(SnapshotError::BadSignature)
        );
    }

    #[test]
    fn every_check_fires_in_order() {
        let good = encode(&sample(), Some(b"k")).unwrap();
        assert_eq!(
            decode(&good[..50], None, MAX),
            Err(SnapshotError::Truncated(50))
        );
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad, None, MAX), Err(SnapshotError::BadMagic));
        let mut bad = good.clone();
        bad[8] = 9;
        assert_eq!(
            decode(&bad, None, MAX),
            Err(SnapshotError::UnsupportedVersion(9))
        );
        let truncated = &good[..good.len() - 1];
        assert!(matches!(
            decode(truncated, None, MAX),
            Err(SnapshotError::LengthMismatch { .. })
        ));
        assert!(matches!(
            decode(&good, None, 10),
            Err(SnapshotError::TooLarge(..))
        ));
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(decode(&bad, None, MAX), Err(SnapshotError::Checksum));
        // A forger who fixes the checksum still fails the signature.
        let payload = bad[HEADER_LEN..].to_vec();
        bad[24..56].copy_from_slice(blake3::hash(&payload).as_bytes());
        assert_eq!(
            decode(&bad, Some(b"k"), MAX),
            Err(SnapshotError::BadSignature)
        );
    }

    #[test]
    fn garbage_with_valid_framing_is_malformed_not_a_crash() {
        let payload = vec![0xffu8; 64];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(blake3::hash(&payload).as_bytes());
        bytes.resize(HEADER_LEN, 0);
        bytes.extend_from_slice(&payload);
        assert!(matches!(
            decode(&bytes, None, MAX),
            Err(SnapshotError::Malformed(_))
        ));
    }

    #[test]
    fn the_seal_authenticates_the_header_and_binds_a_move_snapshot_to_its_move() {
        let k: &[u8] = b"k";
        let s = sample();
        let sealed = encode(&s, Some(k)).unwrap();
        let h = verify(&sealed, Some(k), MAX).unwrap();
        assert!(h.sealed && !h.for_move);
        // Any change to the header's flags is caught, even where the HMAC
        // (over the payload only) still holds.
        let mut flipped = sealed.clone();
        flipped[12] |= 8;
        assert!(matches!(
            decode(&flipped, Some(k), MAX),
            Err(SnapshotError::WrongSeal(_))
        ));
        // A snapshot of an earlier release (no seal) reads as before, but
        // never as a move's.
        let mut old = sealed.clone();
        old[12] = 1;
        old[88..96].fill(0);
        assert_eq!(decode(&old, Some(k), MAX).unwrap(), s);
        assert!(matches!(
            decode_bound(&old, Some(k), MAX, Some("m1")),
            Err(SnapshotError::WrongSeal(_))
        ));

        // Made for move m1: read as m1's only.
        let moved = encode_bound(&s, Some(k), Some("m1")).unwrap();
        assert!(
            verify_bound(&moved, Some(k), MAX, Some("m1"))
                .unwrap()
                .for_move
        );
        assert_eq!(decode_bound(&moved, Some(k), MAX, Some("m1")).unwrap(), s);
        for other in [Some("m2"), None] {
            let e = decode_bound(&moved, Some(k), MAX, other).unwrap_err();
            assert!(matches!(e, SnapshotError::WrongSeal(_)), "{other:?}: {e}");
        }
        // Nor can a snapshot made for no move, or another key's, stand in
        // for a move's.
        assert!(matches!(
            decode_bound(&sealed, Some(k), MAX, Some("m1")),
            Err(SnapshotError::WrongSeal(_))
        ));
        assert_eq!(
            decode_bound(&moved, Some(b"other"), MAX, Some("m1")),
            Err(SnapshotError::BadSignature)
        );
        // Stripping the move flag breaks the seal.
        let mut stripped = moved.clone();
        stripped[12] &= !(FLAG_MOVE as u8);
        assert!(matches!(
            decode(&stripped, Some(k), MAX),
            Err(SnapshotError::WrongSeal(_))
        ));
        // A reader without a key authenticates nothing, the seal included.
        assert_eq!(decode(&moved, None, MAX).unwrap(), s);
    }
}
