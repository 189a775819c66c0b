//! NumPy `.npy` files: a strict reader for invoke inputs and a writer for
//! outputs.
//!
//! The reader accepts what `numpy.save` writes for the dtypes the API
//! carries, and nothing else: format versions 1.0, 2.0 and 3.0, a header
//! that is a Python dict literal with exactly the keys `descr`,
//! `fortran_order` and `shape`, `descr` one of `<f4 <f2 <i4 <i8 |u1`
//! (little-endian f32, f16, i32, i64, u8), C order, and data of exactly the
//! size the shape says. Everything else is refused with a message that
//! says how to convert the array (`a.astype('<f4')`,
//! `np.ascontiguousarray(a)`); bf16 has no NumPy dtype and travels in
//! safetensors files instead. The reader never panics and never allocates
//! more than the file it was given.
//!
//! The writer emits version 1.0 with the header padded to 64 bytes, as
//! NumPy does; it writes bf16 (which `.npy` cannot hold) widened to f32,
//! which is exact.

use half::bf16;
use tensor_wasm_shared::DType;

/// First bytes of every `.npy` file.
const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Longest header accepted: 64 KiB. NumPy's own reader stops at 10 000
/// bytes by default; a header for 8 dims takes under 200.
const MAX_HEADER_LEN: usize = 64 << 10;
/// Headers are padded so that the data starts on this boundary, in bytes.
const ALIGN: usize = 64;

/// An array read from or written to a `.npy` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Array {
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Little-endian elements in C (row-major) order.
    pub data: Vec<u8>,
}

/// Why bytes are not a `.npy` file this reader accepts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NpyError {
    #[error("not a .npy file (it does not start with \\x93NUMPY)")]
    BadMagic,
    #[error("the file ends inside its {0}")]
    Truncated(&'static str),
    #[error(".npy format version {0}.{1} is not supported (1.0, 2.0 and 3.0 are)")]
    Version(u8, u8),
    #[error("the header is {0} bytes, over the limit of {MAX_HEADER_LEN}")]
    HeaderTooLong(usize),
    #[error("malformed header: {0}")]
    Header(String),
    #[error("dtype {descr:?} is not supported: {advice}")]
    DType { descr: String, advice: String },
    #[error("Fortran-order arrays are not supported: save np.ascontiguousarray(a) instead")]
    FortranOrder,
    #[error("shape {0:?} holds more elements than a file can")]
    TooLarge(Vec<u64>),
    #[error("the data is {actual} bytes, but shape {shape:?} of {dtype} needs {expected}")]
    DataLength {
        shape: Vec<u64>,
        dtype: DType,
        expected: u64,
        actual: u64,
    },
}

/// The dtype of a `descr`, or advice on converting the array.
fn dtype_of(descr: &str) -> Result<DType, NpyError> {
    let refuse = |advice: String| NpyError::DType {
        descr: descr.to_string(),
        advice,
    };
    match descr {
        "<f4" => return Ok(DType::F32),
        "<f2" => return Ok(DType::F16),
        "<i4" => return Ok(DType::I32),
        "<i8" => return Ok(DType::I64),
        "|u1" => return Ok(DType::U8),
        _ => {}
    }
    let supported = "the API takes <f4, <f2, <i4, <i8 and |u1 (and bf16 in safetensors files)";
    Err(refuse(match descr.as_bytes() {
        [b'>', rest @ ..] if matches!(rest, b"f4" | b"f2" | b"i4" | b"i8") => format!(
            "big-endian; save a.astype('<{}')",
            String::from_utf8_lossy(rest)
        ),
        _ if descr.ends_with("f8") => "save a.astype(np.float32)".into(),
        _ if descr.ends_with("b1") => "save a.astype(np.uint8)".into(),
        _ => supported.into(),
    }))
}

/// The `descr` written for `dtype` (bf16 is written as f32).
fn descr_of(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 | DType::BF16 => "<f4",
        DType::F16 => "<f2",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
        DType::U8 => "|u1",
    }
}

/// A token of the header's dict literal.
#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Open(char),
    Close(char),
    Comma,
    Colon,
    Str(String),
    Int(u64),
    Bool(bool),
}

fn tokens(header: &str) -> Result<Vec<Tok>, NpyError> {
    let bad = |m: String| NpyError::Header(m);
    let mut out = Vec::new();
    let mut chars = header.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            ' ' | '\t' | '\n' | '\r' => {}
            '{' | '(' => out.push(Tok::Open(c)),
            '}' | ')' => out.push(Tok::Close(c)),
            ',' => out.push(Tok::Comma),
            ':' => out.push(Tok::Colon),
            '\'' | '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some((_, q)) if q == c => break,
                        Some((_, '\\')) => {
                            return Err(bad(format!("escape sequence in a string at byte {at}")));
                        }
                        Some((_, ch)) => s.push(ch),
                        None => return Err(bad(format!("unterminated string at byte {at}"))),
                    }
                }
                out.push(Tok::Str(s));
            }
            '0'..='9' => {
                let mut n = u64::from(c as u8 - b'0');
                while let Some(&(_, d @ '0'..='9')) = chars.peek() {
                    n = n
                        .checked_mul(10)
                        .and_then(|n| n.checked_add(u64::from(d as u8 - b'0')))
                        .ok_or_else(|| bad(format!("number too large at byte {at}")))?;
                    chars.next();
                }
                out.push(Tok::Int(n));
            }
            'A'..='Z' | 'a'..='z' => {
                let mut word = String::from(c);
                while let Some(&(_, w)) = chars.peek() {
                    if !w.is_ascii_alphanumeric() {
                        break;
                    }
                    word.push(w);
                    chars.next();
                }
                match word.as_str() {
                    "True" => out.push(Tok::Bool(true)),
                    "False" => out.push(Tok::Bool(false)),
                    _ => return Err(bad(format!("unexpected {word:?} at byte {at}"))),
                }
            }
            _ => return Err(bad(format!("unexpected {c:?} at byte {at}"))),
        }
    }
    Ok(out)
}

/// A header value.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
}

/// Parses `{'key': value, ...}` with an optional trailing comma.
fn dict(toks: &[Tok]) -> Result<Vec<(String, Value)>, NpyError> {
    let bad = |m: &str| NpyError::Header(m.to_string());
    let mut it = toks.iter().peekable();
    if it.next() != Some(&Tok::Open('{')) {
        return Err(bad("expected a dict literal starting with '{'"));
    }
    let mut entries = Vec::new();
    loop {
        let key = match it.next() {
            Some(Tok::Close('}')) => break,
            Some(Tok::Str(k)) => k.clone(),
            _ => return Err(bad("expected a quoted key or '}'")),
        };
        if it.next() != Some(&Tok::Colon) {
            return Err(bad("expected ':' after a key"));
        }
        let value = match it.next() {
            Some(Tok::Str(s)) => Value::Str(s.clone()),
            Some(Tok::Bool(b)) => Value::Bool(*b),
            Some(Tok::Open('(')) => {
                let mut dims = Vec::new();
                loop {
                    match it.next() {
                        Some(Tok::Close(')')) => break,
                        Some(Tok::Int(n)) => dims.push(*n),
                        _ => return Err(bad("shape must be a tuple of non-negative integers")),
                    }
                    match it.next() {
                        Some(Tok::Comma) => {}
                        Some(Tok::Close(')')) => break,
                        _ => return Err(bad("expected ',' or ')' in the shape")),
                    }
                }
                Value::Tuple(dims)
            }
            _ => return Err(bad("values must be a string, True/False or a tuple")),
        };
        entries.push((key, value));
        match it.next() {
            Some(Tok::Comma) => {}
            Some(Tok::Close('}')) => break,
            _ => return Err(bad("expected ',' or '}' after a value")),
        }
    }
    if it.next().is_some() {
        return Err(bad("bytes after the dict"));
    }
    Ok(entries)
}

/// Reads a `.npy` file.
pub fn read(bytes: &[u8]) -> Result<Array, NpyError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(NpyError::BadMagic);
    }
    let (major, minor) = match bytes.get(6..8) {
        Some(&[major, minor]) => (major, minor),
        _ => return Err(NpyError::Truncated("version")),
    };
    let (len_bytes, start) = match (major, minor) {
        (1, 0) => (2, 10),
        (2, 0) | (3, 0) => (4, 12),
        _ => return Err(NpyError::Version(major, minor)),
    };
    let len_field = bytes
        .get(8..8 + len_bytes)
        .ok_or(NpyError::Truncated("header length"))?;
    let header_len = len_field
        .iter()
        .rev()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    if header_len > MAX_HEADER_LEN {
        return Err(NpyError::HeaderTooLong(header_len));
    }
    let header = bytes
        .get(start..start + header_len)
        .ok_or(NpyError::Truncated("header"))?;
    let header = std::str::from_utf8(header)
        .ok()
        .filter(|h| h.is_ascii())
        .ok_or_else(|| NpyError::Header("not ASCII text".into()))?;
    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    for (key, value) in dict(&tokens(header)?)? {
        let slot_taken = match (key.as_str(), value) {
            ("descr", Value::Str(s)) => descr.replace(s).is_some(),
            ("fortran_order", Value::Bool(b)) => fortran.replace(b).is_some(),
            ("shape", Value::Tuple(t)) => shape.replace(t).is_some(),
            ("descr" | "fortran_order" | "shape", v) => {
                return Err(NpyError::Header(format!(
                    "{key:?} has the wrong type: {v:?}"
                )));
            }
            _ => return Err(NpyError::Header(format!("unexpected key {key:?}"))),
        };
        if slot_taken {
            return Err(NpyError::Header(format!("key {key:?} appears twice")));
        }
    }
    let missing = |k: &str| NpyError::Header(format!("missing key {k:?}"));
    let descr = descr.ok_or_else(|| missing("descr"))?;
    let fortran = fortran.ok_or_else(|| missing("fortran_order"))?;
    let shape = shape.ok_or_else(|| missing("shape"))?;
    let dtype = dtype_of(&descr)?;
    // A 0-d or 1-d array reads the same in either order.
    if fortran && shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(NpyError::FortranOrder);
    }
    let expected = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size() as u64))
        .ok_or_else(|| NpyError::TooLarge(shape.clone()))?;
    let data = &bytes[start + header_len..];
    if data.len() as u64 != expected {
        return Err(NpyError::DataLength {
            shape,
            dtype,
            expected,
            actual: data.len() as u64,
        });
    }
    Ok(Array {
        dtype,
        shape,
        data: data.to_vec(),
    })
}

/// Writes `array` as a version 1.0 `.npy` file; bf16 is widened to f32.
pub fn write(array: &Array) -> Vec<u8> {
    let shape = match array.shape.as_slice() {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        descr_of(array.dtype)
    );
    // Pad with spaces and end with a newline so the data starts aligned.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((ALIGN - unpadded % ALIGN) % ALIGN));
    header.push('\n');
    let data: Vec<u8> = if array.dtype == DType::BF16 {
        array
            .data
            .chunks_exact(2)
            .flat_map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes())
            .collect()
    } else {
        array.data.clone()
    };
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    // Headers of at most 8 dims are far below 64 KiB.
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file as `numpy.save` lays it out, with `header` padded to 64.
    fn file(version: (u8, u8), header: &str, data: &[u8]) -> Vec<u8> {
        let long = version.0 >= 2;
        let prefix = if long { 12 } else { 10 };
        let mut h = header.to_string();
        let pad = (64 - (prefix + h.len() + 1) % 64) % 64;
        h.push_str(&" ".repeat(pad));
        h.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[version.0, version.1]);
        if long {
            out.extend_from_slice(&(h.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_what_numpy_writes() {
        // np.save(f, np.arange(6, dtype=np.float32).reshape(2, 3))
        let data = f32s(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let bytes = file(
            (1, 0),
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &data,
        );
        assert_eq!(bytes.len() % 64, data.len() % 64);
        let a = read(&bytes).unwrap();
        assert_eq!(
            (a.dtype, a.shape.clone(), a.data),
            (DType::F32, vec![2, 3], data)
        );
        // Version 2.0 and 3.0, double quotes, no trailing comma.
        let data = [7u8, 8, 9];
        for v in [(2, 0), (3, 0)] {
            let bytes = file(
                v,
                r#"{"descr": "|u1", "fortran_order": False, "shape": (3,)}"#,
                &data,
            );
            let a = read(&bytes).unwrap();
            assert_eq!((a.dtype, a.shape), (DType::U8, vec![3]));
        }
        // A scalar and an empty array.
        let a = read(&file(
            (1, 0),
            "{'descr': '<i8', 'fortran_order': False, 'shape': (), }",
            &(-5i64).to_le_bytes(),
        ))
        .unwrap();
        assert_eq!((a.dtype, a.shape.len()), (DType::I64, 0));
        let a = read(&file(
            (1, 0),
            "{'descr': '<f2', 'fortran_order': False, 'shape': (0, 4), }",
            &[],
        ))
        .unwrap();
        assert_eq!((a.dtype, a.shape), (DType::F16, vec![0, 4]));
        // Fortran order is harmless for 1-d arrays.
        let a = read(&file(
            (1, 0),
            "{'descr': '<i4', 'fortran_order': True, 'shape': (2,), }",
            &[1, 0, 0, 0, 2, 0, 0, 0],
        ))
        .unwrap();
        assert_eq!(a.dtype, DType::I32);
    }

    #[test]
    fn round_trips_every_dtype() {
        for dtype in [DType::F32, DType::F16, DType::I32, DType::I64, DType::U8] {
            let shape = vec![2, 1, 3];
            let data: Vec<u8> = (0..6 * dtype.size()).map(|i| i as u8).collect();
            let a = Array { dtype, shape, data };
            let bytes = write(&a);
            assert_eq!((bytes.len() - a.data.len()) % 64, 0, "{dtype:?} aligned");
            assert_eq!(read(&bytes).unwrap(), a);
        }
        for shape in [vec![], vec![4]] {
            let n: u64 = shape.iter().product();
            let a = Array {
                dtype: DType::U8,
                data: vec![1; n as usize],
                shape,
            };
            assert_eq!(read(&write(&a)).unwrap(), a);
        }
    }

    #[test]
    fn writes_bf16_as_f32() {
        let a = Array {
            dtype: DType::BF16,
            shape: vec![2],
            data: [bf16::from_f32(1.5), bf16::from_f32(-2.0)]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        };
        let back = read(&write(&a)).unwrap();
        assert_eq!(back.dtype, DType::F32);
        assert_eq!(back.data, f32s(&[1.5, -2.0]));
    }

    fn header_err(header: &str) -> NpyError {
        read(&file((1, 0), header, &[0; 8])).unwrap_err()
    }

    #[test]
    fn refuses_malformed_framing() {
        assert_eq!(read(b""), Err(NpyError::BadMagic));
        assert_eq!(read(b"PK\x03\x04 zip"), Err(NpyError::BadMagic));
        assert_eq!(read(b"\x93NUMPY\x01"), Err(NpyError::Truncated("version")));
        assert_eq!(
            read(b"\x93NUMPY\x01\x00\x10"),
            Err(NpyError::Truncated("header length"))
        );
        assert_eq!(
            read(b"\x93NUMPY\x04\x00\x10\x00"),
            Err(NpyError::Version(4, 0))
        );
        assert_eq!(
            read(b"\x93NUMPY\x01\x01\x10\x00"),
            Err(NpyError::Version(1, 1))
        );
        // The header length points past the end of the file.
        assert_eq!(
            read(b"\x93NUMPY\x01\x00\xff\x00{'descr'"),
            Err(NpyError::Truncated("header"))
        );
        let mut huge = b"\x93NUMPY\x02\x00".to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read(&huge), Err(NpyError::HeaderTooLong(_))));
        let mut latin = file(
            (1, 0),
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            &[0; 4],
        );
        latin[12] = 0xe9;
        assert!(matches!(read(&latin), Err(NpyError::Header(_))));
    }

    #[test]
    fn refuses_malformed_headers() {
        for header in [
            "",
            "[1, 2]",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)",
            "{'descr': '<f4' 'fortran_order': False, 'shape': (2,)}",
            "{'descr' '<f4', 'fortran_order': False, 'shape': (2,)}",
            "{'descr': '<f4, 'fortran_order': False, 'shape': (2,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2.0,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2 2)}",
            "{'descr': '<f4', 'fortran_order': None, 'shape': (2,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)}}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,)}",
            "{'descr': '<\\x66', 'fortran_order': False, 'shape': (2,)}",
        ] {
            assert!(
                matches!(header_err(header), NpyError::Header(_)),
                "{header:?}: {:?}",
                header_err(header)
            );
        }
        // Keys: missing, unexpected, repeated, of the wrong type.
        let e = header_err("{'descr': '<f4', 'shape': (2,)}");
        assert_eq!(e, NpyError::Header("missing key \"fortran_order\"".into()));
        let e = header_err("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}");
        assert!(matches!(e, NpyError::Header(_)));
        let e = header_err("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 'y'}");
        assert_eq!(e, NpyError::Header("unexpected key \"x\"".into()));
        let e =
            header_err("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}");
        assert_eq!(e, NpyError::Header("key \"descr\" appears twice".into()));
        let e = header_err("{'descr': '<f4', 'fortran_order': False, 'shape': 'big'}");
        assert!(matches!(e, NpyError::Header(_)), "{e:?}");
    }

    #[test]
    fn refuses_what_the_api_cannot_carry() {
        let dt = |descr: &str| {
            header_err(&format!(
                "{{'descr': '{descr}', 'fortran_order': False, 'shape': (1,), }}"
            ))
        };
        for (descr, advice) in [
            (">f4", "astype('<f4')"),
            ("<f8", "np.float32"),
            ("|b1", "np.uint8"),
            ("<c8", "<f4, <f2"),
            ("|O", "<f4, <f2"),
            ("<u1", "<f4, <f2"),
        ] {
            match dt(descr) {
                NpyError::DType { advice: a, .. } => assert!(a.contains(advice), "{descr}: {a}"),
                other => panic!("{descr}: {other:?}"),
            }
        }
        let e = header_err("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }");
        assert_eq!(e, NpyError::FortranOrder);
        let e = header_err(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (4294967296, 4294967296, 16), }",
        );
        assert!(matches!(e, NpyError::TooLarge(_)), "{e:?}");
    }

    #[test]
    fn no_truncation_or_byte_flip_makes_it_panic() {
        let good = write(&Array {
            dtype: DType::I64,
            shape: vec![2, 3],
            data: vec![1; 48],
        });
        for len in 0..good.len() {
            assert!(read(&good[..len]).is_err(), "truncated to {len}");
        }
        // Every value at every header byte: an error or an array whose
        // data is exactly as long as its shape says, never a panic.
        for at in 0..good.len() - 48 {
            for v in 0..=255u8 {
                let mut bytes = good.clone();
                bytes[at] = v;
                if let Ok(a) = read(&bytes) {
                    let n: u64 = a.shape.iter().product();
                    assert_eq!(n * a.dtype.size() as u64, a.data.len() as u64);
                }
            }
        }
    }

    #[test]
    fn data_must_match_the_shape_exactly() {
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
        for len in [8, 11, 16] {
            match read(&file((1, 0), h, &vec![0; len])) {
                Err(NpyError::DataLength {
                    expected, actual, ..
                }) => assert_eq!((expected, actual), (12, len as u64)),
                other => panic!("{len}: {other:?}"),
            }
        }
        assert!(read(&file((1, 0), h, &[0; 12])).is_ok());
    }
}
