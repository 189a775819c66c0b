//! A digits classifier as a TensorWasm function: an MLP (64 → hidden → 10)
//! whose weights are the function's safetensors asset.
//!
//! Input `x`: f32 `[n, 64]` (or one sample `[64]`), the 8×8 images of
//! scikit-learn's `load_digits` with intensities 0..16. Outputs `probs`
//! (f32 `[n, 10]`) and `labels` (i64 `[n]`, the most likely digit).
//! Assets (`weights.safetensors`, written by `train.py`): `w1 [64, hidden]`,
//! `b1 [hidden]`, `w2 [hidden, 10]`, `b2 [10]`.
//!
//! Every step is an ABI op on the executor's device; only the input's
//! shape and dtype are read back, to refuse a bad request with a clear
//! message.

use tensor_wasm_guest::{Call, DType, Error, Result, Tensor};

/// Pixels per image (8×8).
const FEATURES: usize = 64;
/// The largest intensity in `load_digits`; inputs are scaled to 0..1.
const MAX_INTENSITY: f32 = 16.0;

fn classify(call: &Call) -> Result<()> {
    let x = call.input("x")?;
    if x.dtype()? != DType::F32 {
        return Err(Error::msg(format!("x must be f32, not {:?}", x.dtype()?)));
    }
    let one_row;
    let x: &Tensor = match x.shape()?.as_slice() {
        [FEATURES] => {
            one_row = x.reshape(&[1, FEATURES as i64])?;
            &one_row
        }
        [_, FEATURES] => &x,
        other => {
            return Err(Error::msg(format!(
                "x must be [n, {FEATURES}] (or [{FEATURES}]); it is {other:?}"
            )));
        }
    };

    let hidden = x
        .div_scalar(MAX_INTENSITY)?
        .matmul(&Tensor::asset("w1")?)?
        .add(&Tensor::asset("b1")?)?
        .relu()?;
    let logits = hidden
        .matmul(&Tensor::asset("w2")?)?
        .add(&Tensor::asset("b2")?)?;
    let probs = logits.softmax(-1)?;
    call.output("labels", &probs.argmax(-1, false)?)?;
    call.output("probs", &probs)
}

tensor_wasm_guest::handler!(classify);
