//! Snapshot format 2: a stream of records (`docs/SNAPSHOT-COMPATIBILITY.md`),
//! written and read with bounded buffers, so that neither side holds a
//! tenant twice: a whole-tenant snapshot, and each round of a live
//! migration, are such streams.
//!
//! ```text
//! header   magic TWSNAP\0\x01 (8) · version 2 (u32) · flags (u32: bit 0 keyed)
//! record*  tag (u8) · length (u32, at most MAX_RECORD) · payload
//! End      tag 13 · BLAKE3 of every byte before it (32) · keyed BLAKE3 of
//!          the same under a key derived from TENSOR_WASM_SNAPSHOT_KEY,
//!          zeros when unkeyed (32)
//! ```
//!
//! Integers are little-endian; a string is a u32 length and UTF-8 bytes.
//! `Blob`, `Tensor` and `Job` announce a length that the `Data` records
//! right after them carry, in chunks of at most [`CHUNK`] bytes; nothing
//! else may come between. The [`Reader`] checks every length against its
//! bounds before it allocates, and the framing (announced data, then End,
//! then nothing) as it goes; the checksum and signature hold only once End
//! has been read, so a consumer must not make what it read visible before
//! [`Reader::next_record`] has returned `None`.

use std::io::{Read, Write};

use super::{FLAG_KEYED, GlobalSnapshot, MAGIC, SnapshotError};

/// The format version of a stream.
pub const STREAM_VERSION: u32 = 2;
/// Stream header: magic, version, flags.
pub const STREAM_HEADER_LEN: usize = 16;
/// Largest chunk of data (blob, tensor, job body, pages) in one record.
pub const CHUNK: usize = 1 << 20;
/// Largest record payload: a chunk and its fields, or a JSON record.
pub const MAX_RECORD: usize = CHUNK + 64;
/// Longest name (function id, asset name, content type, tenant).
pub const MAX_NAME: usize = 4096;
/// Most dims of a tensor record (the executors' cap is 8).
pub const MAX_DIMS: usize = 16;

/// What a stream holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// A whole tenant, blobs included: a snapshot file.
    Whole = 0,
    /// A migration round: what changed since the last one.
    Round = 1,
    /// The last round of a migration, the tenant frozen: with its
    /// function records, globals and jobs.
    Final = 2,
    /// A whole tenant whose modules and assets the reader holds already
    /// (warm state kept across a restart): no blobs.
    Local = 3,
}

/// What a blob is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobKind {
    Module = 0,
    Assets = 1,
}

/// One record of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// First record: whose state, and what kind of stream.
    Tenant { tenant: String, kind: StreamKind },
    /// A function's record (`api::FunctionInfo` as JSON).
    Function { info_json: String },
    /// A module or assets file of `len` bytes, in the `Data` that follows.
    Blob {
        kind: BlobKind,
        sha256: [u8; 32],
        len: u64,
    },
    /// A chunk of the blob, tensor or job body announced last.
    Data(Vec<u8>),
    /// An instance of `function`, of `memory` bytes of linear memory now;
    /// `fresh` when the reader has not seen it (it starts zeroed).
    Instance {
        id: u64,
        function: String,
        memory: u64,
        fresh: bool,
    },
    /// Bytes of an instance's memory at `offset`.
    Pages {
        instance: u64,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// A tensor of an instance under `handle`, its `len` bytes in the
    /// `Data` that follows.
    Tensor {
        instance: u64,
        handle: i32,
        dtype: u8,
        dims: Vec<u64>,
        len: u64,
    },
    /// An asset handle of an instance.
    Asset {
        instance: u64,
        handle: i32,
        name: String,
    },
    /// A handle freed since the last round.
    Free { instance: u64, handle: i32 },
    /// An instance gone since the last round.
    Gone { instance: u64 },
    /// Every mutable global of an instance.
    Globals {
        instance: u64,
        globals: Vec<GlobalSnapshot>,
    },
    /// A job (`api::JobInfo` as JSON); a pending one with its request's
    /// content type and `body` bytes in the `Data` that follows.
    Job {
        info_json: String,
        content_type: Option<String>,
        body: Option<u64>,
    },
}

mod tag {
    pub const TENANT: u8 = 1;
    pub const FUNCTION: u8 = 2;
    pub const BLOB: u8 = 3;
    pub const DATA: u8 = 4;
    pub const INSTANCE: u8 = 5;
    pub const PAGES: u8 = 6;
    pub const TENSOR: u8 = 7;
    pub const ASSET: u8 = 8;
    pub const FREE: u8 = 9;
    pub const GONE: u8 = 10;
    pub const GLOBALS: u8 = 11;
    pub const JOB: u8 = 12;
    pub const END: u8 = 13;
}

/// The context under which the signing key is derived from
/// `TENSOR_WASM_SNAPSHOT_KEY` (BLAKE3's key derivation).
const SIGNING_CONTEXT: &str = "tensor-wasm snapshot format 2 signature";

/// The running checksum and signature of a stream.
struct Seal {
    /// `None` for a stream sealed later ([`Writer::unsealed`]).
    hash: Option<blake3::Hasher>,
    /// The signing key, derived from the snapshot key. The signature is
    /// keyed BLAKE3 of the checksum: one pass over the bytes makes both,
    /// where a MAC over the bytes would double the hashing of a move (and
    /// format 1's HMAC-SHA256 would halve its throughput).
    key: Option<[u8; 32]>,
}

impl Seal {
    fn new(key: Option<&[u8]>) -> Seal {
        Seal {
            hash: Some(blake3::Hasher::new()),
            key: key.map(|k| blake3::derive_key(SIGNING_CONTEXT, k)),
        }
    }

    fn update(&mut self, b: &[u8]) {
        if let Some(h) = &mut self.hash {
            h.update(b);
        }
    }

    /// The checksum, and the signature when keyed.
    fn finalize(&self) -> (blake3::Hash, Option<blake3::Hash>) {
        let sum = self
            .hash
            .as_ref()
            .map_or_else(|| blake3::hash(&[]), blake3::Hasher::finalize);
        let signature = self.key.map(|k| blake3::keyed_hash(&k, sum.as_bytes()));
        (sum, signature)
    }
}

/// Writes a stream: the header at once, records as given, End on
/// [`finish`](Self::finish).
pub struct Writer<W: Write> {
    out: W,
    seal: Seal,
    /// Data bytes the last `Blob`, `Tensor` or `Job` announced, not yet
    /// written.
    owed: u64,
    written: u64,
}

impl<W: Write> std::fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl<W: Write> Writer<W> {
    /// Starts a stream on `out`, signed under `key` when given.
    pub fn new(mut out: W, key: Option<&[u8]>) -> std::io::Result<Writer<W>> {
        let mut header = [0u8; STREAM_HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&STREAM_VERSION.to_le_bytes());
        let flags = if key.is_some() { FLAG_KEYED } else { 0 };
        header[12..16].copy_from_slice(&flags.to_le_bytes());
        out.write_all(&header)?;
        let mut seal = Seal::new(key);
        seal.update(&header);
        Ok(Writer {
            out,
            seal,
            owed: 0,
            written: STREAM_HEADER_LEN as u64,
        })
    }

    /// Starts an unsigned stream whose checksum its writer fills in
    /// later: it ends with [`finish_unsealed`](Self::finish_unsealed) and
    /// [`end_record`] of the checksum of every byte before it (what
    /// [`seal`] computes over a stream held whole). Writing costs a copy,
    /// not a hash, so that the hashing can wait.
    pub fn unsealed(mut out: W) -> std::io::Result<Writer<W>> {
        let mut header = [0u8; STREAM_HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&STREAM_VERSION.to_le_bytes());
        out.write_all(&header)?;
        Ok(Writer {
            out,
            seal: Seal {
                hash: None,
                key: None,
            },
            owed: 0,
            written: STREAM_HEADER_LEN as u64,
        })
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn frame(&mut self, tag: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut head = [0u8; 5];
        head[0] = tag;
        head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        self.out.write_all(&head)?;
        self.out.write_all(payload)?;
        self.seal.update(&head);
        self.seal.update(payload);
        self.written += 5 + payload.len() as u64;
        Ok(())
    }

    /// Writes one record. `Data` may be of any size: it is cut into chunks.
    pub fn record(&mut self, r: &Record) -> std::io::Result<()> {
        let misuse = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
        if let Record::Data(bytes) = r {
            return self.data(bytes);
        }
        if self.owed > 0 {
            return Err(misuse("a record before the announced data"));
        }
        let mut p = Vec::new();
        let t = match r {
            Record::Tenant { tenant, kind } => {
                put_str(&mut p, tenant);
                p.push(*kind as u8);
                tag::TENANT
            }
            Record::Function { info_json } => {
                put_str(&mut p, info_json);
                tag::FUNCTION
            }
            Record::Blob { kind, sha256, len } => {
                p.push(*kind as u8);
                p.extend_from_slice(sha256);
                p.extend_from_slice(&len.to_le_bytes());
                self.owed = *len;
                tag::BLOB
            }
            Record::Data(_) => unreachable!("handled above"),
            Record::Instance {
                id,
                function,
                memory,
                fresh,
            } => {
                p.extend_from_slice(&id.to_le_bytes());
                put_str(&mut p, function);
                p.extend_from_slice(&memory.to_le_bytes());
                p.push(u8::from(*fresh));
                tag::INSTANCE
            }
            Record::Pages {
                instance,
                offset,
                bytes,
            } => {
                if bytes.len() > CHUNK {
                    return Err(misuse("pages over one chunk"));
                }
                p.extend_from_slice(&instance.to_le_bytes());
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(bytes);
                tag::PAGES
            }
            Record::Tensor {
                instance,
                handle,
                dtype,
                dims,
                len,
            } => {
                p.extend_from_slice(&instance.to_le_bytes());
                p.extend_from_slice(&handle.to_le_bytes());
                p.push(*dtype);
                p.push(dims.len().min(255) as u8);
                for d in dims {
                    p.extend_from_slice(&d.to_le_bytes());
                }
                p.extend_from_slice(&len.to_le_bytes());
                self.owed = *len;
                tag::TENSOR
            }
            Record::Asset {
                instance,
                handle,
                name,
            } => {
                p.extend_from_slice(&instance.to_le_bytes());
                p.extend_from_slice(&handle.to_le_bytes());
                put_str(&mut p, name);
                tag::ASSET
            }
            Record::Free { instance, handle } => {
                p.extend_from_slice(&instance.to_le_bytes());
                p.extend_from_slice(&handle.to_le_bytes());
                tag::FREE
            }
            Record::Gone { instance } => {
                p.extend_from_slice(&instance.to_le_bytes());
                tag::GONE
            }
            Record::Globals { instance, globals } => {
                p.extend_from_slice(&instance.to_le_bytes());
                p.extend_from_slice(&(globals.len() as u32).to_le_bytes());
                for g in globals {
                    p.extend_from_slice(&g.index.to_le_bytes());
                    p.push(g.kind);
                    p.extend_from_slice(&g.bits.to_le_bytes());
                }
                tag::GLOBALS
            }
            Record::Job {
                info_json,
                content_type,
                body,
            } => {
                put_str(&mut p, info_json);
                match content_type {
                    Some(ct) => {
                        p.push(1);
                        put_str(&mut p, ct);
                    }
                    None => p.push(0),
                }
                match body {
                    Some(len) => {
                        p.push(1);
                        p.extend_from_slice(&len.to_le_bytes());
                        self.owed = *len;
                    }
                    None => p.push(0),
                }
                tag::JOB
            }
        };
        if p.len() > MAX_RECORD {
            return Err(misuse("a record over the size limit"));
        }
        self.frame(t, &p)
    }

    /// Writes a `Pages` record from a slice (at most [`CHUNK`] bytes),
    /// without building the record first.
    pub fn pages(&mut self, instance: u64, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        if self.owed > 0 || bytes.len() > CHUNK {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "pages inside announced data, or over one chunk",
            ));
        }
        let mut fields = [0u8; 16];
        fields[..8].copy_from_slice(&instance.to_le_bytes());
        fields[8..].copy_from_slice(&offset.to_le_bytes());
        let mut head = [0u8; 5];
        head[0] = tag::PAGES;
        head[1..].copy_from_slice(&((16 + bytes.len()) as u32).to_le_bytes());
        for part in [&head[..], &fields, bytes] {
            self.out.write_all(part)?;
            self.seal.update(part);
        }
        self.written += (5 + 16 + bytes.len()) as u64;
        Ok(())
    }

    /// Writes `bytes` of the announced data, in chunks.
    pub fn data(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.len() as u64 > self.owed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "more data than announced",
            ));
        }
        for chunk in bytes.chunks(CHUNK) {
            self.frame(tag::DATA, chunk)?;
            self.owed -= chunk.len() as u64;
        }
        Ok(())
    }

    /// Hands the output back without End, which the writer of an
    /// [`unsealed`](Self::unsealed) stream adds ([`end_record`]).
    pub fn finish_unsealed(self) -> std::io::Result<W> {
        if self.owed > 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the stream ends before the announced data",
            ));
        }
        Ok(self.out)
    }

    /// Writes End (checksum and signature over everything before it) and
    /// hands the output back.
    pub fn finish(mut self) -> std::io::Result<W> {
        if self.owed > 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the stream ends before the announced data",
            ));
        }
        if self.seal.hash.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an unsealed stream ends with finish_unsealed",
            ));
        }
        let mut p = [0u8; 64];
        let (sum, signature) = self.seal.finalize();
        p[..32].copy_from_slice(sum.as_bytes());
        if let Some(s) = signature {
            p[32..].copy_from_slice(s.as_bytes());
        }
        let mut head = [0u8; 5];
        head[0] = tag::END;
        head[1..].copy_from_slice(&64u32.to_le_bytes());
        self.out.write_all(&head)?;
        self.out.write_all(&p)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Bytes of the End record that closes every stream.
pub const END_LEN: usize = 5 + 64;

/// The End record of an unsigned stream whose checksum (BLAKE3 of every
/// byte before End) is `sum`.
pub fn end_record(sum: &[u8; 32]) -> [u8; END_LEN] {
    let mut end = [0u8; END_LEN];
    end[0] = tag::END;
    end[1..5].copy_from_slice(&64u32.to_le_bytes());
    end[5..37].copy_from_slice(sum);
    end
}

/// The checksum an unsigned stream's last [`END_LEN`] bytes carry, when
/// they are an End record.
pub fn end_checksum(tail: &[u8]) -> Option<[u8; 32]> {
    let (head, p) = tail.split_at_checked(5)?;
    if tail.len() != END_LEN || head[0] != tag::END || head[1..] != 64u32.to_le_bytes() {
        return None;
    }
    p[32..]
        .iter()
        .all(|&b| b == 0)
        .then(|| p[..32].try_into().ok())?
}

/// Fills in the checksum of a whole unsigned stream that ends with an End
/// record (written by [`Writer::unsealed`]); false when `stream` does not.
pub fn seal(stream: &mut [u8]) -> bool {
    let Some(body) = stream.len().checked_sub(END_LEN) else {
        return false;
    };
    if end_checksum(&stream[body..]).is_none() {
        return false;
    }
    let sum = blake3::hash(&stream[..body]);
    stream[body + 5..body + 37].copy_from_slice(sum.as_bytes());
    true
}

/// Writes a format 1 snapshot as a whole format 2 stream on `out` (signed
/// under `key` when given): its modules and assets files as blobs, then
/// each function, its instances (numbered in order; only the chunks of
/// memory that are not zeros), their tensors, asset handles and globals,
/// and the jobs. What an executor applies to replace a tenant's state
/// without dropping it first.
pub fn write_snapshot<W: Write>(
    snap: &super::TenantSnapshot,
    out: W,
    key: Option<&[u8]>,
) -> std::io::Result<W> {
    use sha2::Digest;
    let mut w = Writer::new(out, key)?;
    w.record(&Record::Tenant {
        tenant: snap.tenant.clone(),
        kind: StreamKind::Whole,
    })?;
    let blob = |w: &mut Writer<W>, kind, bytes: &[u8]| {
        w.record(&Record::Blob {
            kind,
            sha256: sha2::Sha256::digest(bytes).into(),
            len: bytes.len() as u64,
        })?;
        w.data(bytes)
    };
    let mut id = 0u64;
    for f in &snap.functions {
        blob(&mut w, BlobKind::Module, &f.wasm)?;
        if let Some(a) = &f.assets {
            blob(&mut w, BlobKind::Assets, a)?;
        }
        w.record(&Record::Function {
            info_json: f.info_json.clone(),
        })?;
        let function = serde_json::from_str::<serde_json::Value>(&f.info_json)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_string))
            .ok_or_else(|| std::io::Error::other("a function record without its id"))?;
        for inst in &f.instances {
            id += 1;
            w.record(&Record::Instance {
                id,
                function: function.clone(),
                memory: inst.memory.len() as u64,
                fresh: true,
            })?;
            for (i, chunk) in inst.memory.chunks(CHUNK).enumerate() {
                if chunk.iter().any(|&b| b != 0) {
                    w.pages(id, (i * CHUNK) as u64, chunk)?;
                }
            }
            for t in &inst.tensors {
                w.record(&Record::Tensor {
                    instance: id,
                    handle: t.handle,
                    dtype: t.dtype,
                    dims: t.dims.clone(),
                    len: t.data.len() as u64,
                })?;
                w.data(&t.data)?;
            }
            for a in &inst.asset_handles {
                w.record(&Record::Asset {
                    instance: id,
                    handle: a.handle,
                    name: a.name.clone(),
                })?;
            }
            w.record(&Record::Globals {
                instance: id,
                globals: inst.globals.clone(),
            })?;
        }
    }
    for j in &snap.jobs {
        w.record(&Record::Job {
            info_json: j.info_json.clone(),
            content_type: j.content_type.clone(),
            body: j.body.as_ref().map(|b| b.len() as u64),
        })?;
        if let Some(b) = &j.body {
            w.data(b)?;
        }
    }
    w.finish()
}

fn put_str(p: &mut Vec<u8>, s: &str) {
    p.extend_from_slice(&(s.len() as u32).to_le_bytes());
    p.extend_from_slice(s.as_bytes());
}

/// Reads the fields of one payload, refusing anything out of bounds.
struct Fields<'a> {
    b: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.b.len() < n {
            return Err(SnapshotError::Malformed("a record is cut short".into()));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn i32(&mut self) -> Result<i32, SnapshotError> {
        Ok(i32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }
    fn str(&mut self, max: usize) -> Result<String, SnapshotError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(SnapshotError::Malformed(format!(
                "a string of {n} bytes, over {max}"
            )));
        }
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| SnapshotError::Malformed("a string is not UTF-8".into()))
    }
    fn flag(&mut self) -> Result<bool, SnapshotError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(SnapshotError::Malformed(format!("a flag of {v}"))),
        }
    }
    fn done(self) -> Result<(), SnapshotError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::Malformed(
                "a record has trailing bytes".into(),
            ))
        }
    }
}

/// Reads a stream record by record, checking framing as it goes and the
/// checksum and signature at End.
pub struct Reader<R: Read> {
    input: R,
    seal: Seal,
    /// Whether the stream says it is signed.
    keyed: bool,
    owed: u64,
    ended: bool,
    read: u64,
    max: u64,
    /// A buffer handed back with [`recycle`](Self::recycle), for the next
    /// `Pages` or `Data` payload.
    spare: Vec<u8>,
}

impl<R: Read> std::fmt::Debug for Reader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header of a format 2 stream: magic, version,
    /// and, when this reader has a `key`, that the stream is signed. A
    /// stream longer than `max` bytes is refused as it passes that.
    pub fn new(mut input: R, key: Option<&[u8]>, max: u64) -> Result<Reader<R>, SnapshotError> {
        let mut header = [0u8; STREAM_HEADER_LEN];
        read_exact(&mut input, &mut header)?;
        Self::with_header(input, header, key, max)
    }

    /// As [`new`](Self::new), with the header's bytes read already.
    pub fn with_header(
        input: R,
        header: [u8; STREAM_HEADER_LEN],
        key: Option<&[u8]>,
        max: u64,
    ) -> Result<Reader<R>, SnapshotError> {
        if header[..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or([0; 4]));
        if version != STREAM_VERSION {
            return Err(SnapshotError::UnsupportedVersion(version));
        }
        let flags = u32::from_le_bytes(header[12..16].try_into().unwrap_or([0; 4]));
        let keyed = flags & FLAG_KEYED != 0;
        if key.is_some() && !keyed {
            return Err(SnapshotError::Unkeyed);
        }
        let mut seal = Seal::new(key);
        seal.update(&header);
        Ok(Reader {
            input,
            seal,
            keyed,
            owed: 0,
            ended: false,
            read: STREAM_HEADER_LEN as u64,
            max,
            spare: Vec::new(),
        })
    }

    /// Hands back the bytes of a `Pages` or `Data` record once used, so
    /// that the next one is read into them instead of a new allocation.
    pub fn recycle(&mut self, bytes: Vec<u8>) {
        if bytes.capacity() > self.spare.capacity() {
            self.spare = bytes;
        }
    }

    /// Reads `n` bytes of payload into the spare buffer and seals them.
    fn bulk(&mut self, n: usize) -> Result<Vec<u8>, SnapshotError> {
        let mut b = std::mem::take(&mut self.spare);
        b.clear();
        b.resize(n, 0);
        read_exact(&mut self.input, &mut b)?;
        self.seal.update(&b);
        Ok(b)
    }

    /// Whether the stream is signed (checked only by a reader with a key).
    pub fn keyed(&self) -> bool {
        self.keyed
    }

    /// Bytes read so far.
    pub fn read_bytes(&self) -> u64 {
        self.read
    }

    /// Data bytes still owed to the last `Blob`, `Tensor` or `Job`.
    pub fn owed(&self) -> u64 {
        self.owed
    }

    /// The next record; `None` once End has been read and verified. Any
    /// framing or integrity failure is an error, and so is input that ends
    /// before End.
    pub fn next_record(&mut self) -> Result<Option<Record>, SnapshotError> {
        if self.ended {
            return Ok(None);
        }
        let mut head = [0u8; 5];
        read_exact(&mut self.input, &mut head)?;
        let t = head[0];
        let len = u32::from_le_bytes(head[1..].try_into().unwrap_or([0; 4])) as usize;
        if len > MAX_RECORD {
            return Err(SnapshotError::Malformed(format!(
                "a record of {len} bytes, over {MAX_RECORD}"
            )));
        }
        self.read += 5 + len as u64;
        if self.read > self.max {
            return Err(SnapshotError::TooLarge(self.read, self.max));
        }
        if t == tag::DATA {
            if len as u64 > self.owed || len == 0 {
                return Err(SnapshotError::Malformed(
                    "data that no record announced".into(),
                ));
            }
            self.seal.update(&head);
            let payload = self.bulk(len)?;
            self.owed -= len as u64;
            return Ok(Some(Record::Data(payload)));
        }
        if self.owed > 0 && t != tag::END {
            return Err(SnapshotError::Malformed(format!(
                "a record while {} bytes of data are owed",
                self.owed
            )));
        }
        if t == tag::PAGES {
            // The bytes go straight into a reused buffer, after the fields.
            let mut fields = [0u8; 16];
            if len < fields.len() {
                return Err(SnapshotError::Malformed("a short Pages record".into()));
            }
            read_exact(&mut self.input, &mut fields)?;
            self.seal.update(&head);
            self.seal.update(&fields);
            let bytes = self.bulk(len - fields.len())?;
            let (instance, offset) = fields.split_at(8);
            return Ok(Some(Record::Pages {
                instance: u64::from_le_bytes(instance.try_into().unwrap_or([0; 8])),
                offset: u64::from_le_bytes(offset.try_into().unwrap_or([0; 8])),
                bytes,
            }));
        }
        let mut payload = vec![0u8; len];
        read_exact(&mut self.input, &mut payload)?;
        if t == tag::END {
            return self.end(&payload).map(|()| None);
        }
        self.seal.update(&head);
        self.seal.update(&payload);
        let mut f = Fields { b: &payload };
        let record = match t {
            tag::TENANT => {
                let tenant = f.str(MAX_NAME)?;
                let kind = match f.u8()? {
                    0 => StreamKind::Whole,
                    1 => StreamKind::Round,
                    2 => StreamKind::Final,
                    3 => StreamKind::Local,
                    k => return Err(SnapshotError::Malformed(format!("stream kind {k}"))),
                };
                f.done()?;
                Record::Tenant { tenant, kind }
            }
            tag::FUNCTION => {
                let info_json = f.str(MAX_RECORD)?;
                f.done()?;
                Record::Function { info_json }
            }
            tag::BLOB => {
                let kind = match f.u8()? {
                    0 => BlobKind::Module,
                    1 => BlobKind::Assets,
                    k => return Err(SnapshotError::Malformed(format!("blob kind {k}"))),
                };
                let sha256: [u8; 32] = f.take(32)?.try_into().unwrap_or([0; 32]);
                let len = f.u64()?;
                f.done()?;
                self.owed = len;
                Record::Blob { kind, sha256, len }
            }
            tag::INSTANCE => {
                let id = f.u64()?;
                let function = f.str(MAX_NAME)?;
                let memory = f.u64()?;
                let fresh = f.flag()?;
                f.done()?;
                Record::Instance {
                    id,
                    function,
                    memory,
                    fresh,
                }
            }
            tag::TENSOR => {
                let instance = f.u64()?;
                let handle = f.i32()?;
                let dtype = f.u8()?;
                let ndim = f.u8()? as usize;
                if ndim > MAX_DIMS {
                    return Err(SnapshotError::Malformed(format!("a tensor of {ndim} dims")));
                }
                let mut dims = Vec::with_capacity(ndim);
                for _ in 0..ndim {
                    dims.push(f.u64()?);
                }
                let len = f.u64()?;
                f.done()?;
                self.owed = len;
                Record::Tensor {
                    instance,
                    handle,
                    dtype,
                    dims,
                    len,
                }
            }
            tag::ASSET => {
                let instance = f.u64()?;
                let handle = f.i32()?;
                let name = f.str(MAX_NAME)?;
                f.done()?;
                Record::Asset {
                    instance,
                    handle,
                    name,
                }
            }
            tag::FREE => {
                let instance = f.u64()?;
                let handle = f.i32()?;
                f.done()?;
                Record::Free { instance, handle }
            }
            tag::GONE => {
                let instance = f.u64()?;
                f.done()?;
                Record::Gone { instance }
            }
            tag::GLOBALS => {
                let instance = f.u64()?;
                let n = f.u32()? as usize;
                // Each global takes 13 bytes: the count cannot outrun the
                // payload.
                if n > len / 13 {
                    return Err(SnapshotError::Malformed(format!("{n} globals")));
                }
                let mut globals = Vec::with_capacity(n);
                for _ in 0..n {
                    let index = f.u32()?;
                    let kind = f.u8()?;
                    let bits = f.u64()?;
                    globals.push(GlobalSnapshot { index, kind, bits });
                }
                f.done()?;
                Record::Globals { instance, globals }
            }
            tag::JOB => {
                let info_json = f.str(MAX_RECORD)?;
                let content_type = if f.flag()? {
                    Some(f.str(MAX_NAME)?)
                } else {
                    None
                };
                let body = if f.flag()? { Some(f.u64()?) } else { None };
                f.done()?;
                self.owed = body.unwrap_or(0);
                Record::Job {
                    info_json,
                    content_type,
                    body,
                }
            }
            other => {
                return Err(SnapshotError::Malformed(format!("record tag {other}")));
            }
        };
        Ok(Some(record))
    }

    fn end(&mut self, payload: &[u8]) -> Result<(), SnapshotError> {
        if payload.len() != 64 {
            return Err(SnapshotError::Malformed("End is not 64 bytes".into()));
        }
        if self.owed > 0 {
            return Err(SnapshotError::Malformed(
                "the stream ends before the announced data".into(),
            ));
        }
        let (sum, signature) = self.seal.finalize();
        if sum.as_bytes() != &payload[..32] {
            return Err(SnapshotError::Checksum);
        }
        if let Some(expected) = signature {
            let signature: [u8; 32] = payload[32..].try_into().unwrap_or([0; 32]);
            // `blake3::Hash` compares in constant time.
            if expected != signature {
                return Err(SnapshotError::BadSignature);
            }
        }
        // Nothing may follow End.
        let mut extra = [0u8; 1];
        match self.input.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => {
                return Err(SnapshotError::Malformed("bytes after End".into()));
            }
            Err(e) => return Err(SnapshotError::Malformed(format!("after End: {e}"))),
        }
        self.ended = true;
        Ok(())
    }

    /// The input, once the stream has ended.
    pub fn into_inner(self) -> R {
        self.input
    }
}

fn read_exact(input: &mut impl Read, buf: &mut [u8]) -> Result<(), SnapshotError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            SnapshotError::Malformed("the stream ends before its End record".into())
        }
        _ => SnapshotError::Malformed(format!("reading the stream: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::Tenant {
                tenant: "t1".into(),
                kind: StreamKind::Whole,
            },
            Record::Function {
                info_json: "{\"id\":\"fn-1\"}".into(),
            },
            Record::Blob {
                kind: BlobKind::Module,
                sha256: [7; 32],
                len: 3,
            },
            Record::Data(b"abc".to_vec()),
            Record::Instance {
                id: 9,
                function: "fn-1".into(),
                memory: 65536,
                fresh: true,
            },
            Record::Pages {
                instance: 9,
                offset: 4096,
                bytes: vec![1; 4096],
            },
            Record::Tensor {
                instance: 9,
                handle: 3,
                dtype: 0,
                dims: vec![2, 2],
                len: 16,
            },
            Record::Data(vec![0; 16]),
            Record::Asset {
                instance: 9,
                handle: 1,
                name: "w".into(),
            },
            Record::Free {
                instance: 9,
                handle: 4,
            },
            Record::Globals {
                instance: 9,
                globals: vec![GlobalSnapshot {
                    index: 0,
                    kind: 1,
                    bits: 42,
                }],
            },
            Record::Gone { instance: 8 },
            Record::Job {
                info_json: "{}".into(),
                content_type: Some("text/plain".into()),
                body: Some(2),
            },
            Record::Data(b"hi".to_vec()),
            Record::Job {
                info_json: "{}".into(),
                content_type: None,
                body: None,
            },
        ]
    }

    fn write(records: &[Record], key: Option<&[u8]>) -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), key).unwrap();
        for r in records {
            w.record(r).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_all(bytes: &[u8], key: Option<&[u8]>) -> Result<Vec<Record>, SnapshotError> {
        let mut r = Reader::new(bytes, key, 1 << 30)?;
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok(out)
    }

    #[test]
    fn records_round_trip_keyed_and_unkeyed() {
        let s = sample();
        assert_eq!(read_all(&write(&s, None), None).unwrap(), s);
        let keyed = write(&s, Some(b"k"));
        assert_eq!(read_all(&keyed, Some(b"k")).unwrap(), s);
        assert_eq!(read_all(&keyed, None).unwrap(), s);
        assert_eq!(
            read_all(&write(&s, None), Some(b"k")),
            Err(SnapshotError::Unkeyed)
        );
        assert_eq!(
            read_all(&keyed, Some(b"other")),
            Err(SnapshotError::BadSignature)
        );
    }

    #[test]
    fn an_unsealed_stream_sealed_later_reads_as_a_sealed_one() {
        let s = sample();
        let mut w = Writer::unsealed(Vec::new()).unwrap();
        for r in &s {
            w.record(r).unwrap();
        }
        let mut bytes = w.finish_unsealed().unwrap();
        bytes.extend_from_slice(&end_record(&[0; 32]));
        assert_eq!(
            read_all(&bytes, None),
            Err(SnapshotError::Checksum),
            "not sealed yet"
        );
        assert!(seal(&mut bytes));
        assert_eq!(bytes, write(&s, None), "the same bytes as a sealed stream");
        assert_eq!(read_all(&bytes, None).unwrap(), s);
        let tail = &bytes[bytes.len() - END_LEN..];
        let sum = blake3::hash(&bytes[..bytes.len() - END_LEN]);
        assert_eq!(end_checksum(tail), Some(*sum.as_bytes()));
        // Not an End record: too short, another tag, a signature.
        assert!(!seal(&mut bytes[..10].to_vec()));
        assert_eq!(end_checksum(&bytes[..END_LEN]), None);
        let mut signed = tail.to_vec();
        signed[END_LEN - 1] = 1;
        assert_eq!(end_checksum(&signed), None);
        let unsealed = Writer::unsealed(Vec::new()).unwrap();
        assert!(unsealed.finish().is_err(), "End needs the checksum");
    }

    #[test]
    fn large_data_is_cut_into_chunks() {
        let big = vec![5u8; 2 * CHUNK + 10];
        let mut w = Writer::new(Vec::new(), None).unwrap();
        w.record(&Record::Blob {
            kind: BlobKind::Assets,
            sha256: [0; 32],
            len: big.len() as u64,
        })
        .unwrap();
        w.data(&big).unwrap();
        let bytes = w.finish().unwrap();
        let got = read_all(&bytes, None).unwrap();
        assert_eq!(got.len(), 4, "a blob and three chunks");
        let joined: Vec<u8> = got[1..]
            .iter()
            .flat_map(|r| match r {
                Record::Data(d) => d.clone(),
                _ => panic!("{r:?}"),
            })
            .collect();
        assert_eq!(joined, big);
    }

    #[test]
    fn framing_and_integrity_are_checked() {
        let good = write(&sample(), None);
        // Cut anywhere: an error, never a short success.
        for cut in [0, 10, 16, 20, good.len() / 2, good.len() - 1] {
            assert!(read_all(&good[..cut], None).is_err(), "cut at {cut}");
        }
        // A flipped byte in a payload: the checksum.
        let mut bad = good.clone();
        bad[40] ^= 1;
        assert!(read_all(&bad, None).is_err());
        // Bytes after End.
        let mut long = good.clone();
        long.push(0);
        assert!(read_all(&long, None).is_err());
        // A record past the size limit, before anything is allocated.
        let mut huge = good[..STREAM_HEADER_LEN].to_vec();
        huge.push(tag::PAGES);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_all(&huge, None),
            Err(SnapshotError::Malformed(_))
        ));
        // Data nobody announced, and a record inside announced data.
        let mut w = Writer::new(Vec::new(), None).unwrap();
        assert!(w.data(b"x").is_err());
        w.record(&Record::Blob {
            kind: BlobKind::Module,
            sha256: [0; 32],
            len: 4,
        })
        .unwrap();
        assert!(w.record(&Record::Gone { instance: 1 }).is_err());
        // The version and magic.
        let mut bad = good.clone();
        bad[8] = 1;
        assert_eq!(
            read_all(&bad, None),
            Err(SnapshotError::UnsupportedVersion(1))
        );
        let mut bad = good;
        bad[0] = b'X';
        assert_eq!(read_all(&bad, None), Err(SnapshotError::BadMagic));
    }

    #[test]
    fn a_stream_past_the_reader_limit_is_refused() {
        let good = write(&sample(), None);
        let mut r = Reader::new(&good[..], None, 100).unwrap();
        let mut err = None;
        loop {
            match r.next_record() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert!(matches!(err, Some(SnapshotError::TooLarge(..))));
    }

    #[test]
    fn a_format_1_snapshot_reads_back_as_a_whole_stream() {
        use crate::snapshot::{
            AssetHandle, FunctionSnapshot, InstanceSnapshot, JobSnapshot, TenantSnapshot,
            TensorSnapshot,
        };
        let mut memory = vec![0u8; 3 * CHUNK];
        memory[CHUNK + 5] = 9; // only the middle chunk is not zeros
        let snap = TenantSnapshot {
            tenant: "t1".into(),
            functions: vec![FunctionSnapshot {
                info_json: r#"{"id":"f-1","name":"n"}"#.into(),
                wasm: b"\0asm-ish".to_vec(),
                assets: Some(vec![7; 10]),
                instances: vec![InstanceSnapshot {
                    memory,
                    globals: vec![GlobalSnapshot {
                        index: 1,
                        kind: 0,
                        bits: 42,
                    }],
                    tensors: vec![TensorSnapshot {
                        handle: 3,
                        dtype: 0,
                        dims: vec![2],
                        data: vec![1; 8],
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
        };
        let bytes = write_snapshot(&snap, Vec::new(), Some(b"k")).unwrap();
        let got = read_all(&bytes, Some(b"k")).unwrap();
        use sha2::Digest;
        let sha = |b: &[u8]| -> [u8; 32] { sha2::Sha256::digest(b).into() };
        assert_eq!(
            got,
            vec![
                Record::Tenant {
                    tenant: "t1".into(),
                    kind: StreamKind::Whole
                },
                Record::Blob {
                    kind: BlobKind::Module,
                    sha256: sha(b"\0asm-ish"),
                    len: 8
                },
                Record::Data(b"\0asm-ish".to_vec()),
                Record::Blob {
                    kind: BlobKind::Assets,
                    sha256: sha(&[7; 10]),
                    len: 10
                },
                Record::Data(vec![7; 10]),
                Record::Function {
                    info_json: r#"{"id":"f-1","name":"n"}"#.into()
                },
                Record::Instance {
                    id: 1,
                    function: "f-1".into(),
                    memory: 3 * CHUNK as u64,
                    fresh: true
                },
                Record::Pages {
                    instance: 1,
                    offset: CHUNK as u64,
                    bytes: snap.functions[0].instances[0].memory[CHUNK..2 * CHUNK].to_vec()
                },
                Record::Tensor {
                    instance: 1,
                    handle: 3,
                    dtype: 0,
                    dims: vec![2],
                    len: 8
                },
                Record::Data(vec![1; 8]),
                Record::Asset {
                    instance: 1,
                    handle: 1,
                    name: "w".into()
                },
                Record::Globals {
                    instance: 1,
                    globals: vec![GlobalSnapshot {
                        index: 1,
                        kind: 0,
                        bits: 42
                    }]
                },
                Record::Job {
                    info_json: "{}".into(),
                    content_type: Some("text/plain".into()),
                    body: Some(2)
                },
                Record::Data(b"hi".to_vec()),
            ]
        );
        // Signed: another key refuses it.
        assert!(matches!(
            read_all(&bytes, Some(b"other")),
            Err(SnapshotError::BadSignature)
        ));
    }
}
