//! Function assets: weights shipped as a safetensors file, uploaded to the
//! device once at registration and shared read-only by every instance.

use std::collections::HashMap;
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use tensor_wasm_kernels::{Backend, DType, Tensor};

use crate::tensors::TenantUsage;

/// Why an assets file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("assets are not a valid safetensors file: {0}")]
    Malformed(String),
    #[error("asset {name:?} has dtype {dtype:?}; supported are F32, F16, BF16, I32, I64, U8")]
    UnsupportedDType { name: String, dtype: String },
    #[error("asset {name:?}: {source}")]
    Tensor {
        name: String,
        #[source]
        source: tensor_wasm_kernels::KernelError,
    },
    #[error("assets exceed the tenant's device memory quota: {0}")]
    Quota(String),
}

/// The dtype of a safetensors tensor, when we support it.
pub fn dtype_from_safetensors(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::U8 => DType::U8,
        _ => return None,
    })
}

/// The safetensors dtype of ours.
pub fn dtype_to_safetensors(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
        DType::U8 => Dtype::U8,
    }
}

/// A function's uploaded assets; gives their device memory back to the
/// tenant when dropped.
#[derive(Debug)]
pub struct Assets {
    pub tensors: Arc<HashMap<String, Tensor>>,
    bytes: u64,
    usage: Arc<TenantUsage>,
}

impl Assets {
    /// No assets.
    pub fn none(usage: Arc<TenantUsage>) -> Assets {
        Assets {
            tensors: Arc::new(HashMap::new()),
            bytes: 0,
            usage,
        }
    }

    /// Decodes a safetensors file and uploads every tensor, charging the
    /// tenant's device memory once.
    pub fn load(
        file: &[u8],
        backend: &dyn Backend,
        usage: Arc<TenantUsage>,
    ) -> Result<Assets, AssetError> {
        let st =
            SafeTensors::deserialize(file).map_err(|e| AssetError::Malformed(e.to_string()))?;
        let mut tensors = HashMap::new();
        let mut bytes = 0u64;
        for (name, view) in st.iter() {
            let dtype = dtype_from_safetensors(view.dtype()).ok_or_else(|| {
                AssetError::UnsupportedDType {
                    name: name.to_string(),
                    dtype: format!("{:?}", view.dtype()),
                }
            })?;
            let t = backend
                .from_bytes(dtype, view.shape(), view.data())
                .map_err(|source| AssetError::Tensor {
                    name: name.to_string(),
                    source,
                })?;
            bytes += t.nbytes();
            tensors.insert(name.to_string(), t);
        }
        usage
            .reserve(bytes, true)
            .map_err(|e| AssetError::Quota(e.message))?;
        Ok(Assets {
            tensors: Arc::new(tensors),
            bytes,
            usage,
        })
    }

    /// Names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.tensors.keys().cloned().collect();
        n.sort();
        n
    }
}

impl Drop for Assets {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.usage.release(self.bytes, true);
        }
    }
}
