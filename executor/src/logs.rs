//! A function's captured guest stdout/stderr: a bounded ring, newest last.
//!
//! Every instance of a function writes into the same ring; when it is full
//! the oldest bytes go. Writes never fail and never block, so a chatty guest
//! cannot stall or trap itself through logging.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// The log of one function, shared by its instances.
#[derive(Clone, Debug)]
pub struct FunctionLog {
    ring: Arc<Mutex<VecDeque<u8>>>,
    capacity: usize,
}

impl FunctionLog {
    /// A log keeping the newest `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        FunctionLog {
            ring: Arc::new(Mutex::new(VecDeque::with_capacity(capacity.min(1 << 16)))),
            capacity,
        }
    }

    /// Appends bytes, dropping the oldest past the capacity.
    pub fn append(&self, bytes: &[u8]) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let keep = &bytes[bytes.len().saturating_sub(self.capacity)..];
        let overflow = (ring.len() + keep.len()).saturating_sub(self.capacity);
        let drop = overflow.min(ring.len());
        ring.drain(..drop);
        ring.extend(keep);
    }

    /// The kept bytes, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().copied().collect()
    }
}

/// Largest write announced as ready at once; WASI splits larger ones.
const WRITE_CHUNK: usize = 64 << 10;

impl IsTerminal for FunctionLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for FunctionLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for FunctionLog {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_CHUNK)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for FunctionLog {
    async fn ready(&mut self) {}
}

impl AsyncWrite for FunctionLog {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_bytes() {
        let log = FunctionLog::new(8);
        log.append(b"hello ");
        log.append(b"world");
        assert_eq!(log.contents(), b"lo world");
        log.append(b"0123456789");
        assert_eq!(log.contents(), b"23456789");
    }
}
