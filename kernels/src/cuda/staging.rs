//! Host↔device copies through pinned staging buffers.
//!
//! Only pinned host memory copies at the link's full rate (about 55 GB/s
//! on PCIe 5.0 x16); a pageable copy is staged by the driver and runs at a
//! fraction of that. Copying into a pinned buffer first and then uploading,
//! one after the other, is in turn bounded by the host copy, since one
//! thread's memcpy is slower than the link. So each backend keeps two
//! pinned chunks and alternates them: while the DMA engine moves chunk i,
//! the host fills (or drains) chunk i + 1. A chunk is reused only after its
//! previous copy has completed: each chunk has an event of its own,
//! recorded after every copy in or out of it and waited on before the host
//! touches it again, so this ordering does not rest on cudarc's event
//! tracking, which the backend turns off. Uploads fill a chunk on several
//! threads at once (rayon's pool, pieces of at least
//! [`PARALLEL_PIECE_BYTES`]), so the host side keeps up with the DMA.
//!
//! The buffers are allocated on first use and freed with the backend, so an
//! idle tenant holds no pinned memory beyond its two chunks.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DriverError, PinnedHostSlice};

use super::device::driver_error;
use crate::error::{KernelError, Result};
use crate::sys::cuda::{alloc_pinned, download_to_pinned, upload_from_pinned};

/// Bytes per staging chunk: 4 MiB moves in ≈75 µs at 55 GB/s, long enough
/// to amortize the event recorded and waited on per chunk, while two chunks
/// per tenant keep pinned memory (which the OS cannot page out) modest.
pub(crate) const STAGING_CHUNK_BYTES: usize = 4 << 20;

/// Smallest piece of a chunk one thread copies: below this, handing work
/// to the pool costs more than the copy (≈ 20 µs at 25 GB/s).
pub(crate) const PARALLEL_PIECE_BYTES: usize = 512 << 10;

/// Copies `src` into `dst` (same length), in pieces of
/// [`PARALLEL_PIECE_BYTES`] copied by rayon's threads; a copy of under two
/// pieces stays on the calling thread (handing it to the pool would cost
/// more, on the path of every small `new`).
pub(crate) fn parallel_copy(dst: &mut [u8], src: &[u8]) {
    use rayon::prelude::*;
    debug_assert_eq!(dst.len(), src.len());
    if src.len() < 2 * PARALLEL_PIECE_BYTES {
        dst.copy_from_slice(src);
        return;
    }
    dst.par_chunks_mut(PARALLEL_PIECE_BYTES)
        .zip(src.par_chunks(PARALLEL_PIECE_BYTES))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// A pinned chunk and the event recorded after the last copy in or out
/// of it.
#[derive(Debug)]
pub(crate) struct Chunk {
    buf: PinnedHostSlice<u8>,
    done: CudaEvent,
}

impl Chunk {
    fn new(ctx: &Arc<CudaContext>) -> std::result::Result<Chunk, DriverError> {
        Ok(Chunk {
            buf: alloc_pinned(ctx, STAGING_CHUNK_BYTES)?,
            done: ctx.new_event(None)?,
        })
    }

    /// The host side, once the last copy in or out of the chunk is done.
    fn host(&self) -> std::result::Result<&[u8], DriverError> {
        self.done.synchronize()?;
        self.buf.as_slice()
    }

    /// As [`Chunk::host`], for writing.
    fn host_mut(&mut self) -> std::result::Result<&mut [u8], DriverError> {
        self.done.synchronize()?;
        self.buf.as_mut_slice()
    }
}

/// A backend's pair of pinned chunks.
#[derive(Debug, Default)]
pub(crate) struct Staging {
    chunks: Mutex<Option<[Chunk; 2]>>,
}

impl Staging {
    fn with_chunks<T>(
        &self,
        ctx: &Arc<CudaContext>,
        op: &'static str,
        f: impl FnOnce(&mut [Chunk; 2]) -> Result<T>,
    ) -> Result<T> {
        let mut guard = self
            .chunks
            .lock()
            .map_err(|_| KernelError::Device("staging buffer lock poisoned".into()))?;
        if guard.is_none() {
            let a = Chunk::new(ctx).map_err(|e| driver_error(op, e))?;
            let b = Chunk::new(ctx).map_err(|e| driver_error(op, e))?;
            *guard = Some([a, b]);
        }
        match guard.as_mut() {
            Some(chunks) => f(chunks),
            None => Err(KernelError::Device("staging buffers missing".into())),
        }
    }

    /// Enqueues the upload of `src` into `dst` (same length). Returns once
    /// every byte of `src` has been copied into a pinned chunk; the DMA of
    /// the last chunks may still be in flight, and `src` may be reused.
    pub(crate) fn upload(
        &self,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        op: &'static str,
        src: &[u8],
        dst: &mut CudaSlice<u8>,
    ) -> Result<()> {
        if src.len() != dst.len() {
            return Err(KernelError::invalid(
                op,
                "upload length differs from the buffer",
            ));
        }
        self.with_chunks(ctx, op, |chunks| {
            for (i, part) in src.chunks(STAGING_CHUNK_BYTES).enumerate() {
                let chunk = &mut chunks[i % 2];
                // Waits until the previous copy out of this chunk is done.
                let host = chunk.host_mut().map_err(|e| driver_error(op, e))?;
                parallel_copy(&mut host[..part.len()], part);
                let at = i * STAGING_CHUNK_BYTES;
                upload_from_pinned(stream, &chunk.buf, &chunk.done, part.len(), dst, at)
                    .map_err(|e| driver_error(op, e))?;
            }
            Ok(())
        })
    }

    /// Copies `src` to a new vector, waiting for every op enqueued on
    /// `stream` before it (a `src` of another stream is joined by the
    /// caller, see `CrossStream`).
    pub(crate) fn download(
        &self,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        op: &'static str,
        src: &CudaSlice<u8>,
    ) -> Result<Vec<u8>> {
        let len = src.len();
        let mut out = Vec::with_capacity(len);
        let n_chunks = len.div_ceil(STAGING_CHUNK_BYTES);
        let span = |i: usize| {
            let start = i * STAGING_CHUNK_BYTES;
            (start, (len - start).min(STAGING_CHUNK_BYTES))
        };
        self.with_chunks(ctx, op, |chunks| {
            let enqueue = |chunks: &mut [Chunk; 2], i: usize| {
                let (start, n) = span(i);
                let chunk = &mut chunks[i % 2];
                download_to_pinned(stream, src, start, n, &mut chunk.buf, &chunk.done)
                    .map_err(|e| driver_error(op, e))
            };
            if n_chunks > 0 {
                enqueue(chunks, 0)?;
            }
            for i in 0..n_chunks {
                // Chunk i + 1 goes into the buffer chunk i - 1 used, which
                // the previous iteration has drained.
                if i + 1 < n_chunks {
                    enqueue(chunks, i + 1)?;
                }
                let (_, n) = span(i);
                let host = chunks[i % 2].host().map_err(|e| driver_error(op, e))?;
                out.extend_from_slice(&host[..n]);
            }
            Ok(())
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_copy_copies_every_byte() {
        for len in [
            0,
            1,
            PARALLEL_PIECE_BYTES - 1,
            2 * PARALLEL_PIECE_BYTES,
            STAGING_CHUNK_BYTES - 7,
            STAGING_CHUNK_BYTES,
        ] {
            let src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut dst = vec![0xAAu8; len];
            parallel_copy(&mut dst, &src);
            assert!(dst == src, "length {len}");
        }
    }
}
