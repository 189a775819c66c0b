//! Blocking readers and writers over channels of byte chunks: how a
//! snapshot stream, written or read on a blocking thread, meets an HTTP
//! body on the async side, with bounded memory in between.

use std::io::{Read, Write};

use bytes::{Buf, Bytes, BytesMut};
use tokio::sync::mpsc;

/// Chunks in flight between the two sides: 8 (of about [`CHUNK`] bytes).
pub const CHUNKS_IN_FLIGHT: usize = 8;

/// Bytes gathered before a chunk is handed over: 1 MiB.
pub const CHUNK: usize = 1 << 20;

/// The sending half: a [`Write`] for a blocking thread.
#[derive(Debug)]
pub struct ChunkWriter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: BytesMut,
}

/// The receiving half of a [`ChunkWriter`]: a stream for an HTTP body.
pub type ChunkStream = tokio_stream_shim::ReceiverStream;

/// A writer and the stream of what it writes.
pub fn chunk_pipe() -> (ChunkWriter, ChunkStream) {
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    (
        ChunkWriter {
            tx,
            buf: BytesMut::with_capacity(CHUNK),
        },
        tokio_stream_shim::ReceiverStream(rx),
    )
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the reader went"))
    }

    /// Ends the stream with an error the reader sees (the HTTP body is cut
    /// short, so the reader never sees its End).
    pub fn fail(mut self, e: std::io::Error) {
        self.buf.clear();
        let _ = self.tx.blocking_send(Err(e));
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK {
            self.send()?;
            self.buf.reserve(CHUNK);
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        let _ = self.send();
    }
}

/// A [`Read`] over chunks that arrive on a channel, for a blocking thread.
#[derive(Debug)]
pub struct ChunkReader {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    cur: Bytes,
}

/// The sending half of a [`ChunkReader`].
pub type ChunkSender = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// A reader and the sender that feeds it.
pub fn chunk_reader() -> (ChunkSender, ChunkReader) {
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    (
        tx,
        ChunkReader {
            rx,
            cur: Bytes::new(),
        },
    )
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}

/// Feeds an HTTP body into `tx`, chunk by chunk, until it ends or the
/// reader goes.
pub async fn feed(body: axum::body::Body, tx: ChunkSender) {
    use futures_util::StreamExt;
    let mut s = body.into_data_stream();
    while let Some(chunk) = s.next().await {
        let item = chunk.map_err(std::io::Error::other);
        let failed = item.is_err();
        if tx.send(item).await.is_err() || failed {
            return;
        }
    }
}

mod tokio_stream_shim {
    //! A `Stream` over an mpsc receiver (what `tokio-stream` offers, in a
    //! few lines).
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use tokio::sync::mpsc;

    #[derive(Debug)]
    pub struct ReceiverStream(pub mpsc::Receiver<Result<Bytes, std::io::Error>>);

    impl futures_util::Stream for ReceiverStream {
        type Item = Result<Bytes, std::io::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_cross_in_order_with_bounded_chunks() {
        use futures_util::StreamExt;
        let (mut w, mut s) = chunk_pipe();
        let writer = tokio::task::spawn_blocking(move || {
            for i in 0..5000u32 {
                w.write_all(&[(i % 251) as u8; 1000]).unwrap();
            }
            w.flush().unwrap();
        });
        let mut got = Vec::new();
        while let Some(c) = s.next().await {
            let c = c.unwrap();
            assert!(c.len() <= CHUNK + 1000);
            got.extend_from_slice(&c);
        }
        writer.await.unwrap();
        assert_eq!(got.len(), 5_000_000);
        assert!(
            got.chunks(1000)
                .enumerate()
                .all(|(i, c)| c[0] == (i % 251) as u8)
        );

        let (tx, mut r) = chunk_reader();
        let reader = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            r.read_to_end(&mut all).unwrap();
            all
        });
        for part in got.chunks(777_777) {
            tx.send(Ok(Bytes::copy_from_slice(part))).await.unwrap();
        }
        drop(tx);
        assert_eq!(reader.await.unwrap(), got);
    }
}
