//! Bodies of the public HTTP API (DESIGN.md §4) that more than one component
//! reads or writes: JSON tensors, function records, invoke bodies, and the
//! executor description of `/internal/info` and `/admin/executors`.

use std::collections::BTreeMap;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use crate::DType;

/// A tensor in a JSON body: `{"dtype": "f32", "shape": [2, 3], "data": [...]}`,
/// row-major, half floats as numbers, non-finite floats as the strings
/// `"NaN"`, `"Infinity"`, `"-Infinity"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonTensor {
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: Vec<Value>,
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
}

fn float_value(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

fn float_json(x: f64, shortest: String) -> Value {
    if x.is_nan() {
        Value::String("NaN".into())
    } else if x.is_infinite() {
        Value::String(if x > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else {
        // The narrow type's shortest round-trip text, read back as f64, so
        // that 0.1f32 is written `0.1` rather than `0.10000000149011612`.
        let v = shortest.parse::<f64>().unwrap_or(x);
        Number::from_f64(v).map_or(Value::Null, Value::Number)
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
    /// in range.
    pub fn to_le_bytes(&self, max_elements: u64) -> Result<Vec<u8>, TensorCodecError> {
        let n = self.numel(max_elements)?;
        if n != self.data.len() as u64 {
            return Err(TensorCodecError::CountMismatch {
                shape: self.shape.clone(),
                expected: n,
                got: self.data.len(),
            });
        }
        let dtype = self.dtype;
        let mut out = Vec::with_capacity(self.data.len() * dtype.size());
        for (index, v) in self.data.iter().enumerate() {
            let bad = || TensorCodecError::BadValue {
                index,
                value: v.to_string(),
                dtype,
            };
            match dtype {
                DType::F32 => {
                    out.extend_from_slice(&(float_value(v).ok_or_else(bad)? as f32).to_le_bytes())
                }
                DType::F16 => out.extend_from_slice(
                    &f16::from_f64(float_value(v).ok_or_else(bad)?).to_le_bytes(),
                ),
                DType::BF16 => out.extend_from_slice(
                    &bf16::from_f64(float_value(v).ok_or_else(bad)?).to_le_bytes(),
                ),
                DType::I32 => {
                    let x = v
                        .as_i64()
                        .and_then(|x| i32::try_from(x).ok())
                        .ok_or_else(bad)?;
                    out.extend_from_slice(&x.to_le_bytes())
                }
                DType::I64 => out.extend_from_slice(&v.as_i64().ok_or_else(bad)?.to_le_bytes()),
                DType::U8 => {
                    let x = v
                        .as_u64()
                        .and_then(|x| u8::try_from(x).ok())
                        .ok_or_else(bad)?;
                    out.push(x)
                }
            }
        }
        Ok(out)
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
        let chunks = bytes.chunks_exact(dtype.size());
        let data = match dtype {
            DType::F32 => chunks
                .map(|c| {
                    let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    float_json(f64::from(x), x.to_string())
                })
                .collect(),
            DType::F16 => chunks
                .map(|c| {
                    let x = f16::from_le_bytes([c[0], c[1]]);
                    float_json(x.to_f64(), x.to_string())
                })
                .collect(),
            DType::BF16 => chunks
                .map(|c| {
                    let x = bf16::from_le_bytes([c[0], c[1]]);
                    float_json(x.to_f64(), x.to_string())
                })
                .collect(),
            DType::I32 => chunks
                .map(|c| Value::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            DType::I64 => chunks
                .map(|c| {
                    Value::from(i64::from_le_bytes([
                        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
                    ]))
                })
                .collect(),
            DType::U8 => bytes.iter().map(|&b| Value::from(b)).collect(),
        };
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
}

/// A registered function, as `POST /functions` and `GET /functions/{id}`
/// return it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionInfo {
    pub id: String,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dtype: DType, shape: &[u64], data: Value) -> JsonTensor {
        JsonTensor {
            dtype,
            shape: shape.to_vec(),
            data: serde_json::from_value(data).unwrap(),
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
            assert_eq!(back.data, case.data, "{:?}", case.dtype);
        }
    }

    #[test]
    fn refuses_bad_values_and_counts() {
        let e = t(DType::U8, &[1], serde_json::json!([256])).to_le_bytes(10);
        assert!(matches!(
            e,
            Err(TensorCodecError::BadValue { index: 0, .. })
        ));
        let e = t(DType::I32, &[1], serde_json::json!([1.5])).to_le_bytes(10);
        assert!(matches!(e, Err(TensorCodecError::BadValue { .. })));
        let e = t(DType::F32, &[1], serde_json::json!(["nan"])).to_le_bytes(10);
        assert!(matches!(e, Err(TensorCodecError::BadValue { .. })));
        let e = t(DType::F32, &[3], serde_json::json!([1, 2])).to_le_bytes(10);
        assert!(matches!(e, Err(TensorCodecError::CountMismatch { .. })));
        let e = t(DType::F32, &[u64::MAX, 2], serde_json::json!([])).to_le_bytes(10);
        assert!(matches!(e, Err(TensorCodecError::TooLarge(..))));
        let e = JsonTensor::from_le_bytes(DType::F32, vec![2], &[0; 7]);
        assert!(matches!(e, Err(TensorCodecError::BadLength { .. })));
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
    pub id: String,
    pub function_id: String,
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
    pub job_id: String,
}

/// `GET /jobs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobInfo>,
}
