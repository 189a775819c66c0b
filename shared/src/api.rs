//! Bodies of the public HTTP API (`docs/API.md`) that more than one component
//! reads or writes: JSON tensors, function records, invoke bodies, the
//! executor description of `/internal/info` and `/admin/executors`, and
//! where an inbound move stands (the internal migration routes).

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::io::Write as _;

use half::{bf16, f16};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::DType;
use crate::ids::{FunctionId, JobId};

/// A tensor in a JSON body: `{"dtype": "f32", "shape": [2, 3], "data": [...]}`,
/// row-major, half floats as numbers, non-finite floats as the strings
/// `"NaN"`, `"Infinity"`, `"-Infinity"`.
///
/// `data` is kept as the array's JSON text and decoded by
/// [`JsonTensor::to_le_bytes`] once the dtype is known (the fields may come
/// in any order), straight into bytes: a body costs about its own size in
/// memory, never a JSON value per element (which would be 16 to 32 times
/// the size of the text a client sent).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonTensor {
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: Box<RawValue>,
}

impl PartialEq for JsonTensor {
    /// Same dtype, shape and data text.
    fn eq(&self, other: &Self) -> bool {
        self.dtype == other.dtype
            && self.shape == other.shape
            && self.data.get() == other.data.get()
    }
}

/// Why a JSON tensor cannot be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TensorCodecError {
    #[error("shape {shape:?} holds {expected} elements but data has {got}")]
    CountMismatch {
        shape: Vec<u64>,
        expected: u64,
        got: usize,
    },
    #[error("shape {0:?} holds more elements than allowed ({1})")]
    TooLarge(Vec<u64>, u64),
    #[error("element {index}: {value} is not a valid {dtype}")]
    BadValue {
        index: usize,
        value: String,
        dtype: DType,
    },
    #[error("data of {len} bytes is not a whole number of {dtype} elements for shape {shape:?}")]
    BadLength {
        len: usize,
        dtype: DType,
        shape: Vec<u64>,
    },
    #[error("data is not a JSON array of numbers: {0}")]
    NotAnArray(String),
}

/// One element of a `data` array as JSON has it.
#[derive(Clone, Copy, Debug)]
enum Scalar<'a> {
    Float(f64),
    Int(i64),
    Uint(u64),
    Str(&'a str),
    /// `true`, `null`, an array, an object, or an escaped string: never
    /// valid; the name says which.
    Other(&'static str),
}

impl Scalar<'_> {
    fn float(self) -> Option<f64> {
        match self {
            Scalar::Float(x) => Some(x),
            Scalar::Int(i) => Some(i as f64),
            Scalar::Uint(u) => Some(u as f64),
            Scalar::Str("NaN") => Some(f64::NAN),
            Scalar::Str("Infinity") => Some(f64::INFINITY),
            Scalar::Str("-Infinity") => Some(f64::NEG_INFINITY),
            _ => None,
        }
    }

    /// An exact integer (a JSON number without fraction or exponent).
    fn int(self) -> Option<i64> {
        match self {
            Scalar::Int(i) => Some(i),
            Scalar::Uint(u) => i64::try_from(u).ok(),
            _ => None,
        }
    }

    fn uint(self) -> Option<u64> {
        match self {
            Scalar::Int(i) => u64::try_from(i).ok(),
            Scalar::Uint(u) => Some(u),
            _ => None,
        }
    }

    /// The element as an error message shows it.
    fn describe(self) -> String {
        match self {
            Scalar::Float(x) => {
                serde_json::Number::from_f64(x).map_or(x.to_string(), |n| n.to_string())
            }
            Scalar::Int(i) => i.to_string(),
            Scalar::Uint(u) => u.to_string(),
            Scalar::Str(s) => format!("{s:?}"),
            Scalar::Other(what) => what.to_string(),
        }
    }

    /// A float element, unless it is a finite number past the range of the
    /// dtype (which would silently become an infinity).
    fn finite_float<T>(
        self,
        narrow: impl Fn(f64) -> T,
        is_infinite: impl Fn(&T) -> bool,
    ) -> Option<T> {
        let x = self.float()?;
        let v = narrow(x);
        (!x.is_finite() || !is_infinite(&v)).then_some(v)
    }

    /// Appends the element as `dtype`, little-endian; `None` when it is not
    /// a valid value of that dtype.
    fn push(self, dtype: DType, out: &mut Vec<u8>) -> Option<()> {
        match dtype {
            DType::F32 => {
                let v = self.finite_float(|x| x as f32, |v| v.is_infinite())?;
                out.extend_from_slice(&v.to_le_bytes())
            }
            DType::F16 => {
                let v = self.finite_float(f16::from_f64, |v| v.is_infinite())?;
                out.extend_from_slice(&v.to_le_bytes())
            }
            DType::BF16 => {
                let v = self.finite_float(bf16::from_f64, |v| v.is_infinite())?;
                out.extend_from_slice(&v.to_le_bytes())
            }
            DType::I32 => out.extend_from_slice(&i32::try_from(self.int()?).ok()?.to_le_bytes()),
            DType::I64 => out.extend_from_slice(&self.int()?.to_le_bytes()),
            DType::U8 => out.push(u8::try_from(self.uint()?).ok()?),
        }
        Some(())
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number, \"NaN\", \"Infinity\" or \"-Infinity\"")
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Uint(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(v))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        // Only a string with escapes is not borrowed; no valid one has any.
        Ok(Scalar::Other("an escaped string"))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Other("a boolean"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other("null"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("an array"))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Scalar::Other("an object"))
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// Decodes a `data` array into `out`, stopping at the first bad element or
/// at the first element past `expected`; what stopped it is left in
/// `failure`.
struct Elements<'o> {
    dtype: DType,
    expected: u64,
    out: &'o mut Vec<u8>,
    count: usize,
    failure: Option<TensorCodecError>,
}

impl<'de> Visitor<'de> for &mut Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(v) = seq.next_element::<Scalar<'de>>()? {
            if self.count as u64 == self.expected {
                // More elements than the shape holds: count them all for the
                // message, without storing any.
                let mut got = self.count + 1;
                while seq.next_element::<de::IgnoredAny>()?.is_some() {
                    got += 1;
                }
                self.count = got;
                return Err(de::Error::custom("too many elements"));
            }
            if v.push(self.dtype, self.out).is_none() {
                self.failure = Some(TensorCodecError::BadValue {
                    index: self.count,
                    value: v.describe(),
                    dtype: self.dtype,
                });
                return Err(de::Error::custom("bad element"));
            }
            self.count += 1;
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for &mut Elements<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

/// Appends `x` (a finite value) to `out` as JSON writes the `f64` read back
/// from `shortest`, the narrow type's shortest round-trip text, so that
/// 0.1f32 is written `0.1` rather than `0.10000000149011612`; non-finite
/// values as their strings.
fn write_float(out: &mut Vec<u8>, scratch: &mut String, x: f64, shortest: impl fmt::Display) {
    if x.is_nan() {
        out.extend_from_slice(b"\"NaN\"");
    } else if x.is_infinite() {
        out.extend_from_slice(if x > 0.0 {
            b"\"Infinity\""
        } else {
            b"\"-Infinity\""
        });
    } else {
        scratch.clear();
        let _ = write!(scratch, "{shortest}");
        let v = scratch.parse::<f64>().unwrap_or(x);
        // Writing a finite f64 into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &v);
    }
}

impl JsonTensor {
    /// Element count, checked against `max_elements`.
    pub fn numel(&self, max_elements: u64) -> Result<u64, TensorCodecError> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= max_elements)
            .ok_or_else(|| TensorCodecError::TooLarge(self.shape.clone(), max_elements))
    }

    /// The elements as little-endian bytes. The element count must match
    /// the shape and stay within `max_elements`; integers must be exact and
    /// in range. Decodes the array element by element into the result:
    /// nothing is allocated beyond it (and never more than the data text
    /// can hold).
    pub fn to_le_bytes(&self, max_elements: u64) -> Result<Vec<u8>, TensorCodecError> {
        let n = self.numel(max_elements)?;
        let text = self.data.get();
        // Every element takes at least two bytes of text ("0,").
        let fits = (text.len() as u64 / 2 + 1).min(n);
        let mut out = Vec::with_capacity(fits as usize * self.dtype.size());
        let mut elements = Elements {
            dtype: self.dtype,
            expected: n,
            out: &mut out,
            count: 0,
            failure: None,
        };
        let mut de = serde_json::Deserializer::from_str(text);
        let decoded = (&mut elements).deserialize(&mut de);
        if let Some(failure) = elements.failure.take() {
            return Err(failure);
        }
        let mismatch = |got| TensorCodecError::CountMismatch {
            shape: self.shape.clone(),
            expected: n,
            got,
        };
        match decoded {
            Err(_) if elements.count as u64 > n => Err(mismatch(elements.count)),
            Err(e) => Err(TensorCodecError::NotAnArray(e.to_string())),
            Ok(()) if elements.count as u64 != n => Err(mismatch(elements.count)),
            Ok(()) => Ok(out),
        }
    }

    /// A JSON tensor from little-endian bytes.
    pub fn from_le_bytes(
        dtype: DType,
        shape: Vec<u64>,
        bytes: &[u8],
    ) -> Result<JsonTensor, TensorCodecError> {
        let n = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        if n.and_then(|n| n.checked_mul(dtype.size() as u64)) != Some(bytes.len() as u64) {
            return Err(TensorCodecError::BadLength {
                len: bytes.len(),
                dtype,
                shape,
            });
        }
        let mut text = Vec::with_capacity(2 + bytes.len() * 3);
        text.push(b'[');
        // The narrow float's text, reused across elements.
        let mut scratch = String::new();
        for (i, c) in bytes.chunks_exact(dtype.size()).enumerate() {
            if i > 0 {
                text.push(b',');
            }
            match dtype {
                DType::F32 => {
                    let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    write_float(&mut text, &mut scratch, f64::from(x), x);
                }
                DType::F16 => {
                    let x = f16::from_le_bytes([c[0], c[1]]);
                    write_float(&mut text, &mut scratch, x.to_f64(), x);
                }
                DType::BF16 => {
                    let x = bf16::from_le_bytes([c[0], c[1]]);
                    write_float(&mut text, &mut scratch, x.to_f64(), x);
                }
                DType::I32 => {
                    let _ = write!(text, "{}", i32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                }
                DType::I64 => {
                    let v = i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                    let _ = write!(text, "{v}");
                }
                DType::U8 => {
                    let _ = write!(text, "{}", c[0]);
                }
            }
        }
        text.push(b']');
        // The text is ASCII JSON written above.
        let text =
            String::from_utf8(text).map_err(|e| TensorCodecError::NotAnArray(e.to_string()))?;
        let data =
            RawValue::from_string(text).map_err(|e| TensorCodecError::NotAnArray(e.to_string()))?;
        Ok(JsonTensor { dtype, shape, data })
    }
}

/// Per-function settings a tenant may ask for; each is capped by the
/// operator's limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// Deadline of one invocation, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Linear memory cap of one instance, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// Most warm instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    /// What a crash of the executor may lose of the warm state
    /// (`docs/API.md`, "Durability"); `periodic` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<Durability>,
    /// Interval of a `periodic` function's checkpoints, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_ms: Option<u64>,
}

/// What a crash of the executor (or its host) may lose of a function's
/// warm state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Everything: the state lives in memory only (and is saved on a
    /// graceful stop).
    None,
    /// At most the work since the last checkpoint, taken every
    /// `checkpoint_ms`.
    #[default]
    Periodic,
    /// Nothing a client saw answered: an invocation is answered once its
    /// effects are on disk.
    Strict,
}

impl Durability {
    /// Its name in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::None => "none",
            Durability::Periodic => "periodic",
            Durability::Strict => "strict",
        }
    }
}

/// A registered function, as `POST /functions` and `GET /functions/{id}`
/// return it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionInfo {
    pub id: FunctionId,
    pub name: String,
    /// SHA-256 of the original wasm bytes, hex.
    pub sha256: String,
    pub exports: Vec<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The settings in force, with the operator's defaults filled in.
    pub config: FunctionConfig,
    /// Names of the function's assets.
    #[serde(default)]
    pub assets: Vec<String>,
    /// SHA-256 of the assets file as uploaded, hex; absent without assets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assets_sha256: Option<String>,
}

/// `GET /functions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionList {
    pub functions: Vec<FunctionInfo>,
}

/// A JSON invoke request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeRequest {
    #[serde(default)]
    pub inputs: BTreeMap<String, JsonTensor>,
}

/// A JSON invoke response.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InvokeResponse {
    pub outputs: BTreeMap<String, JsonTensor>,
    /// Raw bytes the function also wrote, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_b64: Option<String>,
}

impl InvokeResponse {
    /// Bytes its JSON takes, about: what holding it costs.
    pub fn json_bytes(&self) -> usize {
        let tensors: usize = self
            .outputs
            .iter()
            .map(|(name, t)| name.len() + t.data.get().len() + 21 * t.shape.len() + 48)
            .sum();
        tensors + self.raw_b64.as_ref().map_or(0, String::len) + 32
    }
}

/// The device an executor drives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDescription {
    /// `"cuda"` or `"cpu"`.
    pub kind: String,
    pub name: String,
    pub uuid: Option<String>,
    pub mig_profile: Option<String>,
    /// Bytes.
    pub memory_total: u64,
    /// Bytes.
    pub memory_used: u64,
}

/// Counters of one executor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorStats {
    pub active_instances: u64,
    pub jobs_in_flight: u64,
    pub kernel_dispatches_total: u64,
}

/// One executor, as `/internal/info` and `/admin/executors` describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorInfo {
    pub id: String,
    pub addr: String,
    pub version: String,
    pub healthy: bool,
    pub device: DeviceDescription,
    pub tenants: Vec<String>,
    pub stats: ExecutorStats,
    /// The snapshot formats it reads and writes; `None` from release 0.1,
    /// which did not report them (format 1 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_formats: Option<crate::build::SnapshotFormats>,
    /// The guest ABI versions it runs; `None` from release 0.1 (v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_abi: Option<Vec<u32>>,
    /// Its tenants frozen now (an export or a move of them under way):
    /// they cannot move until that ends. `None` from earlier releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<Vec<String>>,
    /// Device memory each of its tenants holds (tensors and assets), in
    /// bytes. `None` from earlier releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_device_bytes: Option<BTreeMap<String, u64>>,
    /// The guest ABI versions its functions use (those of `guest_abi`
    /// that a rollback must keep). `None` from earlier releases: take
    /// `guest_abi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_abi_used: Option<Vec<u32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dtype: DType, shape: &[u64], data: serde_json::Value) -> JsonTensor {
        JsonTensor {
            dtype,
            shape: shape.to_vec(),
            data: RawValue::from_string(data.to_string()).unwrap(),
        }
    }

    #[test]
    fn round_trips_every_dtype() {
        let cases = [
            t(
                DType::F32,
                &[2, 2],
                serde_json::json!([0.1, -2.5, "NaN", "-Infinity"]),
            ),
            t(
                DType::F16,
                &[3],
                serde_json::json!([0.5, 65504.0, "Infinity"]),
            ),
            t(DType::BF16, &[1], serde_json::json!([-3.0])),
            t(DType::I32, &[2], serde_json::json!([i32::MIN, i32::MAX])),
            t(DType::I64, &[2], serde_json::json!([i64::MIN, 7])),
            t(DType::U8, &[0], serde_json::json!([])),
        ];
        for case in cases {
            let bytes = case.to_le_bytes(1 << 20).unwrap();
            let back = JsonTensor::from_le_bytes(case.dtype, case.shape.clone(), &bytes).unwrap();
            assert_eq!(back.to_le_bytes(1 << 20).unwrap(), bytes);
            // Text survives too (NaN compares as the string).
            assert_eq!(back.data.get(), case.data.get(), "{:?}", case.dtype);
        }
    }

    #[test]
    fn floats_are_written_as_their_shortest_text() {
        let bytes: Vec<u8> = [0.1f32, 1.0, 1e-7, 1e30, -0.0, 16_777_216.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let j = JsonTensor::from_le_bytes(DType::F32, vec![6], &bytes).unwrap();
        assert_eq!(j.data.get(), "[0.1,1.0,1e-7,1e+30,-0.0,16777216.0]");
        let h: Vec<u8> = [bf16::from_f32(0.1), bf16::from_f32(-2.0)]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let j = JsonTensor::from_le_bytes(DType::BF16, vec![2], &h).unwrap();
        assert_eq!(j.data.get(), "[0.100097656,-2.0]");
        assert_eq!(j.to_le_bytes(2).unwrap(), h);
    }

    #[test]
    fn fields_come_in_any_order_and_whitespace_is_kept_out_of_the_way() {
        let a: JsonTensor =
            serde_json::from_str(r#"{"data": [ 1 , 2.5 ], "shape": [2], "dtype": "f32"}"#).unwrap();
        let bytes = a.to_le_bytes(10).unwrap();
        assert_eq!(
            bytes,
            [1.0f32, 2.5]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<_>>()
        );
        let round = serde_json::to_string(&a).unwrap();
        let b: JsonTensor = serde_json::from_str(&round).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn refuses_bad_values_and_counts() {
        let e = t(DType::U8, &[1], serde_json::json!([256])).to_le_bytes(10);
        assert!(matches!(
            e,
            Err(TensorCodecError::BadValue { index: 0, .. })
        ));
        let e = t(DType::U8, &[2], serde_json::json!([1, -1])).to_le_bytes(10);
        assert!(matches!(
            e,
            Err(TensorCodecError::BadValue { index: 1, .. })
        ));
        let e = t(DType::I32, &[1], serde_json::json!([1.5])).to_le_bytes(10);
        assert!(matches!(e, Err(TensorCodecError::BadValue { .. })));
        let e = t(DType::I32, &[1], serde_json::json!([1.0])).to_le_bytes(10);
        assert!(matches!(e, Err(TensorCodecError::BadValue { .. })));
        let e = t(DType::I64, &[1], serde_json::json!([u64::MAX])).to_le_bytes(10);
        assert!(matches!(e, Err(TensorCodecError::BadValue { .. })));
        let e = t(DType::F32, &[1], serde_json::json!(["nan"])).to_le_bytes(10);
        assert!(matches!(e, Err(TensorCodecError::BadValue { .. })));
        // Finite numbers past a float dtype's range are refused, not made
        // infinite; the largest finite values and the spelled-out
        // infinities pass.
        for (dtype, bad) in [
            (DType::F32, 1e39),
            (DType::F16, 70000.0),
            (DType::BF16, 1e39),
        ] {
            let e = t(dtype, &[2], serde_json::json!([1, bad])).to_le_bytes(10);
            assert!(
                matches!(e, Err(TensorCodecError::BadValue { index: 1, .. })),
                "{dtype} {bad}: {e:?}"
            );
        }
        let ok = t(DType::F16, &[2], serde_json::json!([65504.0, "-Infinity"]));
        assert_eq!(ok.to_le_bytes(10).unwrap().len(), 4);
        let ok = t(DType::F32, &[1], serde_json::json!([3.4028234e38]));
        assert!(ok.to_le_bytes(10).is_ok());
        for bad in [
            serde_json::json!([null]),
            serde_json::json!([true]),
            serde_json::json!([[1]]),
            serde_json::json!([{"a": 1}]),
            serde_json::json!(["N\u{61}N\n"]),
        ] {
            let e = t(DType::F32, &[1], bad.clone()).to_le_bytes(10);
            assert!(
                matches!(e, Err(TensorCodecError::BadValue { index: 0, .. })),
                "{bad}: {e:?}"
            );
        }
        let e = t(DType::F32, &[3], serde_json::json!([1, 2])).to_le_bytes(10);
        assert!(matches!(
            e,
            Err(TensorCodecError::CountMismatch {
                expected: 3,
                got: 2,
                ..
            })
        ));
        let e = t(DType::F32, &[2], serde_json::json!([1, 2, 3, 4])).to_le_bytes(10);
        assert!(matches!(
            e,
            Err(TensorCodecError::CountMismatch {
                expected: 2,
                got: 4,
                ..
            })
        ));
        let e = t(DType::F32, &[u64::MAX, 2], serde_json::json!([])).to_le_bytes(10);
        assert!(matches!(e, Err(TensorCodecError::TooLarge(..))));
        for not_array in [
            serde_json::json!({"a": 1}),
            serde_json::json!(3),
            serde_json::json!("x"),
        ] {
            let e = t(DType::F32, &[1], not_array).to_le_bytes(10);
            assert!(matches!(e, Err(TensorCodecError::NotAnArray(_))), "{e:?}");
        }
        let e = JsonTensor::from_le_bytes(DType::F32, vec![2], &[0; 7]);
        assert!(matches!(e, Err(TensorCodecError::BadLength { .. })));
    }

    #[test]
    fn a_huge_shape_with_little_data_allocates_little() {
        // 2^40 elements claimed, two sent: refused by count, without
        // reserving room for the claim.
        let e = t(DType::F32, &[1 << 40], serde_json::json!([1, 2])).to_le_bytes(u64::MAX);
        assert!(matches!(
            e,
            Err(TensorCodecError::CountMismatch { got: 2, .. })
        ));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<InvokeRequest, _> = serde_json::from_str(r#"{"inputs": {}, "extra": 1}"#);
        assert!(r.is_err());
        let r: Result<JsonTensor, _> =
            serde_json::from_str(r#"{"dtype": "f64", "shape": [], "data": []}"#);
        assert!(r.is_err());
    }
}

/// Where an async job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl JobStatus {
    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed)
    }
}

/// An async job, as `GET /jobs/{id}` returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: JobId,
    pub function_id: FunctionId,
    pub status: JobStatus,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub finished_at: Option<String>,
    /// The invoke response in JSON form, once succeeded.
    pub result: Option<InvokeResponse>,
    /// Why it failed, once failed.
    pub error: Option<crate::ApiError>,
}

/// `POST /functions/{id}/invoke-async`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAccepted {
    pub job_id: JobId,
}

/// `GET /jobs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobInfo>,
}

/// Where a destination's inbound copy of a tenant stands (the internal
/// migration routes, `docs/API.md`): what the executor answers and the
/// proxy's recovery reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundState {
    /// No inbound tenant of that id.
    None,
    /// Being staged.
    Staging,
    /// Discarded: nothing of it is left.
    Discarded,
    /// Published: the tenant is served there.
    Committed,
}
