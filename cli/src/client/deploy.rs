//! `tensor-wasm deploy`: register a function (`POST /functions`).
//!
//! A module alone goes as an `application/wasm` body; with assets or a
//! config it goes as `multipart/form-data` with the parts `module`,
//! `assets` and `config` that the API reads. Files are streamed from disk
//! with a progress bar, never read whole, except `.wat` text, which is
//! compiled to wasm here first.

use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tensor_wasm_shared::api::{FunctionConfig, FunctionInfo};

use super::http::{Body, encode};
use super::{Conn, output};

/// Flags of `tensor-wasm deploy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The module: a .wasm file, or .wat text (compiled here).
    wasm: PathBuf,
    /// A safetensors file of weights the function reads as assets.
    #[arg(long)]
    assets: Option<PathBuf>,
    /// The function's name, unique per tenant [default: the file's name
    /// without extension].
    #[arg(long)]
    name: Option<String>,
    /// Per-function settings as JSON, or @FILE:
    /// {"deadline_ms", "memory_limit_bytes", "max_instances"}.
    #[arg(long)]
    config: Option<String>,
    /// Replace the tenant's function of the same name (its id stays).
    #[arg(long)]
    replace: bool,
    /// Print the function record as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// The module's bytes to send: a file to stream, or compiled WAT.
enum Module {
    File { file: File, len: u64 },
    Bytes(Vec<u8>),
}

impl Module {
    fn open(path: &Path) -> anyhow::Result<Module> {
        let mut file = File::open(path).with_context(|| format!("{}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("{}", path.display()))?
            .len();
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).unwrap_or(0);
        if n == 4 && &magic == b"\0asm" {
            drop(file);
            let file = File::open(path).with_context(|| format!("{}", path.display()))?;
            return Ok(Module::File { file, len });
        }
        let text = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
        // Text is taken for WAT (which may open with comments); the WAT
        // parser's message says where it is not.
        let is_wat =
            path.extension().is_some_and(|e| e == "wat") || std::str::from_utf8(&text).is_ok();
        if !is_wat {
            bail!(
                "{} is not a WebAssembly module (no \\0asm header) nor WAT text",
                path.display()
            );
        }
        let wasm = wat::parse_bytes(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            .into_owned();
        Ok(Module::Bytes(wasm))
    }

    fn len(&self) -> u64 {
        match self {
            Module::File { len, .. } => *len,
            Module::Bytes(b) => b.len() as u64,
        }
    }

    fn reader(self) -> Box<dyn Read + Send> {
        match self {
            Module::File { file, .. } => Box::new(file),
            Module::Bytes(b) => Box::new(Cursor::new(b)),
        }
    }
}

/// Readers read one after the other.
struct Concat(VecDeque<Box<dyn Read + Send>>);

impl Read for Concat {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(front) = self.0.front_mut() {
            match front.read(buf)? {
                0 => {
                    self.0.pop_front();
                }
                n => return Ok(n),
            }
        }
        Ok(0)
    }
}

/// A multipart boundary that no part will contain by chance: 128 random
/// bits from the standard library's randomly keyed hasher.
fn boundary() -> String {
    let mut bits = [0u64; 2];
    for (i, b) in bits.iter_mut().enumerate() {
        let mut h = RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u32(std::process::id());
        *b = h.finish();
    }
    format!("tensor-wasm-{:016x}{:016x}", bits[0], bits[1])
}

/// A part of a multipart body: its headers' bytes, its content and length.
struct Part {
    name: &'static str,
    filename: Option<String>,
    content_type: &'static str,
    len: u64,
    reader: Box<dyn Read + Send>,
}

/// A streamed `multipart/form-data` body: content type, length, reader.
fn multipart(parts: Vec<Part>) -> (String, u64, Concat) {
    let boundary = boundary();
    let mut readers: VecDeque<Box<dyn Read + Send>> = VecDeque::new();
    let mut len = 0u64;
    for part in parts {
        let filename = part
            .filename
            .map(|f| format!("; filename=\"{}\"", f.replace(['"', '\r', '\n'], "_")))
            .unwrap_or_default();
        let head = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"{filename}\r\nContent-Type: {}\r\n\r\n",
            part.name, part.content_type
        );
        len += head.len() as u64 + part.len + 2;
        readers.push_back(Box::new(Cursor::new(head.into_bytes())));
        readers.push_back(part.reader);
        readers.push_back(Box::new(Cursor::new(b"\r\n".to_vec())));
    }
    let tail = format!("--{boundary}--\r\n");
    len += tail.len() as u64;
    readers.push_back(Box::new(Cursor::new(tail.into_bytes())));
    (
        format!("multipart/form-data; boundary={boundary}"),
        len,
        Concat(readers),
    )
}

/// `--config`: inline JSON or `@FILE`, checked against the API's fields.
fn config(arg: &str) -> anyhow::Result<Vec<u8>> {
    let text = match arg.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file).with_context(|| format!("--config {file}"))?,
        None => arg.to_string(),
    };
    let parsed: FunctionConfig = serde_json::from_str(&text).with_context(|| {
        "--config: expected JSON like {\"deadline_ms\": 2000, \"memory_limit_bytes\": 67108864, \"max_instances\": 4}"
    })?;
    Ok(serde_json::to_vec(&parsed)?)
}

fn file_name(path: &Path) -> Option<String> {
    path.file_name().map(|n| n.to_string_lossy().into_owned())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ep = args.conn.public()?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => args
            .wasm
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .context("cannot name the function after its file; pass --name")?,
    };
    let config = args.config.as_deref().map(config).transpose()?;
    let module = Module::open(&args.wasm)?;
    let label = format!("uploading {}", args.wasm.display());
    let body = if args.assets.is_none() && config.is_none() {
        Body::Stream {
            content_type: "application/wasm".into(),
            len: module.len(),
            reader: module.reader(),
            label,
        }
    } else {
        let mut parts = vec![Part {
            name: "module",
            filename: file_name(&args.wasm),
            content_type: "application/wasm",
            len: module.len(),
            reader: module.reader(),
        }];
        if let Some(path) = &args.assets {
            let file = File::open(path).with_context(|| format!("--assets {}", path.display()))?;
            let len = file
                .metadata()
                .with_context(|| format!("--assets {}", path.display()))?
                .len();
            parts.push(Part {
                name: "assets",
                filename: file_name(path),
                content_type: "application/octet-stream",
                len,
                reader: Box::new(file),
            });
        }
        if let Some(config) = config {
            parts.push(Part {
                name: "config",
                filename: None,
                content_type: "application/json",
                len: config.len() as u64,
                reader: Box::new(Cursor::new(config)),
            });
        }
        let (content_type, len, reader) = multipart(parts);
        Body::Stream {
            content_type,
            len,
            reader: Box::new(reader),
            label,
        }
    };
    let mut path = format!("/functions?name={}", encode(&name));
    if args.replace {
        path.push_str("&replace=true");
    }
    let info: FunctionInfo = ep.send_json("POST", &path, body)?;
    if args.json {
        output::print_json(&info)?;
    } else {
        output::print(&describe(&info))?;
    }
    Ok(())
}

/// A function record as `key value` lines.
pub fn describe(info: &FunctionInfo) -> String {
    let mut rows = vec![
        vec!["id".to_string(), info.id.to_string()],
        vec!["name".into(), info.name.clone()],
        vec!["sha256".into(), info.sha256.clone()],
        vec!["exports".into(), info.exports.join(", ")],
    ];
    if !info.assets.is_empty() {
        rows.push(vec!["assets".into(), info.assets.join(", ")]);
    }
    let c = &info.config;
    let mut settings = Vec::new();
    if let Some(ms) = c.deadline_ms {
        settings.push(format!("deadline {ms} ms"));
    }
    if let Some(b) = c.memory_limit_bytes {
        settings.push(format!("memory limit {}", output::bytes(b)));
    }
    if let Some(n) = c.max_instances {
        settings.push(format!("max instances {n}"));
    }
    if !settings.is_empty() {
        rows.push(vec!["config".into(), settings.join(", ")]);
    }
    rows.push(vec!["created".into(), info.created_at.clone()]);
    let mut out = String::new();
    let width = rows.iter().map(|r| r[0].len()).max().unwrap_or(0);
    for r in rows {
        out.push_str(&format!("{:width$}  {}\n", r[0], r[1]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_have_the_length_they_say() {
        let parts = vec![
            Part {
                name: "module",
                filename: Some("a\".wasm".into()),
                content_type: "application/wasm",
                len: 8,
                reader: Box::new(Cursor::new(b"\0asm\x01\0\0\0".to_vec())),
            },
            Part {
                name: "config",
                filename: None,
                content_type: "application/json",
                len: 2,
                reader: Box::new(Cursor::new(b"{}".to_vec())),
            },
        ];
        let (ct, len, mut reader) = multipart(parts);
        let mut body = Vec::new();
        reader.read_to_end(&mut body).unwrap();
        assert_eq!(body.len() as u64, len);
        let boundary = ct.split_once("boundary=").unwrap().1;
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with(&format!("--{boundary}\r\n")));
        assert!(text.ends_with(&format!("--{boundary}--\r\n")));
        assert!(text.contains("name=\"module\"; filename=\"a_.wasm\""));
        assert!(text.contains("name=\"config\"\r\nContent-Type: application/json\r\n\r\n{}\r\n"));
        assert_ne!(boundary, super::boundary());
    }

    #[test]
    fn configs_are_checked_before_sending() {
        assert_eq!(
            config(r#"{"deadline_ms": 5}"#).unwrap(),
            br#"{"deadline_ms":5}"#
        );
        let e = config(r#"{"deadline": 5}"#).unwrap_err();
        assert!(format!("{e:#}").contains("deadline_ms"), "{e:#}");
        assert!(config("@/nonexistent/config.json").is_err());
    }
}
