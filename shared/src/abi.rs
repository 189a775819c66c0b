//! The guest ABI's error codes (`docs/GUEST-ABI.md`).
//!
//! Every `tensor` import returns a value ≥ 0 on success and one of these
//! negative codes on failure; `last_error` gives the message.

use std::fmt;

/// Why a guest ABI call failed. The discriminants are the negative return
/// values guests see and must never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum AbiError {
    /// The handle names no live tensor of this instance.
    BadHandle = -1,
    /// Operand shapes do not fit the op (broadcasting, contraction, concat).
    ShapeMismatch = -2,
    /// The op does not take this dtype, or its operands' dtypes differ.
    DTypeUnsupported = -3,
    /// A pointer/length pair reaches outside guest memory.
    OutOfBounds = -4,
    /// Device memory, tensor count, or the per-op work cap is exceeded.
    QuotaExceeded = -5,
    /// No input, asset or output of that name.
    NameNotFound = -6,
    /// An argument is out of its domain (axis, permutation, index, size).
    InvalidArgument = -7,
    /// The device failed; reported at the next call that waits for it.
    DeviceError = -8,
    /// The client that asked for this invocation is gone (guest ABI v2,
    /// only to guests that import `cancelled`).
    Cancelled = -9,
}

impl AbiError {
    /// The value returned to the guest.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The error for a returned value, if it is one.
    pub fn from_code(code: i32) -> Option<AbiError> {
        Some(match code {
            -1 => AbiError::BadHandle,
            -2 => AbiError::ShapeMismatch,
            -3 => AbiError::DTypeUnsupported,
            -4 => AbiError::OutOfBounds,
            -5 => AbiError::QuotaExceeded,
            -6 => AbiError::NameNotFound,
            -7 => AbiError::InvalidArgument,
            -8 => AbiError::DeviceError,
            -9 => AbiError::Cancelled,
            _ => return None,
        })
    }
}

impl fmt::Display for AbiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            AbiError::BadHandle => "bad handle",
            AbiError::ShapeMismatch => "shape mismatch",
            AbiError::DTypeUnsupported => "dtype unsupported or mismatched",
            AbiError::OutOfBounds => "guest pointer out of bounds",
            AbiError::QuotaExceeded => "quota exceeded",
            AbiError::NameNotFound => "name not found",
            AbiError::InvalidArgument => "invalid argument",
            AbiError::DeviceError => "device error",
            AbiError::Cancelled => "cancelled: the client is gone",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in -9..=-1 {
            assert_eq!(AbiError::from_code(code).unwrap().code(), code);
        }
        assert_eq!(AbiError::from_code(0), None);
        assert_eq!(AbiError::from_code(-10), None);
    }
}
