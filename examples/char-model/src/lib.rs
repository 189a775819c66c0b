//! Text, a character at a time, from a small character-level model whose
//! weights are the function's safetensors asset, streamed as it is made.
//!
//! The body is `<count>\n<prompt>`: how many characters to generate (at
//! most 4096), a newline, then the prompt, whose characters must be in the
//! model's vocabulary. Each step looks up the last [`CONTEXT`] characters
//! in the embedding table, joins them, passes them through a dense layer
//! with tanh and scores every character with a second dense layer; the
//! best one is sent at once as a chunk (`Call::stream`) and the window
//! moves on. A client that did not ask for a stream gets the whole text as
//! the raw answer. A client that leaves ends the loop at the next step.
//!
//! Assets (`weights.safetensors`, written by `train.py`): `embed [V, 16]`,
//! `w1 [256, 128]`, `b1 [128]`, `w2 [128, V]`, `b2 [V]` (f32) and `vocab
//! [V]` (u8, the characters in id order).

use tensor_wasm_guest::{Call, Error, ErrorKind, Result, Tensor};

/// Characters the model reads at each step.
const CONTEXT: usize = 16;
/// Most characters one call may ask for.
const MAX_STEPS: usize = 4096;

fn generate(call: &Call) -> Result<()> {
    let usage = "the body is <count>\\n<prompt>";
    let body = call.input_bytes()?;
    let text = std::str::from_utf8(&body).map_err(|_| Error::msg(format!("{usage}, in UTF-8")))?;
    let (count, prompt) = text.split_once('\n').ok_or_else(|| Error::msg(usage))?;
    let steps: usize = count
        .trim()
        .parse()
        .map_err(|_| Error::msg(format!("{usage}: {count:?} is not a count")))?;
    if steps > MAX_STEPS {
        return Err(Error::msg(format!(
            "at most {MAX_STEPS} characters per call"
        )));
    }
    let vocab = Tensor::asset("vocab")?.to_vec::<u8>()?;
    let id_of = |c: char| {
        u8::try_from(c)
            .ok()
            .and_then(|b| vocab.iter().position(|&v| v == b))
            .map(|i| i as i32)
            .ok_or_else(|| Error::msg(format!("{c:?} is not in the model's vocabulary")))
    };
    let mut ids = vec![id_of(' ')?; CONTEXT];
    for c in prompt.chars() {
        ids.push(id_of(c)?);
    }
    let (embed, w1, b1) = (
        Tensor::asset("embed")?,
        Tensor::asset("w1")?,
        Tensor::asset("b1")?,
    );
    let (w2, b2) = (Tensor::asset("w2")?, Tensor::asset("b2")?);
    let mut stream = call.stream();
    for _ in 0..steps {
        let window = Tensor::new(&[CONTEXT], &ids[ids.len() - CONTEXT..])?;
        let x = embed.gather(&window)?.reshape(&[1, -1])?;
        let h = x.matmul(&w1)?.add(&b1)?.tanh()?;
        let scores = h.matmul(&w2)?.add(&b2)?;
        let best = scores.argmax(-1, false)?.to_vec::<i64>()?[0] as usize;
        ids.push(best as i32);
        match stream.send(&vocab[best..=best]) {
            Ok(()) => {}
            // The client left: stop here, the instance stays warm.
            Err(e) if e.kind() == ErrorKind::Cancelled => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

tensor_wasm_guest::handler!(generate);
