//! Tensor element types and their codes on the guest ABI and in JSON bodies.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An element type. The discriminants are the guest ABI's dtype codes
/// (`docs/GUEST-ABI.md`) and must never change: guests compile them in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 0,
    /// IEEE 754 binary16.
    F16 = 1,
    /// bfloat16: the top half of a binary32.
    BF16 = 2,
    /// Two's-complement 32-bit integer.
    I32 = 3,
    /// Two's-complement 64-bit integer.
    I64 = 4,
    /// Unsigned byte.
    U8 = 5,
}

/// A dtype code or name that names no dtype.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype {0:?}; expected one of f32, f16, bf16, i32, i64, u8")]
pub struct UnknownDType(pub String);

impl DType {
    /// Every dtype, in code order.
    pub const ALL: [DType; 6] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I64,
        DType::U8,
    ];

    /// The dtype with guest ABI code `code`, if any.
    pub fn from_code(code: i32) -> Result<DType, UnknownDType> {
        match code {
            0 => Ok(DType::F32),
            1 => Ok(DType::F16),
            2 => Ok(DType::BF16),
            3 => Ok(DType::I32),
            4 => Ok(DType::I64),
            5 => Ok(DType::U8),
            other => Err(UnknownDType(other.to_string())),
        }
    }

    /// The guest ABI code of this dtype.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
        }
    }

    /// True for f32, f16 and bf16: the dtypes that float-only ops accept.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The name used in JSON bodies (`"f32"`) and in safetensors files differ;
    /// this is the JSON name.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = UnknownDType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| UnknownDType(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_match_the_abi() {
        for (code, dtype) in DType::ALL.into_iter().enumerate() {
            assert_eq!(dtype.code(), code as i32);
            assert_eq!(DType::from_code(code as i32), Ok(dtype));
            assert_eq!(dtype.name().parse::<DType>(), Ok(dtype));
        }
        assert!(DType::from_code(6).is_err());
        assert!(DType::from_code(-1).is_err());
        assert!("float32".parse::<DType>().is_err());
    }

    #[test]
    fn serde_uses_the_json_names() {
        assert_eq!(serde_json::to_string(&DType::BF16).unwrap(), "\"bf16\"");
        let d: DType = serde_json::from_str("\"i64\"").unwrap();
        assert_eq!(d, DType::I64);
    }

    #[test]
    fn sizes() {
        assert_eq!(DType::F32.size(), 4);
        assert_eq!(DType::BF16.size(), 2);
        assert_eq!(DType::I64.size(), 8);
        assert_eq!(DType::U8.size(), 1);
        assert!(DType::F16.is_float());
        assert!(!DType::I32.is_float());
    }
}
