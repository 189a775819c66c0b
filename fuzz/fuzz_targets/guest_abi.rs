//! Random sequences of guest ABI calls with random arguments, made by a
//! guest that interprets the request body as a program: each 28-byte record
//! is `[op u8, pad ×3, a b c d e: i32, f: f32]` and calls import `op % 29`
//! with those arguments. Whatever the calls, the host answers with codes,
//! traps or deadlines, never a panic or a host crash.
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tensor_wasm_executor::config::EngineLimits;
use tensor_wasm_executor::engine::Runtime;
use tensor_wasm_executor::host::HostState;
use tensor_wasm_executor::instance::{InstanceSetup, Request, WarmInstance};
use tensor_wasm_executor::logs::FunctionLog;
use tensor_wasm_executor::metrics::Metrics;
use tensor_wasm_executor::tensors::TenantUsage;
use tensor_wasm_executor::wasm::{self, ABI_IMPORTS};
use tensor_wasm_kernels::{Backend, CpuBackend, DType, Limits};
use wasmtime::InstancePre;

/// Bytes per program record.
const RECORD: usize = 28;
/// Where the program is copied in guest memory; below it is scratch space
/// that small pointer arguments land in.
const PROGRAM_AT: usize = 0x1000;

fn interpreter() -> String {
    let n = ABI_IMPORTS.len();
    let mut w = String::from("(module\n");
    for (i, (name, sig)) in ABI_IMPORTS.iter().enumerate() {
        let params: Vec<&str> = sig
            .chars()
            .map(|c| if c == 'F' { "f32" } else { "i32" })
            .collect();
        w += &format!(
            "(import \"tensor\" \"{name}\" (func $f{i} (param {}) (result i32)))\n",
            params.join(" ")
        );
    }
    w += "(memory (export \"memory\") 2)\n";
    w += "(func (export \"handle\") (result i32) (local $p i32) (local $end i32)\n";
    w += &format!("(local.set $p (i32.const {PROGRAM_AT}))\n");
    w += &format!(
        "(local.set $end (i32.add (i32.const {PROGRAM_AT}) (call $f{} (i32.const 0) (i32.const {PROGRAM_AT}) (i32.const 61440))))\n",
        ABI_IMPORTS
            .iter()
            .position(|(n, _)| *n == "input_read")
            .unwrap()
    );
    w += "(block $exit (loop $next\n";
    w += &format!(
        "(br_if $exit (i32.gt_u (i32.add (local.get $p) (i32.const {RECORD})) (local.get $end)))\n"
    );
    w += "(block $done\n";
    for i in (0..n).rev() {
        w += &format!("(block $c{i}\n");
    }
    let targets: Vec<String> = (0..n).map(|i| format!("$c{i}")).collect();
    w += &format!(
        "(br_table {} (i32.rem_u (i32.load8_u (local.get $p)) (i32.const {n}))))\n",
        targets.join(" ")
    );
    for (i, (_, sig)) in ABI_IMPORTS.iter().enumerate() {
        let args: Vec<String> = sig
            .chars()
            .enumerate()
            .map(|(j, c)| {
                if c == 'F' {
                    "(f32.load offset=24 (local.get $p))".to_string()
                } else {
                    format!("(i32.load offset={} (local.get $p))", 4 + 4 * j)
                }
            })
            .collect();
        w += &format!("(drop (call $f{i} {})) (br $done))\n", args.join(" "));
    }
    w += &format!("(local.set $p (i32.add (local.get $p) (i32.const {RECORD})))\n(br $next)))\n");
    w += "(i32.const 0)))\n";
    w
}

struct Fixture {
    _runtime: Runtime,
    pre: InstancePre<HostState>,
    setup: InstanceSetup,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let runtime = Runtime::new(
            EngineLimits {
                total_instances: 4,
                ..EngineLimits::default()
            },
            None,
        )
        .unwrap();
        let info = wasm::inspect(&wat::parse_str(interpreter()).unwrap(), 1 << 20).unwrap();
        let module = runtime.compile(&info.rewritten).unwrap();
        let pre = runtime.linker().instantiate_pre(&module).unwrap();
        let backend = Arc::new(CpuBackend::new(Limits {
            max_rank: 8,
            max_tensor_bytes: 1 << 20,
            max_op_work: 1 << 22,
        }));
        let mut assets = HashMap::new();
        assets.insert("w".to_string(), backend.zeros(DType::F32, &[4, 4]).unwrap());
        let setup = InstanceSetup {
            backend,
            assets: Arc::new(assets),
            usage: Arc::new(TenantUsage::new(64 << 20, 4096)),
            log: FunctionLog::new(1024),
            metrics: Arc::new(Metrics::new("cpu", &[("component", "fuzz")])),
            memory_limit: 1 << 20,
            max_output_bytes: 1 << 16,
            max_error_message: 256,
            max_table_elements: 100,
        };
        Fixture {
            _runtime: runtime,
            pre,
            setup,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Ok(mut inst) = WarmInstance::create(&f.pre, &f.setup, true, Duration::from_secs(2)) else {
        return;
    };
    let mut inputs = HashMap::new();
    inputs.insert(
        "x".to_string(),
        f.setup.backend.zeros(DType::F32, &[2, 2]).unwrap(),
    );
    let request = Request {
        inputs,
        body: Arc::from(data),
    };
    let _ = inst.invoke(request, Duration::from_secs(2), None);
    drop(inst);
    // Every tensor the program made was released with its instance.
    assert_eq!(f.setup.usage.tensors(), 0);
});
