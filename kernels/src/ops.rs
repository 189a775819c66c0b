//! The op codes of guest ABI v1 (`docs/GUEST-ABI.md`).
//!
//! Discriminants are the codes guests pass; they must never change.

use crate::error::{KernelError, Result};

/// Elementwise binary ops (`binary`, `scalar`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BinaryOp {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
    Max = 4,
    Min = 5,
    Pow = 6,
}

/// Elementwise unary ops (`unary`); float dtypes only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum UnaryOp {
    Neg = 0,
    Exp = 1,
    Log = 2,
    Sqrt = 3,
    Tanh = 4,
    Sigmoid = 5,
    Relu = 6,
    /// The erf form, PyTorch's default: `0.5·x·(1 + erf(x/√2))`.
    Gelu = 7,
    Silu = 8,
    Abs = 9,
}

/// Reductions over one axis (`reduce`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReduceOp {
    Sum = 0,
    Mean = 1,
    Max = 2,
    Min = 3,
    /// First index of the maximum, as i64. NaN counts as the maximum.
    ArgMax = 4,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 7] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Pow,
    ];

    pub fn from_code(code: i32) -> Result<Self> {
        usize::try_from(code)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
            .ok_or_else(|| KernelError::invalid("binary", format!("unknown binary op {code}")))
    }

    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Pow => "pow",
        }
    }
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 10] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Gelu,
        UnaryOp::Silu,
        UnaryOp::Abs,
    ];

    pub fn from_code(code: i32) -> Result<Self> {
        usize::try_from(code)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
            .ok_or_else(|| KernelError::invalid("unary", format!("unknown unary op {code}")))
    }

    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::Silu => "silu",
            UnaryOp::Abs => "abs",
        }
    }

    /// The op on one f32 value: the definition both backends follow.
    pub fn apply_f32(self, x: f32) -> f32 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Relu => {
                // NaN stays NaN, as in PyTorch.
                if x > 0.0 || x.is_nan() { x } else { 0.0 }
            }
            UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
            UnaryOp::Silu => x / (1.0 + (-x).exp()),
            UnaryOp::Abs => x.abs(),
        }
    }
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Mean,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::ArgMax,
    ];

    pub fn from_code(code: i32) -> Result<Self> {
        usize::try_from(code)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
            .ok_or_else(|| KernelError::invalid("reduce", format!("unknown reduce op {code}")))
    }

    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::ArgMax => "argmax",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_abi() {
        for (i, op) in BinaryOp::ALL.into_iter().enumerate() {
            assert_eq!(op as usize, i);
            assert_eq!(BinaryOp::from_code(i as i32).unwrap(), op);
        }
        for (i, op) in UnaryOp::ALL.into_iter().enumerate() {
            assert_eq!(op as usize, i);
            assert_eq!(UnaryOp::from_code(i as i32).unwrap(), op);
        }
        for (i, op) in ReduceOp::ALL.into_iter().enumerate() {
            assert_eq!(op as usize, i);
            assert_eq!(ReduceOp::from_code(i as i32).unwrap(), op);
        }
        assert!(BinaryOp::from_code(7).is_err());
        assert!(UnaryOp::from_code(-1).is_err());
        assert!(ReduceOp::from_code(5).is_err());
    }

    #[test]
    fn gelu_is_the_erf_form() {
        // torch.nn.functional.gelu(torch.tensor(1.0)) == 0.8413447
        assert!((UnaryOp::Gelu.apply_f32(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((UnaryOp::Gelu.apply_f32(-2.0) - -0.045_500_26).abs() < 1e-6);
    }
}
