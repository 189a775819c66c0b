//! A stateful TensorWasm function: the running mean of every sample it has
//! been sent, kept across invocations.
//!
//! Input `x`: f32 `[d]` (one sample) or `[n, d]` (n samples). Outputs
//! `mean` (f32 `[d]`, the mean of all samples so far) and `count` (i64
//! `[1]`). The first call fixes `d`; a sample of another width is refused.
//!
//! State lives in two places, both carried by a snapshot when the tenant
//! migrates: the count in linear memory (a `static`), the mean in a device
//! tensor whose handle that `static` holds. The update
//! `mean += (Σx − n·mean) / (count + n)` runs as ABI ops, so the samples
//! never come back into the guest.

use std::sync::Mutex;

use tensor_wasm_guest::{Call, DType, Error, Result, Tensor};

/// What the function remembers between invocations.
struct State {
    /// Samples seen so far.
    count: u64,
    /// Their mean, f32 `[d]`, on the device.
    mean: Tensor,
}

/// `None` until the first sample arrives.
static STATE: Mutex<Option<State>> = Mutex::new(None);

fn update(call: &Call) -> Result<()> {
    let x = call.input("x")?;
    if x.dtype()? != DType::F32 {
        return Err(Error::msg("x must be f32"));
    }
    let one_row;
    let (n, batch): (usize, &Tensor) = match x.shape()?.as_slice() {
        &[d] => {
            one_row = x.reshape(&[1, d as i64])?;
            (1, &one_row)
        }
        &[n, _] => (n, &x),
        other => {
            return Err(Error::msg(format!(
                "x must be [d] or [n, d]; it is {other:?}"
            )));
        }
    };
    let d = batch.shape()?[1];

    let mut state = STATE
        .lock()
        .map_err(|_| Error::msg("state lock poisoned"))?;
    let state = match &mut *state {
        Some(s) => {
            let width = s.mean.shape()?[0];
            if width != d {
                return Err(Error::msg(format!(
                    "samples have {width} values; this one has {d}"
                )));
            }
            s
        }
        slot @ None => slot.insert(State {
            count: 0,
            mean: Tensor::zeros(DType::F32, &[d])?,
        }),
    };
    if n > 0 {
        let total = state.count + n as u64;
        let delta = batch
            .sum(0, false)?
            .sub(&state.mean.mul_scalar(n as f32)?)?
            .div_scalar(total as f32)?;
        // The old mean's handle is freed when it is replaced.
        state.mean = state.mean.add(&delta)?;
        state.count = total;
    }

    call.output("mean", &state.mean)?;
    call.output("count", &Tensor::new(&[1], &[state.count as i64])?)
}

tensor_wasm_guest::handler!(update);
