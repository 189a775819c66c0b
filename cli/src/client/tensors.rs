//! Tensors between files and invoke bodies.
//!
//! Inputs come from `.npy` files ([`super::npy`]) and `.safetensors` files
//! and travel as one `application/x-safetensors` body: binary, exact, and
//! read by the executor without a JSON detour. Outputs come back as JSON
//! (printed), or as safetensors (written to a `.safetensors` file or split
//! into one `.npy` file per output); a finished job's JSON result converts
//! to the same files.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use safetensors::tensor::{SafeTensors, TensorView};
use tensor_wasm_executor::assets::{dtype_from_safetensors, dtype_to_safetensors};
use tensor_wasm_shared::DType;
use tensor_wasm_shared::api::{InvokeResponse, JsonTensor};

use super::npy::{self, NpyError};

/// Safetensors metadata key for raw bytes a function wrote beside its named
/// outputs (the executor's convention, `docs/API.md`, "Invoke bodies").
const RAW_METADATA_KEY: &str = "raw_b64";
/// File written for raw bytes when outputs go to a directory.
pub const RAW_FILE: &str = "raw.bin";

/// A named tensor in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Little-endian, row-major.
    pub data: Vec<u8>,
}

/// Why tensors could not be read, encoded or written.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("--input {0:?}: expected NAME=FILE.npy, NAME=FILE.safetensors or FILE.safetensors")]
    BadSpec(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Npy {
        path: PathBuf,
        #[source]
        source: NpyError,
    },
    #[error("{}: not a safetensors file: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },
    #[error("{}: neither a .npy nor a .safetensors file", path.display())]
    UnknownKind { path: PathBuf },
    #[error(
        "{}: tensor {name:?} has dtype {dtype}, which the API does not carry (f32, f16, bf16, i32, i64, u8)",
        path.display()
    )]
    UnsupportedDType {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{}: no tensor named {name:?} (it holds {names})", path.display())]
    NoSuchTensor {
        path: PathBuf,
        name: String,
        names: String,
    },
    #[error("input {0:?} is given twice")]
    Duplicate(String),
    #[error("cannot encode tensors as safetensors: {0}")]
    Encode(String),
    #[error("the answer is not valid: {0}")]
    Answer(String),
    #[error("outputs {0:?} and {1:?} would both be written to {2}")]
    Collision(String, String, String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TensorFileError + '_ {
    move |source| TensorFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every tensor of a safetensors file, in the file's order.
fn safetensors_tensors(path: &Path, bytes: &[u8]) -> Result<Vec<Tensor>, TensorFileError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| TensorFileError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    st.iter()
        .map(|(name, view)| {
            let dtype = dtype_from_safetensors(view.dtype()).ok_or_else(|| {
                TensorFileError::UnsupportedDType {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    dtype: view.dtype().to_string(),
                }
            })?;
            Ok(Tensor {
                name: name.to_string(),
                dtype,
                shape: view.shape().iter().map(|&d| d as u64).collect(),
                data: view.data().to_vec(),
            })
        })
        .collect()
}

/// Every tensor of the safetensors file at `path` (`--safetensors FILE`).
pub fn read_safetensors(path: &Path) -> Result<Vec<Tensor>, TensorFileError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    safetensors_tensors(path, &bytes)
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

/// The tensors named by one `--input`: `NAME=FILE.npy` (that array),
/// `NAME=FILE.safetensors` (the tensor `NAME` of the file, or its only
/// tensor, as `NAME`), or `FILE.safetensors` (every tensor of the file).
pub fn read_input(spec: &str) -> Result<Vec<Tensor>, TensorFileError> {
    let Some((name, file)) = spec.split_once('=') else {
        let path = Path::new(spec);
        if !is_safetensors(path) {
            return Err(TensorFileError::BadSpec(spec.to_string()));
        }
        return read_safetensors(path);
    };
    if name.is_empty() || file.is_empty() {
        return Err(TensorFileError::BadSpec(spec.to_string()));
    }
    let path = Path::new(file);
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    if bytes.starts_with(b"\x93NUMPY") {
        let a = npy::read(&bytes).map_err(|source| TensorFileError::Npy {
            path: path.to_path_buf(),
            source,
        })?;
        return Ok(vec![Tensor {
            name: name.to_string(),
            dtype: a.dtype,
            shape: a.shape,
            data: a.data,
        }]);
    }
    let looks_npy = path.extension().is_some_and(|e| e == "npy");
    if looks_npy {
        return Err(TensorFileError::Npy {
            path: path.to_path_buf(),
            source: NpyError::BadMagic,
        });
    }
    let mut all = match safetensors_tensors(path, &bytes) {
        Ok(all) => all,
        Err(e) if is_safetensors(path) => return Err(e),
        Err(_) => {
            return Err(TensorFileError::UnknownKind {
                path: path.to_path_buf(),
            });
        }
    };
    let pick = match all.iter().position(|t| t.name == name) {
        Some(i) => i,
        None if all.len() == 1 => 0,
        None => {
            return Err(TensorFileError::NoSuchTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
                names: all
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    };
    let mut t = all.swap_remove(pick);
    t.name = name.to_string();
    Ok(vec![t])
}

/// Checks that no input name repeats.
pub fn check_unique(tensors: &[Tensor]) -> Result<(), TensorFileError> {
    let mut seen = BTreeSet::new();
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(TensorFileError::Duplicate(t.name.clone()));
        }
    }
    Ok(())
}

/// Tensors (and raw bytes, as metadata) as one safetensors file.
pub fn to_safetensors(tensors: &[Tensor], raw: Option<&[u8]>) -> Result<Vec<u8>, TensorFileError> {
    let views = tensors
        .iter()
        .map(|t| {
            let shape = t.shape.iter().map(|&d| d as usize).collect();
            TensorView::new(dtype_to_safetensors(t.dtype), shape, &t.data)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| TensorFileError::Encode(format!("{}: {e}", t.name)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = raw.map(|r| {
        HashMap::from([(
            RAW_METADATA_KEY.to_string(),
            base64::engine::general_purpose::STANDARD.encode(r),
        )])
    });
    safetensors::serialize(views, metadata).map_err(|e| TensorFileError::Encode(e.to_string()))
}

/// What a function returned: named tensors, and raw bytes it wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outputs {
    pub tensors: Vec<Tensor>,
    pub raw: Option<Vec<u8>>,
}

fn decode_raw(b64: &str) -> Result<Vec<u8>, TensorFileError> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| TensorFileError::Answer(format!("raw_b64: {e}")))
}

impl Outputs {
    /// From a JSON invoke response (or a job's result).
    pub fn from_json(resp: &InvokeResponse) -> Result<Outputs, TensorFileError> {
        let tensors = resp
            .outputs
            .iter()
            .map(|(name, t)| {
                let max = u64::MAX / t.dtype.size() as u64;
                let data = t
                    .to_le_bytes(max)
                    .map_err(|e| TensorFileError::Answer(format!("output {name:?}: {e}")))?;
                Ok(Tensor {
                    name: name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let raw = resp.raw_b64.as_deref().map(decode_raw).transpose()?;
        Ok(Outputs { tensors, raw })
    }

    /// From a safetensors answer.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Outputs, TensorFileError> {
        let answer = Path::new("the answer");
        let tensors = safetensors_tensors(answer, bytes)?;
        let raw = SafeTensors::read_metadata(bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .and_then(|m| m.get(RAW_METADATA_KEY).cloned())
            .map(|b64| decode_raw(&b64))
            .transpose()?;
        Ok(Outputs { tensors, raw })
    }

    /// As the JSON invoke response would have it.
    pub fn to_json(&self) -> Result<InvokeResponse, TensorFileError> {
        let outputs = self
            .tensors
            .iter()
            .map(|t| {
                JsonTensor::from_le_bytes(t.dtype, t.shape.clone(), &t.data)
                    .map(|j| (t.name.clone(), j))
                    .map_err(|e| TensorFileError::Answer(format!("output {:?}: {e}", t.name)))
            })
            .collect::<Result<_, _>>()?;
        Ok(InvokeResponse {
            outputs,
            raw_b64: self
                .raw
                .as_deref()
                .map(|r| base64::engine::general_purpose::STANDARD.encode(r)),
        })
    }

    /// Writes one `<name>.npy` per output (and `raw.bin` for raw bytes)
    /// into `dir`, creating it; the files written.
    pub fn write_dir(&self, dir: &Path) -> Result<Vec<PathBuf>, TensorFileError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut taken: HashMap<String, &str> = HashMap::new();
        let mut written = Vec::new();
        for t in &self.tensors {
            let file = format!("{}.npy", file_stem(&t.name));
            if let Some(other) = taken.insert(file.clone(), &t.name) {
                return Err(TensorFileError::Collision(
                    other.to_string(),
                    t.name.clone(),
                    file,
                ));
            }
            let path = dir.join(&file);
            let bytes = npy::write(&npy::Array {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data: t.data.clone(),
            });
            std::fs::write(&path, bytes).map_err(io_err(&path))?;
            written.push(path);
        }
        if let Some(raw) = &self.raw {
            let path = dir.join(RAW_FILE);
            std::fs::write(&path, raw).map_err(io_err(&path))?;
            written.push(path);
        }
        Ok(written)
    }
}

/// A file name for an output name: safe characters kept, others `_`, and
/// never hidden or a path.
fn file_stem(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("_{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, dtype: DType, shape: &[u64], data: Vec<u8>) -> Tensor {
        Tensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }

    #[test]
    fn inputs_come_from_npy_and_safetensors_files() {
        let dir = tempfile::tempdir().unwrap();
        let x = t(
            "x",
            DType::F32,
            &[2],
            [1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        let npy_path = dir.path().join("x.npy");
        std::fs::write(
            &npy_path,
            npy::write(&npy::Array {
                dtype: x.dtype,
                shape: x.shape.clone(),
                data: x.data.clone(),
            }),
        )
        .unwrap();
        let got = read_input(&format!("a={}", npy_path.display())).unwrap();
        assert_eq!(
            got,
            vec![Tensor {
                name: "a".into(),
                ..x.clone()
            }]
        );

        let b = t("b", DType::BF16, &[1], vec![0x80, 0x3f]);
        let st = dir.path().join("in.safetensors");
        std::fs::write(&st, to_safetensors(&[x.clone(), b.clone()], None).unwrap()).unwrap();
        let all = read_input(st.to_str().unwrap()).unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.contains(&b) && all.contains(&x));
        // NAME=FILE.safetensors picks the tensor of that name...
        let got = read_input(&format!("b={}", st.display())).unwrap();
        assert_eq!(got, vec![b.clone()]);
        // ...and refuses a name the file lacks when it holds several.
        let e = read_input(&format!("c={}", st.display())).unwrap_err();
        assert!(e.to_string().contains("no tensor named \"c\""), "{e}");
        // A file of one tensor gives it under the name asked for.
        let one = dir.path().join("one.safetensors");
        std::fs::write(
            &one,
            to_safetensors(std::slice::from_ref(&b), None).unwrap(),
        )
        .unwrap();
        let got = read_input(&format!("w={}", one.display())).unwrap();
        assert_eq!(got[0].name, "w");

        for bad in ["x.npy", "=x.npy", "x="] {
            assert!(
                matches!(read_input(bad), Err(TensorFileError::BadSpec(_))),
                "{bad}"
            );
        }
        let junk = dir.path().join("junk.bin");
        std::fs::write(&junk, b"hello").unwrap();
        let e = read_input(&format!("x={}", junk.display())).unwrap_err();
        assert!(matches!(e, TensorFileError::UnknownKind { .. }), "{e}");
        let fake = dir.path().join("fake.npy");
        std::fs::write(&fake, b"hello").unwrap();
        let e = read_input(&format!("x={}", fake.display())).unwrap_err();
        assert!(e.to_string().contains("not a .npy file"), "{e}");
        assert!(check_unique(&[x.clone(), x]).is_err());
    }

    #[test]
    fn outputs_convert_between_json_safetensors_and_npy() {
        let y = t(
            "y",
            DType::F32,
            &[2, 2],
            [1f32, 3.0, 6.0, -7.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        );
        let n = t("n/../count", DType::I64, &[1], 5i64.to_le_bytes().to_vec());
        let out = Outputs {
            tensors: vec![n, y],
            raw: Some(b"raw!".to_vec()),
        };
        let json = out.to_json().unwrap();
        assert_eq!(Outputs::from_json(&json).unwrap(), out);
        let st = to_safetensors(&out.tensors, out.raw.as_deref()).unwrap();
        let mut back = Outputs::from_safetensors(&st).unwrap();
        back.tensors.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(back, out);

        let dir = tempfile::tempdir().unwrap();
        let files = out.write_dir(&dir.path().join("out")).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["n_.._count.npy", "y.npy", "raw.bin"]);
        let y = npy::read(&std::fs::read(&files[1]).unwrap()).unwrap();
        assert_eq!((y.dtype, y.shape), (DType::F32, vec![2, 2]));
        assert_eq!(file_stem(".hidden"), "_.hidden");
        assert_eq!(file_stem(""), "_");
    }
}
