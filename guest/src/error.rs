//! Errors: the ABI's negative codes with the host's `last_error` message,
//! and failures the function reports itself.

use std::fmt;

use crate::sys;

/// Longest message read back from `last_error`, in bytes; the executor
/// truncates its messages well below this.
const MAX_MESSAGE: usize = 4096;

/// What kind of failure an [`Error`] is, from its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// -1: a handle that names no live tensor.
    BadHandle,
    /// -2: operand shapes that do not fit the op.
    ShapeMismatch,
    /// -3: a dtype the op does not take, or operands of different dtypes.
    DTypeUnsupported,
    /// -4: a pointer/length outside guest memory.
    OutOfBounds,
    /// -5: device memory, tensor count, raw output size or per-op work cap.
    QuotaExceeded,
    /// -6: no input or asset of that name.
    NameNotFound,
    /// -7: an invalid axis, permutation, index, buffer size or rank.
    InvalidArgument,
    /// -8: the device failed.
    Device,
    /// -9: the invocation's client is gone (only for a function that
    /// calls [`crate::Call::cancelled`]).
    Cancelled,
    /// A positive code: a failure the function reported itself
    /// ([`Error::msg`], [`Error::with_code`]).
    Function,
    /// A negative code this version of the SDK does not know.
    Unknown,
}

impl ErrorKind {
    /// The kind of `code`.
    pub fn from_code(code: i32) -> ErrorKind {
        match code {
            -1 => ErrorKind::BadHandle,
            -2 => ErrorKind::ShapeMismatch,
            -3 => ErrorKind::DTypeUnsupported,
            -4 => ErrorKind::OutOfBounds,
            -5 => ErrorKind::QuotaExceeded,
            -6 => ErrorKind::NameNotFound,
            -7 => ErrorKind::InvalidArgument,
            -8 => ErrorKind::Device,
            -9 => ErrorKind::Cancelled,
            c if c > 0 => ErrorKind::Function,
            _ => ErrorKind::Unknown,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ErrorKind::BadHandle => "bad handle",
            ErrorKind::ShapeMismatch => "shape mismatch",
            ErrorKind::DTypeUnsupported => "dtype unsupported",
            ErrorKind::OutOfBounds => "pointer out of bounds",
            ErrorKind::QuotaExceeded => "quota exceeded",
            ErrorKind::NameNotFound => "name not found",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Device => "device error",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Function => "function error",
            ErrorKind::Unknown => "unknown error",
        }
    }
}

/// A failed ABI call (its negative code and the host's message) or a
/// failure the function reports (a positive code and its own message).
///
/// Returned from the function's handler, it becomes the invocation's
/// `function_error`: the message is passed to `set_error` and `handle`
/// returns the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    code: i32,
    message: String,
}

/// `Result<T, Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The code [`Error::msg`] uses: 1, the plainest non-zero exit.
    pub const FUNCTION: i32 = 1;

    /// A failure of the function itself, with code [`Error::FUNCTION`].
    pub fn msg(message: impl Into<String>) -> Error {
        Error {
            code: Error::FUNCTION,
            message: message.into(),
        }
    }

    /// A failure with an explicit code; 0 (which would mean success) is
    /// replaced by [`Error::FUNCTION`].
    pub fn with_code(code: i32, message: impl Into<String>) -> Error {
        Error {
            code: if code == 0 { Error::FUNCTION } else { code },
            message: message.into(),
        }
    }

    /// The error of an ABI call that returned the negative `code`, with the
    /// message the host kept for `last_error`. Call it right after the
    /// failing import, before any other import can fail.
    pub(crate) fn from_abi(code: i32) -> Error {
        Error {
            code,
            message: last_error(),
        }
    }

    /// The code: negative for the ABI's errors, positive for the function's.
    pub fn code(&self) -> i32 {
        self.code
    }

    /// The kind of failure the code stands for.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::from_code(self.code)
    }

    /// The message: the host's `last_error` for ABI errors.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind().describe(), self.code)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// Turns a raw ABI return into `Ok(value)` or the call's [`Error`].
pub(crate) fn check(ret: i32) -> Result<i32> {
    if ret >= 0 {
        Ok(ret)
    } else {
        Err(Error::from_abi(ret))
    }
}

/// The message of the last failed ABI call, as far as it is UTF-8.
fn last_error() -> String {
    if cfg!(not(target_arch = "wasm32")) {
        return "the tensor imports exist only inside a TensorWasm executor (wasm32)".into();
    }
    let mut buf = vec![0u8; 256];
    let mut n = sys::last_error(&mut buf);
    if n as usize > buf.len() {
        buf.resize((n as usize).min(MAX_MESSAGE), 0);
        n = sys::last_error(&mut buf);
    }
    if n < 0 {
        return String::new();
    }
    buf.truncate((n as usize).min(buf.len()));
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        assert_eq!(ErrorKind::from_code(-2), ErrorKind::ShapeMismatch);
        assert_eq!(ErrorKind::from_code(-8), ErrorKind::Device);
        assert_eq!(ErrorKind::from_code(-9), ErrorKind::Cancelled);
        assert_eq!(ErrorKind::from_code(-99), ErrorKind::Unknown);
        assert_eq!(ErrorKind::from_code(3), ErrorKind::Function);
    }

    #[test]
    fn function_errors_are_never_success() {
        assert_eq!(Error::with_code(0, "x").code(), Error::FUNCTION);
        assert_eq!(Error::msg("bad x").to_string(), "function error (1): bad x");
    }

    #[test]
    fn abi_errors_keep_their_code() {
        let e = check(-6).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NameNotFound);
        assert!(!e.message().is_empty());
        assert_eq!(check(5), Ok(5));
    }
}
