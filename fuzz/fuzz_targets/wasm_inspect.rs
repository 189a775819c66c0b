//! Registration's inspection and rewrite of a guest module
//! (`executor/src/wasm.rs`, `inspect`): any bytes, or — when the first
//! byte is odd — a valid module that wasm-smith builds from the rest with the
//! guest ABI's imports and exports available, so that the checks past the
//! parser are reached. A refusal is a typed error, never a panic; a module
//! accepted is rewritten into one that:
//! - validates with the allowed features and compiles on the executor's
//!   engine;
//! - keeps every section but the exports byte for byte, in order;
//! - exports the original names, then `__tw_global_<i>` for exactly the
//!   module's mutable globals, each a mutable global;
//! - is what the same bytes give again (the rewrite is a pure function), and
//!   passes the checks again: inspected itself, it is refused only for the
//!   reserved prefix of the exports the rewrite added, and without mutable
//!   globals it is its own rewrite.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use tensor_wasm_executor::config::EngineLimits;
use tensor_wasm_executor::engine::Runtime;
use tensor_wasm_executor::wasm::{
    self, ABI_IMPORTS, ABI_MODULE, GLOBAL_EXPORT_PREFIX, Inspected, WASI_MODULE, WasmError,
};
use wasmparser::{ExternalKind, Parser, Payload, Validator};

const MAX_MODULE_BYTES: usize = 1 << 20;

fn runtime() -> &'static Runtime {
    static R: OnceLock<Runtime> = OnceLock::new();
    R.get_or_init(|| {
        Runtime::new(
            EngineLimits {
                total_instances: 1,
                ..EngineLimits::default()
            },
            None,
        )
        .unwrap()
    })
}

/// A module importing every guest ABI function and a few of WASI's: what
/// wasm-smith may import.
fn available_imports() -> &'static [u8] {
    static M: OnceLock<Vec<u8>> = OnceLock::new();
    M.get_or_init(|| {
        let mut w = String::from("(module\n");
        for (name, sig) in ABI_IMPORTS {
            let params: Vec<&str> = sig
                .chars()
                .map(|c| if c == 'F' { "f32" } else { "i32" })
                .collect();
            w += &format!(
                "(import \"{ABI_MODULE}\" \"{name}\" (func (param {}) (result i32)))\n",
                params.join(" ")
            );
        }
        w += &format!(
            "(import \"{WASI_MODULE}\" \"fd_write\" (func (param i32 i32 i32 i32) (result i32)))\n\
             (import \"{WASI_MODULE}\" \"proc_exit\" (func (param i32)))\n)"
        );
        wat::parse_str(w).unwrap()
    })
}

/// The exports a guest needs, with an optional `init` and an optional
/// exported mutable global: what wasm-smith must export.
fn required_exports(init: bool, global: bool) -> Vec<u8> {
    let mut w = String::from(
        "(module (memory (export \"memory\") 1)\n\
         (func (export \"handle\") (result i32) (i32.const 0))\n",
    );
    if init {
        w += "(func (export \"init\") (result i32) (i32.const 0))\n";
    }
    if global {
        w += "(global (export \"g\") (mut i64) (i64.const 0))\n";
    }
    w += ")";
    wat::parse_str(w).unwrap()
}

/// A valid module that wasm-smith builds from `data`.
fn smith(data: &[u8]) -> Option<Vec<u8>> {
    let mut u = Unstructured::new(data);
    let shape: u8 = u.arbitrary().ok()?;
    let config = wasm_smith::Config {
        available_imports: Some(available_imports().to_vec()),
        exports: Some(required_exports(shape & 1 != 0, shape & 2 != 0)),
        max_memories: 1,
        min_memories: 1,
        memory64_enabled: false,
        threads_enabled: false,
        shared_everything_threads_enabled: false,
        gc_enabled: false,
        exceptions_enabled: false,
        custom_page_sizes_enabled: false,
        custom_descriptors_enabled: false,
        wide_arithmetic_enabled: false,
        // Table mutations are refused: only sometimes allow them.
        reference_types_enabled: shape & 4 != 0,
        // Non-minimal LEB128s: the rewrite copies sections byte for byte.
        min_uleb_size: if shape & 8 != 0 { 5 } else { 1 },
        max_globals: 20,
        min_globals: usize::from(shape >> 4),
        ..wasm_smith::Config::default()
    };
    wasm_smith::Module::new(config, &mut u)
        .ok()
        .map(|m| m.to_bytes())
}

/// The module's sections as (id, bytes), in order; the export section as
/// (id, empty) so that only its place is compared.
fn sections(wasm: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.expect("an accepted module parses");
        if let Some((id, range)) = payload.as_section() {
            let bytes = if matches!(payload, Payload::ExportSection(_)) {
                &[][..]
            } else {
                &wasm[range]
            };
            out.push((id, bytes));
        }
    }
    out
}

/// Export names and, for global exports, the global index; and the module's
/// mutable defined globals (imported globals are refused).
fn exports_and_mutable_globals(wasm: &[u8]) -> (Vec<(String, Option<u32>)>, Vec<u32>) {
    let (mut exports, mut mutable) = (Vec::new(), Vec::new());
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.unwrap() {
            Payload::ExportSection(r) => {
                for e in r {
                    let e = e.unwrap();
                    let global = (e.kind == ExternalKind::Global).then_some(e.index);
                    exports.push((e.name.to_string(), global));
                }
            }
            Payload::GlobalSection(r) => {
                for (i, g) in r.into_iter().enumerate() {
                    if g.unwrap().ty.mutable {
                        mutable.push(u32::try_from(i).unwrap());
                    }
                }
            }
            _ => {}
        }
    }
    (exports, mutable)
}

fn check_accepted(original: &[u8], info: &Inspected) {
    let rewritten = &info.rewritten;
    Validator::new_with_features(wasm::allowed_features())
        .validate_all(rewritten)
        .unwrap_or_else(|e| panic!("the rewritten module does not validate: {e}"));
    let module = wasmtime::Module::new(runtime().engine(), rewritten)
        .unwrap_or_else(|e| panic!("the engine refuses an accepted module: {e:#}"));

    // Every section but the exports is copied, in order.
    assert_eq!(sections(original), sections(rewritten), "sections changed");

    // The exports: the original ones, then one per mutable global.
    let (exports, mutable) = exports_and_mutable_globals(rewritten);
    assert_eq!(info.mutable_globals, mutable, "mutable globals reported");
    let mut want: Vec<String> = info.exports.clone();
    want.extend(mutable.iter().map(|g| format!("{GLOBAL_EXPORT_PREFIX}{g}")));
    let names: Vec<String> = exports.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, want, "export names");
    for g in &info.mutable_globals {
        let name = format!("{GLOBAL_EXPORT_PREFIX}{g}");
        assert!(
            exports.contains(&(name.clone(), Some(*g))),
            "{name} exports another index"
        );
        match module.get_export(&name) {
            Some(wasmtime::ExternType::Global(t)) => {
                assert_eq!(t.mutability(), wasmtime::Mutability::Var, "{name}")
            }
            other => panic!("{name} is {other:?}"),
        }
    }
    assert_eq!(info.has_init, info.exports.iter().any(|n| n == "init"));

    // A pure function of the bytes.
    assert_eq!(
        wasm::inspect(original, MAX_MODULE_BYTES).as_ref(),
        Ok(info),
        "inspect is not deterministic"
    );
    // The checks pass on the rewrite too.
    match wasm::inspect(rewritten, MAX_MODULE_BYTES) {
        Ok(again) => {
            assert!(
                info.mutable_globals.is_empty(),
                "the rewrite's reserved exports were accepted"
            );
            assert_eq!(&again, info, "without mutable globals, a fixpoint");
        }
        Err(WasmError::Invalid(msg))
            if !info.mutable_globals.is_empty() && msg.contains("reserved prefix") => {}
        Err(e) => panic!("the rewritten module is refused: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let module = match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => match smith(rest) {
            Some(m) => m,
            None => return,
        },
        _ => data.to_vec(),
    };
    // A small cap is a refusal, never a panic.
    let _ = wasm::inspect(&module, module.len() / 2);
    if let Ok(info) = wasm::inspect(&module, MAX_MODULE_BYTES) {
        check_accepted(&module, &info);
    }
});
