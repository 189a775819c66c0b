//! Rust SDK for TensorWasm functions: safe tensors over guest ABI v2
//! (`docs/GUEST-ABI.md`), built for `wasm32-wasip1`.
//!
//! A function is a `cdylib` that declares its entry points with
//! [`handler!`]:
//!
//! ```no_run
//! use tensor_wasm_guest::{Call, Result, Tensor};
//!
//! fn handle(call: &Call) -> Result<()> {
//!     let x = call.input("x")?;
//!     let w = Tensor::asset("w")?;
//!     call.output("y", &x.matmul(&w)?.relu()?)
//! }
//!
//! tensor_wasm_guest::handler!(handle);
//! ```
//!
//! Layout:
//! - [`Tensor`] (`tensor.rs`): an owned handle, freed on drop, with every
//!   op of the ABI as a method;
//! - [`Call`] (here): the invocation's named inputs and outputs and its raw
//!   request and response bodies;
//! - [`Error`] (`error.rs`): the ABI's code with the host's `last_error`
//!   message, or a failure the function reports;
//! - `sys.rs`: the `tensor` imports, the one module with `unsafe`.
//!
//! State: a function's instance is kept warm between invocations, and its
//! linear memory, globals and tensor handles persist, also across a
//! migration to another executor. A `static` (for example a
//! `Mutex<Option<Tensor>>`) is the way to keep state; `init` runs once per
//! new instance, never for a restored one.

#![deny(unsafe_code)]

mod error;
mod sys;
mod tensor;

use std::marker::PhantomData;
use std::ops::Deref;

pub use error::{Error, ErrorKind, Result};
pub use tensor::{BinaryOp, DType, Element, ReduceOp, Tensor, UnaryOp};

/// The invocation being served: its inputs, outputs and raw bodies.
///
/// The handler gets one from [`handler!`]; input tensors borrow it, so they
/// cannot outlive the invocation (the executor frees them when `handle`
/// returns). Keep an input beyond that with [`Tensor::try_clone`].
#[derive(Debug)]
pub struct Call {
    // Not constructible outside the SDK, and neither Send nor Sync.
    _private: PhantomData<*const ()>,
}

/// A named input of the invocation: a [`Tensor`] that lives no longer than
/// its [`Call`]. Use it wherever a `&Tensor` is expected.
#[derive(Debug)]
pub struct Input<'call> {
    tensor: Tensor,
    _call: PhantomData<&'call Call>,
}

impl Deref for Input<'_> {
    type Target = Tensor;

    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}

impl AsRef<Tensor> for Input<'_> {
    fn as_ref(&self) -> &Tensor {
        &self.tensor
    }
}

/// How much of the raw body [`Call::input_bytes`] reads per import call.
const READ_CHUNK: usize = 64 << 10;

impl Call {
    /// The named input tensor (error [`ErrorKind::NameNotFound`] if the
    /// request has none of that name).
    pub fn input(&self, name: &str) -> Result<Input<'_>> {
        let handle = error::check(sys::input(name))?;
        Ok(Input {
            tensor: Tensor::from_raw(handle),
            _call: PhantomData,
        })
    }

    /// Sets the named output to `tensor` (replacing an earlier one of that
    /// name). The output keeps the data alive; `tensor` may be dropped.
    pub fn output(&self, name: &str, tensor: &Tensor) -> Result<()> {
        error::check(sys::output(name, tensor.handle()))?;
        Ok(())
    }

    /// The raw request body's length in bytes (0 for tensor requests).
    pub fn input_len(&self) -> Result<usize> {
        Ok(error::check(sys::input_len())? as usize)
    }

    /// Copies raw body bytes from `offset` into `buf`; returns how many
    /// (fewer than `buf.len()` at the end of the body).
    pub fn read_input(&self, offset: usize, buf: &mut [u8]) -> Result<usize> {
        let offset = i32::try_from(offset)
            .map_err(|_| Error::with_code(-7, format!("offset {offset} does not fit an i32")))?;
        Ok(error::check(sys::input_read(offset, buf))? as usize)
    }

    /// The whole raw request body.
    pub fn input_bytes(&self) -> Result<Vec<u8>> {
        let len = self.input_len()?;
        let mut body = vec![0u8; len];
        let mut at = 0;
        while at < len {
            let end = (at + READ_CHUNK).min(len);
            let n = self.read_input(at, &mut body[at..end])?;
            if n == 0 {
                break;
            }
            at += n;
        }
        body.truncate(at);
        Ok(body)
    }

    /// Appends `bytes` to the raw response body (sent as
    /// `application/octet-stream` when no named output is set, else as
    /// `raw_b64`).
    pub fn write_output(&self, bytes: &[u8]) -> Result<()> {
        error::check(sys::output_write(bytes))?;
        Ok(())
    }

    /// Whether the client that asked for this invocation is gone (guest
    /// ABI v2). A function that calls it takes cancellation: once the
    /// client is gone, every op fails with [`ErrorKind::Cancelled`], so it
    /// can stop and return, keeping its warm state, rather than work to
    /// its deadline. It needs an executor that runs guest ABI v2.
    pub fn cancelled(&self) -> bool {
        sys::cancelled() == 1
    }

    /// The invocation's answer as a stream (guest ABI v2): each chunk
    /// goes to the client as soon as it is sent, when the client asked
    /// for a stream; otherwise chunks join the one answer.
    pub fn stream(&self) -> Stream<'_> {
        Stream { _call: self }
    }
}

/// Sends an invocation's answer in chunks (`docs/GUEST-ABI.md`,
/// "Streaming"). A chunk is at most 1 MiB unless the operator says
/// otherwise. Sending waits while the client is behind; once the client is
/// gone it fails with [`ErrorKind::Cancelled`], and the function should
/// stop and return. As [`std::io::Write`], each `write` is one chunk.
#[derive(Debug)]
pub struct Stream<'c> {
    _call: &'c Call,
}

impl Stream<'_> {
    /// Sends `bytes` as one chunk. In a stream of events, UTF-8 text
    /// arrives as a `text` event, anything else as `bytes` (base64).
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        error::check(sys::stream_write(bytes))?;
        Ok(())
    }

    /// Sends `tensor` named `name` as one chunk: a `tensors` event, or a
    /// safetensors document in a raw stream. Without a stream it sets the
    /// named output, as [`Call::output`] does.
    pub fn send_tensor(&mut self, name: &str, tensor: &Tensor) -> Result<()> {
        error::check(sys::stream_tensor(name, tensor.handle()))?;
        Ok(())
    }
}

impl std::io::Write for Stream<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.send(buf).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Support for [`handler!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    /// Runs the handler for one invocation and turns its result into
    /// `handle`'s return value.
    pub fn run_handle(f: fn(&Call) -> Result<()>) -> i32 {
        let call = Call {
            _private: PhantomData,
        };
        finish(f(&call))
    }

    /// Runs `init` and turns its result into the export's return value.
    pub fn run_init(f: fn() -> Result<()>) -> i32 {
        finish(f())
    }

    fn finish(result: Result<()>) -> i32 {
        match result {
            Ok(()) => 0,
            Err(e) => {
                let _ = sys::set_error(e.to_string().as_bytes());
                e.code()
            }
        }
    }
}

/// Declares the function's exports: `handle` (called once per invocation)
/// from a `fn(&Call) -> Result<()>`, and optionally `init` (called once when
/// an instance is created, never when one is restored from a snapshot) from
/// a `fn() -> Result<()>`.
///
/// An `Err` becomes the invocation's `function_error`: its text is set with
/// `set_error` and `handle` returns its (non-zero) code. A panic aborts,
/// which the executor reports as `guest_trap` and answers by starting a
/// fresh instance.
///
/// ```no_run
/// fn setup() -> tensor_wasm_guest::Result<()> { Ok(()) }
/// fn serve(_: &tensor_wasm_guest::Call) -> tensor_wasm_guest::Result<()> { Ok(()) }
/// tensor_wasm_guest::handler!(serve, init = setup);
/// ```
#[macro_export]
macro_rules! handler {
    ($handle:path) => {
        const _: () = {
            // SAFETY: an export name is a global symbol; `handle` is the
            // name the executor calls, and this macro, used once per
            // crate, is its only definition.
            #[allow(unsafe_code)]
            #[unsafe(export_name = "handle")]
            extern "C" fn __tensor_wasm_handle() -> i32 {
                $crate::__private::run_handle($handle)
            }
        };
    };
    ($handle:path, init = $init:path) => {
        $crate::handler!($handle);
        const _: () = {
            // SAFETY: as for `handle`; `init` is defined only here.
            #[allow(unsafe_code)]
            #[unsafe(export_name = "init")]
            extern "C" fn __tensor_wasm_init() -> i32 {
                $crate::__private::run_init($init)
            }
        };
    };
}
