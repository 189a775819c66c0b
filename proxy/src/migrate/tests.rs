//! The migration protocol of the module doc, step by step and branch by
//! branch, against in-memory executors ([`crate::upstream::scripted`]).
//!
//! Each test asserts where the tenant lives afterwards, which calls each
//! executor got in which order, and the error code an admin would see.
//! Moments inside a move are caught with holds (a call that waits for the
//! test), never with sleeps.

use futures::executor::block_on;

use super::*;
use crate::fleet::QueueLimits;
use crate::placement::Move;
use crate::upstream::ExecutorApi;
use crate::upstream::scripted::{Fault, Net, Op, Scripted, until};

const A: &str = "cpu0";
const B: &str = "cpu1";
const A_ADDR: &str = "127.0.0.1:7100";
const B_ADDR: &str = "127.0.0.1:7101";

fn t(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn x(s: &str) -> ExecutorId {
    ExecutorId::new(s).unwrap()
}

fn bytes(b: &'static [u8]) -> Bytes {
    Bytes::from_static(b)
}

/// Two scripted executors, A and B, and a proxy's fleet over them.
struct Setup {
    dir: tempfile::TempDir,
    net: Arc<Net>,
    a: Arc<Scripted>,
    b: Arc<Scripted>,
    fleet: Arc<Fleet>,
    orch: Arc<Orchestrator>,
    deadline: Duration,
}

impl Setup {
    fn new() -> Setup {
        Setup::with_deadline(Duration::from_secs(30))
    }

    /// With `deadline` for requests held at a gate and for the wait of
    /// step 2.
    fn with_deadline(deadline: Duration) -> Setup {
        Setup::build(deadline, false, false)
    }

    /// With executors of this release (pre-copy) or an older one.
    fn build(deadline: Duration, a_precopy: bool, b_precopy: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let net = Arc::new(Net::default());
        let add = |precopy: bool, id: &str, addr: &str| {
            if precopy {
                net.add_precopy(id, addr)
            } else {
                net.add(id, addr)
            }
        };
        let a = add(a_precopy, A, A_ADDR);
        let b = add(b_precopy, B, B_ADDR);
        let both = [(A.into(), A_ADDR.into()), (B.into(), B_ADDR.into())];
        let (fleet, orch) = Setup::proxy(dir.path(), &net, deadline, &both);
        Setup {
            dir,
            net,
            a,
            b,
            fleet,
            orch,
            deadline,
        }
    }

    /// A proxy's fleet and orchestrator; it registers the executors the
    /// state directory names, plus `extra`.
    fn proxy(
        dir: &Path,
        net: &Arc<Net>,
        deadline: Duration,
        extra: &[(String, String)],
    ) -> (Arc<Fleet>, Arc<Orchestrator>) {
        let fleet = Fleet::open_with(
            dir,
            "internal",
            net.clone(),
            QueueLimits {
                deadline,
                capacity: 8,
            },
            extra,
        );
        let fleet = Arc::new(block_on(fleet).unwrap());
        let orch = Arc::new(Orchestrator::new(
            fleet.clone(),
            Arc::new(ProxyMetrics::new(&[])),
        ));
        (fleet, orch)
    }

    /// Tenant `acme` placed on A, which holds it with state `state`.
    fn acme_on_a() -> Setup {
        let s = Setup::new();
        s.place("acme", A);
        s.a.hold_tenant("acme", b"state", &[]);
        s
    }

    /// `acme` on A, both executors of this release.
    fn precopy() -> Setup {
        let s = Setup::build(Duration::from_secs(30), true, true);
        s.place("acme", A);
        s.a.hold_tenant("acme", b"state", &[]);
        s
    }

    /// A new proxy process over the same state directory and executors.
    fn restart(&mut self) {
        let (fleet, orch) = Setup::proxy(self.dir.path(), &self.net, self.deadline, &[]);
        self.fleet = fleet;
        self.orch = orch;
    }

    fn place(&self, tenant: &str, on: &str) {
        let exec = self.fleet.executor(on).unwrap();
        let only = [Candidate {
            id: x(on),
            addr: exec.sock,
        }];
        block_on(self.fleet.table().place(&t(tenant), &only)).unwrap();
    }

    fn home(&self, tenant: &str) -> Option<String> {
        self.fleet.table().get(&t(tenant)).map(|e| e.to_string())
    }

    fn recorded(&self, tenant: &str) -> Option<Move> {
        self.fleet.table().moving(&t(tenant))
    }

    fn stored(&self, tenant: &str) -> PathBuf {
        self.dir
            .path()
            .join("moves")
            .join(format!("{tenant}.twsnap"))
    }

    /// The calls made since the last look, in order.
    fn calls(&self) -> Vec<String> {
        self.net.take_calls()
    }

    fn spawn_migrate(
        &self,
        tenant: &'static str,
        to: &'static str,
    ) -> tokio::task::JoinHandle<Result<MoveReport, MigrateError>> {
        let orch = self.orch.clone();
        tokio::spawn(async move { orch.migrate(tenant, to).await })
    }

    /// A request of `tenant`, routed once its gate lets it: the executor
    /// it goes to.
    fn spawn_request(&self, tenant: &'static str) -> tokio::task::JoinHandle<String> {
        let fleet = self.fleet.clone();
        tokio::spawn(async move {
            fleet
                .route(&t(tenant))
                .await
                .unwrap()
                .executor
                .id
                .to_string()
        })
    }

    /// Records "`tenant` moving A→B", with its exported `snapshot` stored
    /// when given, as a proxy that died mid-move leaves it.
    fn record_move(&self, tenant: &str, snapshot: Option<&[u8]>) {
        block_on(self.fleet.table().begin_move(&t(tenant), &x(B), None)).unwrap();
        if let Some(bytes) = snapshot {
            let path = self.stored(tenant);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
            block_on(self.fleet.table().record_snapshot(&t(tenant), path, None)).unwrap();
        }
    }
}

fn code(e: &MigrateError) -> ErrorCode {
    e.api_error().code
}

fn calls(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn no_executor_to_move_to_is_unavailable_not_internal() {
    let e = MigrateError::Placement(PlacementError::NoExecutor).api_error();
    assert_eq!(e.code, ErrorCode::ExecutorUnavailable);
    let e = MigrateError::Placement(PlacementError::Unplaced("t".into())).api_error();
    assert_eq!(e.code, ErrorCode::Internal);
}

// ---- The steps of a move -------------------------------------------------

#[tokio::test]
async fn step0_the_destination_precompiles_the_modules_while_the_tenant_runs() {
    let s = Setup::new();
    s.place("acme", A);
    s.a.hold_tenant("acme", b"state", &[("f1", b"wasm1"), ("f2", b"wasm2")]);
    let precompile = s.b.hold(Op::Precompile);
    let mv = s.spawn_migrate("acme", B);
    until("B precompiles", || precompile.reached()).await;
    // Nothing recorded, gate open: requests still reach A.
    assert_eq!(s.recorded("acme"), None);
    assert!(!s.fleet.gate_closed("acme"));
    assert_eq!(
        s.fleet
            .route(&t("acme"))
            .await
            .unwrap()
            .executor
            .id
            .as_str(),
        A
    );
    precompile.release();
    let r = mv.await.unwrap().unwrap();
    assert_eq!((r.from.as_str(), r.to.as_str(), r.bytes), (A, B, 5));
    assert_eq!(s.b.precompiled(), [bytes(b"wasm1"), bytes(b"wasm2")]);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu0 modules acme",
            "cpu0 module acme f1",
            "cpu1 precompile",
            "cpu0 module acme f2",
            "cpu1 precompile",
            "cpu0 export acme",
            "cpu1 import acme",
            "cpu0 drop acme",
        ])
    );
    assert_eq!(s.home("acme").as_deref(), Some(B));
}

#[tokio::test]
async fn step0_is_best_effort_a_failed_prewarm_does_not_stop_the_move() {
    let s = Setup::new();
    s.place("acme", A);
    s.a.hold_tenant("acme", b"state", &[("f1", b"wasm1"), ("f2", b"wasm2")]);
    s.a.fail_once(Op::Module, Fault::Answer(ErrorCode::Internal));
    s.b.fail(Op::Precompile, Fault::Unreachable);
    let r = s.orch.migrate("acme", B).await.unwrap();
    assert_eq!(r.bytes, 5);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu0 modules acme",
            "cpu0 module acme f1",
            "cpu0 module acme f2",
            "cpu1 precompile",
            "cpu0 export acme",
            "cpu1 import acme",
            "cpu0 drop acme",
        ])
    );
    assert_eq!(s.home("acme").as_deref(), Some(B));

    // No module list at all: straight to the export.
    s.b.hold_tenant("beta", b"beta", &[]);
    s.place("beta", B);
    s.b.fail(Op::Modules, Fault::Answer(ErrorCode::Internal));
    s.orch.migrate("beta", A).await.unwrap();
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu1 outbound beta",
            "cpu1 modules beta",
            "cpu1 export beta",
            "cpu0 import beta",
            "cpu1 drop beta",
        ])
    );
    assert_eq!(s.home("beta").as_deref(), Some(A));
}

#[tokio::test]
async fn step1_the_move_is_recorded_and_the_gate_closed_before_the_export() {
    let s = Setup::acme_on_a();
    let export = s.a.hold(Op::Export);
    let mv = s.spawn_migrate("acme", B);
    until("A exports", || export.reached()).await;
    assert_eq!(
        s.recorded("acme"),
        Some(Move {
            from: x(A),
            to: x(B),
            snapshot: None,
            session: None,
            mover: None,
            pausing: false,
            seal: None,
        })
    );
    assert_eq!(s.home("acme").as_deref(), Some(A));
    assert!(s.fleet.gate_closed("acme"));
    // A request of the moving tenant waits at the gate; others do not.
    let waiting = s.spawn_request("acme");
    until("the request waits", || {
        s.fleet.gate_counts("acme") == (0, 1)
    })
    .await;
    s.b.hold_tenant("other", b"", &[]);
    s.place("other", B);
    assert_eq!(
        s.fleet
            .route(&t("other"))
            .await
            .unwrap()
            .executor
            .id
            .as_str(),
        B
    );
    export.release();
    mv.await.unwrap().unwrap();
    // The held request goes where the tenant now lives.
    assert_eq!(waiting.await.unwrap(), B);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu0 modules acme",
            "cpu0 export acme",
            "cpu1 import acme",
            "cpu0 drop acme",
        ])
    );
}

#[tokio::test]
async fn step2_the_export_waits_for_requests_in_flight() {
    let s = Setup::acme_on_a();
    let in_flight = s.fleet.route(&t("acme")).await.unwrap();
    let mv = s.spawn_migrate("acme", B);
    until("the gate closes", || s.fleet.gate_closed("acme")).await;
    until("the move waits", || s.recorded("acme").is_some()).await;
    assert_eq!(
        s.calls(),
        calls(&["cpu0 outbound acme", "cpu0 modules acme"])
    );
    assert_eq!(s.fleet.gate_counts("acme"), (1, 0));
    drop(in_flight);
    mv.await.unwrap().unwrap();
    assert_eq!(
        s.calls(),
        calls(&["cpu0 export acme", "cpu1 import acme", "cpu0 drop acme"])
    );
    assert_eq!(s.home("acme").as_deref(), Some(B));
}

#[tokio::test]
async fn step2_requests_in_flight_past_the_deadline_abort_the_move() {
    let s = Setup::with_deadline(Duration::from_millis(100));
    s.place("acme", A);
    s.a.hold_tenant("acme", b"state", &[]);
    let in_flight = s.fleet.route(&t("acme")).await.unwrap();
    let e = s.orch.migrate("acme", B).await.unwrap_err();
    assert!(matches!(e, MigrateError::Busy(..)), "{e}");
    assert_eq!(code(&e), ErrorCode::DeadlineExceeded);
    assert_eq!(
        s.calls(),
        calls(&["cpu0 outbound acme", "cpu0 modules acme"])
    );
    assert_eq!(s.home("acme").as_deref(), Some(A));
    assert_eq!(s.recorded("acme"), None);
    assert!(!s.fleet.gate_closed("acme"));
    assert!(!s.a.tenant("acme").unwrap().frozen);
    drop(in_flight);
}

#[tokio::test]
async fn step3_the_export_is_stored_and_recorded_before_the_import() {
    let s = Setup::acme_on_a();
    let import = s.b.hold(Op::Import);
    let mv = s.spawn_migrate("acme", B);
    until("B imports", || import.reached()).await;
    let path = s.stored("acme");
    assert_eq!(s.recorded("acme").unwrap().snapshot, Some(path.clone()));
    assert_eq!(std::fs::read(&path).unwrap(), b"state");
    assert!(s.a.tenant("acme").unwrap().frozen);
    assert_eq!(s.home("acme").as_deref(), Some(A));
    import.release();
    assert_eq!(mv.await.unwrap().unwrap().bytes, 5);
    // Done: the stored bytes are gone.
    assert!(!path.exists());
}

#[tokio::test]
async fn step4_the_destination_imports_the_exported_state() {
    let s = Setup::acme_on_a();
    s.orch.migrate("acme", B).await.unwrap();
    let on_b = s.b.tenant("acme").unwrap();
    assert_eq!(on_b.state, bytes(b"state"));
    assert!(!on_b.frozen);
    assert!(s.a.tenant("acme").is_none());
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu0 modules acme",
            "cpu0 export acme",
            "cpu1 import acme",
            "cpu0 drop acme",
        ])
    );
}

#[tokio::test]
async fn step5_the_placement_flips_and_the_gate_opens_before_the_source_drops() {
    let s = Setup::acme_on_a();
    let drop_on_a = s.a.hold(Op::Drop);
    let mv = s.spawn_migrate("acme", B);
    until("A drops", || drop_on_a.reached()).await;
    assert_eq!(s.home("acme").as_deref(), Some(B));
    assert_eq!(s.recorded("acme"), None);
    assert!(!s.fleet.gate_closed("acme"));
    assert_eq!(
        s.fleet
            .route(&t("acme"))
            .await
            .unwrap()
            .executor
            .id
            .as_str(),
        B
    );
    drop_on_a.release();
    mv.await.unwrap().unwrap();
    assert!(s.a.tenant("acme").is_none());
    assert!(!s.stored("acme").exists());
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu0 modules acme",
            "cpu0 export acme",
            "cpu1 import acme",
            "cpu0 drop acme",
        ])
    );
}

#[tokio::test]
async fn a_move_to_where_the_tenant_is_calls_nothing() {
    let s = Setup::acme_on_a();
    let r = s.orch.migrate("acme", A).await.unwrap();
    assert_eq!((r.from.as_str(), r.to.as_str(), r.bytes), (A, A, 0));
    assert_eq!(s.calls(), Vec::<String>::new());
    let e = s.orch.migrate("nobody", B).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::NotFound);
    let e = s.orch.migrate("acme", "cpu9").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::NotFound);
    assert_eq!(s.calls(), Vec::<String>::new());
}

// ---- Failures of a move --------------------------------------------------

/// The tenant stayed on A, thawed, with nothing of the move left.
fn assert_stayed_on_a(s: &Setup) {
    assert_eq!(s.home("acme").as_deref(), Some(A));
    assert_eq!(s.recorded("acme"), None);
    assert!(!s.fleet.gate_closed("acme"));
    assert!(!s.stored("acme").exists());
    assert!(s.b.tenant("acme").is_none());
}

#[tokio::test]
async fn an_export_that_fails_thaws_the_source_and_keeps_the_tenant() {
    let s = Setup::acme_on_a();
    s.a.fail(Op::Export, Fault::Answer(ErrorCode::Internal));
    let e = s.orch.migrate("acme", B).await.unwrap_err();
    assert!(matches!(e, MigrateError::ExportFailed(..)), "{e}");
    assert_eq!(code(&e), ErrorCode::ExecutorUnavailable);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu0 modules acme",
            "cpu0 export acme",
            "cpu0 thaw acme"
        ])
    );
    assert_stayed_on_a(&s);
    assert!(!s.a.tenant("acme").unwrap().frozen);
}

#[tokio::test]
async fn tenant_not_here_on_export_moves_an_empty_tenant() {
    // Placed on A, but A never saw it: nothing to carry.
    let s = Setup::new();
    s.place("acme", A);
    let r = s.orch.migrate("acme", B).await.unwrap();
    assert_eq!(r.bytes, 0);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu0 modules acme",
            "cpu0 export acme"
        ])
    );
    assert_eq!(s.home("acme").as_deref(), Some(B));
    assert_eq!(s.recorded("acme"), None);
    assert!(!s.stored("acme").exists());
}

#[tokio::test]
async fn not_found_on_export_is_a_failed_export_not_an_empty_tenant() {
    // An executor without the export route: the tenant is there, only the
    // call is not. Moving it empty would lose its state.
    let s = Setup::acme_on_a();
    s.a.fail(Op::Export, Fault::Answer(ErrorCode::NotFound));
    let e = s.orch.migrate("acme", B).await.unwrap_err();
    match &e {
        MigrateError::ExportFailed(id, up) => {
            assert_eq!(id.as_str(), A);
            assert_eq!(up.code(), Some(ErrorCode::NotFound));
        }
        e => panic!("{e}"),
    }
    assert_eq!(code(&e), ErrorCode::ExecutorUnavailable);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu0 modules acme",
            "cpu0 export acme",
            "cpu0 thaw acme"
        ])
    );
    assert_stayed_on_a(&s);
    assert_eq!(s.a.tenant("acme").unwrap().state, bytes(b"state"));
}

#[tokio::test]
async fn an_import_refused_thaws_the_source_and_keeps_the_tenant() {
    let s = Setup::acme_on_a();
    s.b.fail(Op::Import, Fault::Answer(ErrorCode::InvalidInput));
    let e = s.orch.migrate("acme", B).await.unwrap_err();
    assert!(matches!(e, MigrateError::ImportFailed(..)), "{e}");
    assert_eq!(code(&e), ErrorCode::ImportFailed);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu0 modules acme",
            "cpu0 export acme",
            "cpu1 import acme",
            "cpu0 thaw acme",
        ])
    );
    assert_stayed_on_a(&s);
    let on_a = s.a.tenant("acme").unwrap();
    assert!(!on_a.frozen);
    assert_eq!(on_a.state, bytes(b"state"));
}

#[tokio::test]
async fn an_import_refused_with_a_source_that_does_not_thaw_stays_recorded() {
    let s = Setup::acme_on_a();
    s.b.fail(Op::Import, Fault::Answer(ErrorCode::Internal));
    s.a.fail(Op::Thaw, Fault::Unreachable);
    let e = s.orch.migrate("acme", B).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::ImportFailed);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu0 modules acme",
            "cpu0 export acme",
            "cpu1 import acme",
            "cpu0 thaw acme",
        ])
    );
    // Recovery finishes or undoes it from the record and the bytes.
    let path = s.stored("acme");
    assert_eq!(s.recorded("acme").unwrap().snapshot, Some(path.clone()));
    assert_eq!(std::fs::read(&path).unwrap(), b"state");
    assert_eq!(s.home("acme").as_deref(), Some(A));
}

#[tokio::test]
async fn an_unreachable_source_fails_the_move_and_keeps_the_tenant() {
    let s = Setup::acme_on_a();
    s.a.set_down(true);
    let e = s.orch.migrate("acme", B).await.unwrap_err();
    assert!(matches!(e, MigrateError::ExportFailed(..)), "{e}");
    assert_eq!(code(&e), ErrorCode::ExecutorUnavailable);
    // The first call fails: nothing was recorded, frozen or moved.
    assert_eq!(s.calls(), calls(&["cpu0 outbound acme"]));
    assert_stayed_on_a(&s);
}

#[tokio::test]
async fn an_unreachable_destination_fails_the_move_and_the_source_thaws() {
    let s = Setup::acme_on_a();
    s.b.set_down(true);
    let e = s.orch.migrate("acme", B).await.unwrap_err();
    assert!(matches!(e, MigrateError::ImportFailed(..)), "{e}");
    assert_eq!(code(&e), ErrorCode::ImportFailed);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu0 modules acme",
            "cpu0 export acme",
            "cpu1 import acme",
            "cpu0 thaw acme",
        ])
    );
    assert_stayed_on_a(&s);
    assert!(!s.a.tenant("acme").unwrap().frozen);
}

#[tokio::test]
async fn an_unhealthy_destination_is_refused_before_any_call() {
    let s = Setup::acme_on_a();
    s.fleet.executor(B).unwrap().set_healthy(false);
    let e = s.orch.migrate("acme", B).await.unwrap_err();
    assert!(matches!(e, MigrateError::ExecutorDown(_)), "{e}");
    assert_eq!(code(&e), ErrorCode::ExecutorUnavailable);
    assert_eq!(s.calls(), Vec::<String>::new());
    assert_stayed_on_a(&s);
}

#[tokio::test]
async fn a_failed_drop_on_the_source_after_the_flip_still_moves_the_tenant() {
    let s = Setup::acme_on_a();
    s.a.fail(Op::Drop, Fault::Answer(ErrorCode::Internal));
    let r = s.orch.migrate("acme", B).await.unwrap();
    assert_eq!(r.bytes, 5);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu0 modules acme",
            "cpu0 export acme",
            "cpu1 import acme",
            "cpu0 drop acme",
        ])
    );
    assert_eq!(s.home("acme").as_deref(), Some(B));
    assert_eq!(s.recorded("acme"), None);
    assert!(!s.stored("acme").exists());
    // The leftover copy on A stays frozen, so it serves nothing.
    assert!(s.a.tenant("acme").unwrap().frozen);
}

// ---- A recorded move found at start-up -----------------------------------

/// Freezes `acme` on `exec`, as the export of a move did.
async fn freeze(s: &Setup, exec: &Scripted) {
    exec.export(&t("acme")).await.unwrap();
    s.calls();
}

/// Restarts the proxy and holds its recorded moves: one, gate closed.
fn restart_holding(s: &mut Setup) {
    s.restart();
    assert_eq!(s.orch.hold_recorded_moves(), 1);
    assert!(s.fleet.gate_closed("acme"));
}

#[tokio::test]
async fn recovery_of_a_move_without_stored_bytes_thaws_the_source() {
    let mut s = Setup::acme_on_a();
    freeze(&s, &s.a).await;
    s.record_move("acme", None);
    restart_holding(&mut s);
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 0);
    assert_eq!(s.calls(), calls(&["cpu0 thaw acme"]));
    assert_stayed_on_a(&s);
    assert!(!s.a.tenant("acme").unwrap().frozen);
}

#[tokio::test]
async fn recovery_of_a_move_without_stored_bytes_waits_for_its_source() {
    let mut s = Setup::acme_on_a();
    freeze(&s, &s.a).await;
    s.record_move("acme", None);
    restart_holding(&mut s);
    s.a.set_down(true);
    s.orch.recover().await;
    // Still held, gate closed, record kept: tried again next tick.
    assert_eq!(s.orch.held_moves().await, 1);
    assert!(s.fleet.gate_closed("acme"));
    assert!(s.recorded("acme").is_some());
    s.a.set_down(false);
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 0);
    assert_eq!(s.calls(), calls(&["cpu0 thaw acme", "cpu0 thaw acme"]));
    assert_stayed_on_a(&s);
    assert!(!s.a.tenant("acme").unwrap().frozen);
}

#[tokio::test]
async fn recovery_of_a_move_without_stored_bytes_from_a_forgotten_source_forgets_it() {
    let mut s = Setup::acme_on_a();
    s.record_move("acme", None);
    s.fleet.forget(A).await.unwrap();
    restart_holding(&mut s);
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 0);
    assert_eq!(s.calls(), Vec::<String>::new());
    assert_eq!(s.recorded("acme"), None);
    assert!(!s.fleet.gate_closed("acme"));
}

#[tokio::test]
async fn recovery_of_a_move_whose_stored_bytes_are_gone_thaws_the_source() {
    let mut s = Setup::acme_on_a();
    freeze(&s, &s.a).await;
    s.record_move("acme", Some(b"state"));
    std::fs::remove_file(s.stored("acme")).unwrap();
    restart_holding(&mut s);
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 0);
    assert_eq!(s.calls(), calls(&["cpu0 thaw acme"]));
    assert_stayed_on_a(&s);
}

#[tokio::test]
async fn recovery_of_a_move_with_stored_bytes_imports_them_and_drops_the_source() {
    let mut s = Setup::acme_on_a();
    freeze(&s, &s.a).await;
    s.record_move("acme", Some(b"state"));
    restart_holding(&mut s);
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 0);
    assert_eq!(
        s.calls(),
        calls(&["cpu1 info", "cpu1 import acme", "cpu0 drop acme"])
    );
    assert_eq!(s.home("acme").as_deref(), Some(B));
    assert_eq!(s.recorded("acme"), None);
    assert!(!s.fleet.gate_closed("acme"));
    assert!(!s.stored("acme").exists());
    assert_eq!(s.b.tenant("acme").unwrap().state, bytes(b"state"));
    assert!(s.a.tenant("acme").is_none());
}

#[tokio::test]
async fn recovery_of_a_move_the_destination_imported_already_skips_the_import() {
    let mut s = Setup::acme_on_a();
    freeze(&s, &s.a).await;
    s.record_move("acme", Some(b"state"));
    s.b.hold_tenant("acme", b"state", &[]);
    restart_holding(&mut s);
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 0);
    assert_eq!(s.calls(), calls(&["cpu1 info", "cpu0 drop acme"]));
    assert_eq!(s.home("acme").as_deref(), Some(B));
    assert_eq!(s.recorded("acme"), None);
    assert!(!s.stored("acme").exists());
}

#[tokio::test]
async fn recovery_of_a_move_with_stored_bytes_waits_for_its_destination() {
    let mut s = Setup::acme_on_a();
    freeze(&s, &s.a).await;
    s.record_move("acme", Some(b"state"));
    restart_holding(&mut s);
    s.b.set_down(true);
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 1);
    assert!(s.fleet.gate_closed("acme"));
    assert_eq!(s.calls(), calls(&["cpu1 info"]));
    assert!(s.recorded("acme").is_some());
    assert!(s.stored("acme").exists());
    assert_eq!(s.home("acme").as_deref(), Some(A));
    s.b.set_down(false);
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 0);
    assert_eq!(
        s.calls(),
        calls(&["cpu1 info", "cpu1 import acme", "cpu0 drop acme"])
    );
    assert_eq!(s.home("acme").as_deref(), Some(B));
}

#[tokio::test]
async fn recovery_of_a_move_the_destination_refuses_keeps_the_tenant_on_its_source() {
    let mut s = Setup::acme_on_a();
    freeze(&s, &s.a).await;
    s.record_move("acme", Some(b"state"));
    s.b.fail(Op::Import, Fault::Answer(ErrorCode::InvalidInput));
    restart_holding(&mut s);
    let held = s.orch.take_held().await;
    let e = s
        .orch
        .recover_one(&held[0].tenant, &held[0].mv)
        .await
        .unwrap_err();
    assert!(matches!(e, MigrateError::ImportFailed(..)), "{e}");
    assert_eq!(code(&e), ErrorCode::ImportFailed);
    drop(held);
    assert_eq!(
        s.calls(),
        calls(&["cpu1 info", "cpu1 import acme", "cpu0 thaw acme"])
    );
    assert_stayed_on_a(&s);
    assert!(!s.a.tenant("acme").unwrap().frozen);
}

#[tokio::test]
async fn recovery_after_the_source_died_resumes_the_tenant_on_its_destination() {
    let mut s = Setup::acme_on_a();
    s.record_move("acme", Some(b"state"));
    s.a.set_down(true);
    restart_holding(&mut s);
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 0);
    assert_eq!(
        s.calls(),
        calls(&["cpu1 info", "cpu1 import acme", "cpu0 drop acme"])
    );
    assert_eq!(s.home("acme").as_deref(), Some(B));
    assert_eq!(s.recorded("acme"), None);
    assert!(!s.stored("acme").exists());
    assert_eq!(s.b.tenant("acme").unwrap().state, bytes(b"state"));
}

// ---- Snapshot, restore, purge ---------------------------------------------

#[tokio::test]
async fn a_snapshot_exports_then_thaws_in_place() {
    let s = Setup::acme_on_a();
    assert_eq!(s.orch.snapshot("acme").await.unwrap(), bytes(b"state"));
    assert_eq!(s.calls(), calls(&["cpu0 export acme", "cpu0 thaw acme"]));
    assert!(!s.a.tenant("acme").unwrap().frozen);
    assert!(!s.fleet.gate_closed("acme"));
}

#[tokio::test]
async fn restore_replaces_the_state_of_a_placed_tenant() {
    let s = Setup::acme_on_a();
    let on = s.orch.restore("acme", bytes(b"new")).await.unwrap();
    assert_eq!(on.as_str(), A);
    // One step on the executor: the tenant is never dropped first.
    assert_eq!(s.calls(), calls(&["cpu0 restore acme"]));
    assert_eq!(s.a.tenant("acme").unwrap().state, bytes(b"new"));
    assert_eq!(s.home("acme").as_deref(), Some(A));
    assert!(!s.fleet.gate_closed("acme"));
}

#[tokio::test]
async fn restore_places_a_new_tenant_and_imports_it() {
    let s = Setup::new();
    let on = s.orch.restore("fresh", bytes(b"new")).await.unwrap();
    assert_eq!(s.home("fresh"), Some(on.to_string()));
    assert_eq!(s.calls(), [format!("{on} restore fresh")]);
    let exec = if on.as_str() == A { &s.a } else { &s.b };
    assert_eq!(exec.tenant("fresh").unwrap().state, bytes(b"new"));
}

#[tokio::test]
async fn restore_refused_leaves_the_state_as_it_was() {
    let s = Setup::acme_on_a();
    s.a.fail_once(Op::Restore, Fault::Answer(ErrorCode::InvalidInput));
    let e = s.orch.restore("acme", bytes(b"bad")).await.unwrap_err();
    assert!(matches!(e, MigrateError::SnapshotRefused(..)), "{e}");
    assert_eq!(code(&e), ErrorCode::InvalidInput);
    assert_eq!(s.calls(), calls(&["cpu0 restore acme"]));
    assert_eq!(s.a.tenant("acme").unwrap().state, bytes(b"state"));
    assert_eq!(s.home("acme").as_deref(), Some(A));
    assert!(!s.fleet.gate_closed("acme"));
}

#[tokio::test]
async fn restore_failing_otherwise_is_an_import_failure() {
    let s = Setup::acme_on_a();
    s.a.fail_once(Op::Restore, Fault::Answer(ErrorCode::Internal));
    let e = s.orch.restore("acme", bytes(b"new")).await.unwrap_err();
    assert!(matches!(e, MigrateError::ImportFailed(..)), "{e}");
    assert_eq!(code(&e), ErrorCode::ImportFailed);
    assert_eq!(s.calls(), calls(&["cpu0 restore acme"]));
    assert_eq!(s.a.tenant("acme").unwrap().state, bytes(b"state"));
}

#[tokio::test]
async fn restore_of_a_new_tenant_refused_leaves_it_unplaced() {
    let s = Setup::new();
    s.a.fail(Op::Restore, Fault::Answer(ErrorCode::InvalidInput));
    s.b.fail(Op::Restore, Fault::Answer(ErrorCode::InvalidInput));
    let e = s.orch.restore("fresh", bytes(b"bad")).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::InvalidInput);
    let seen = s.calls();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].ends_with(" restore fresh"));
    assert_eq!(s.home("fresh"), None);
    assert!(!s.fleet.gate_closed("fresh"));
}

/// An executor of the older release answers `tenant_exists` to a restore
/// of a tenant it holds: it is restored by saving, dropping, importing.
fn older(s: &Setup) {
    s.a.fail(Op::Restore, Fault::Answer(ErrorCode::TenantExists));
}

#[tokio::test]
async fn an_older_executor_is_restored_by_saving_dropping_and_importing() {
    let s = Setup::acme_on_a();
    older(&s);
    s.orch.restore("acme", bytes(b"new")).await.unwrap();
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 restore acme",
            "cpu0 export acme",
            "cpu0 drop acme",
            "cpu0 import acme"
        ])
    );
    assert_eq!(s.a.tenant("acme").unwrap().state, bytes(b"new"));
    assert!(!s.fleet.gate_closed("acme"));
}

#[tokio::test]
async fn an_older_executor_refusing_the_snapshot_gets_the_previous_state_back() {
    let s = Setup::acme_on_a();
    older(&s);
    s.a.fail_once(Op::Import, Fault::Answer(ErrorCode::InvalidInput));
    let e = s.orch.restore("acme", bytes(b"bad")).await.unwrap_err();
    assert!(matches!(e, MigrateError::SnapshotRefused(..)), "{e}");
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 restore acme",
            "cpu0 export acme",
            "cpu0 drop acme",
            "cpu0 import acme",
            "cpu0 import acme",
        ])
    );
    assert_eq!(s.a.tenant("acme").unwrap().state, bytes(b"state"));
    assert_eq!(s.home("acme").as_deref(), Some(A));
    assert!(!s.fleet.gate_closed("acme"));
}

#[tokio::test]
async fn an_older_executor_without_export_changes_nothing() {
    // Not "no previous state": the executor lacks the route.
    let s = Setup::acme_on_a();
    older(&s);
    s.a.fail(Op::Export, Fault::Answer(ErrorCode::NotFound));
    let e = s.orch.restore("acme", bytes(b"new")).await.unwrap_err();
    assert!(matches!(e, MigrateError::Executor(..)), "{e}");
    assert_eq!(code(&e), ErrorCode::NotFound);
    assert_eq!(s.calls(), calls(&["cpu0 restore acme", "cpu0 export acme"]));
    assert_eq!(s.a.tenant("acme").unwrap().state, bytes(b"state"));
    assert!(!s.fleet.gate_closed("acme"));
}

#[tokio::test]
async fn restore_on_an_unreachable_executor_is_unavailable() {
    let s = Setup::acme_on_a();
    s.a.set_down(true);
    let e = s.orch.restore("acme", bytes(b"new")).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::ExecutorUnavailable);
    assert_eq!(s.calls(), calls(&["cpu0 restore acme"]));
    assert_eq!(s.home("acme").as_deref(), Some(A));
}

#[tokio::test]
async fn purge_drops_the_tenant_and_forgets_its_placement() {
    let s = Setup::acme_on_a();
    s.orch.purge("acme").await.unwrap();
    assert_eq!(s.calls(), calls(&["cpu0 drop acme"]));
    assert!(s.a.tenant("acme").is_none());
    assert_eq!(s.home("acme"), None);
    assert!(!s.fleet.gate_closed("acme"));
}

#[tokio::test]
async fn purge_of_a_tenant_its_executor_never_saw_forgets_it() {
    let s = Setup::new();
    s.place("acme", A);
    s.orch.purge("acme").await.unwrap();
    assert_eq!(s.calls(), calls(&["cpu0 drop acme"]));
    assert_eq!(s.home("acme"), None);
}

#[tokio::test]
async fn purge_refused_or_unreachable_keeps_the_placement() {
    let s = Setup::acme_on_a();
    s.a.fail_once(Op::Drop, Fault::Answer(ErrorCode::NotFound));
    let e = s.orch.purge("acme").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::NotFound);
    assert_eq!(s.home("acme").as_deref(), Some(A));
    s.a.set_down(true);
    let e = s.orch.purge("acme").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::ExecutorUnavailable);
    assert_eq!(s.home("acme").as_deref(), Some(A));
    assert_eq!(s.calls(), calls(&["cpu0 drop acme", "cpu0 drop acme"]));
    assert!(s.a.tenant("acme").is_some());
    assert!(!s.fleet.gate_closed("acme"));
}

#[tokio::test]
async fn purge_of_an_unknown_tenant_calls_nothing() {
    let s = Setup::new();
    let e = s.orch.purge("nobody").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::NotFound);
    assert_eq!(s.calls(), Vec::<String>::new());
}

// ---- Pre-copy ---------------------------------------------------------------

const SESSION: &str = "s-cpu0-acme";

#[tokio::test]
async fn precopy_step1_and_2_the_session_is_recorded_and_the_tenant_runs_while_it_is_pulled() {
    let s = Setup::precopy();
    let pull = s.b.hold(Op::Pull);
    let mv = s.spawn_migrate("acme", B);
    until("B pulls", || pull.reached()).await;
    assert_eq!(
        s.recorded("acme"),
        Some(Move {
            from: x(A),
            to: x(B),
            snapshot: None,
            session: Some(SESSION.into()),
            mover: None,
            pausing: false,
            seal: None,
        })
    );
    // The gate stays open: requests of acme go to A meanwhile.
    assert!(!s.fleet.gate_closed("acme"));
    let r = s.fleet.route(&t("acme")).await.unwrap();
    assert_eq!(r.executor.id.as_str(), A);
    drop(r);
    pull.release();
    let report = mv.await.unwrap().unwrap();
    assert_eq!(report.protocol, Protocol::PreCopy);
    assert_eq!(report.precopy_bytes, 5, "the pull copied the state");
    assert_eq!(report.pause_bytes, 5, "the final round");
}

#[tokio::test]
async fn precopy_step3_to_5_the_gate_closes_for_the_commit_and_opens_at_the_destination() {
    let s = Setup::precopy();
    let commit = s.b.hold(Op::Commit);
    let mv = s.spawn_migrate("acme", B);
    until("B commits", || commit.reached()).await;
    assert!(s.fleet.gate_closed("acme"));
    assert_eq!(s.home("acme").as_deref(), Some(A));
    // A request now waits at the gate, then goes to B.
    let fleet = s.fleet.clone();
    let waiting = tokio::spawn(async move {
        let r = fleet.route(&t("acme")).await.unwrap();
        r.executor.id.to_string()
    });
    until("the request waits", || s.fleet.gate_counts("acme").1 == 1).await;
    commit.release();
    mv.await.unwrap().unwrap();
    assert_eq!(waiting.await.unwrap(), B);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu1 pull acme",
            "cpu1 commit acme",
            "cpu0 drop acme",
        ])
    );
    assert_eq!(s.home("acme").as_deref(), Some(B));
    assert_eq!(s.recorded("acme"), None);
    assert!(s.a.tenant("acme").is_none(), "A dropped its copy");
    assert!(s.a.sessions().is_empty());
    assert_eq!(s.b.tenant("acme").unwrap().state, bytes(b"state"));
}

#[tokio::test]
async fn precopy_a_failed_pull_is_undone_and_the_tenant_stays() {
    let s = Setup::precopy();
    s.b.fail_once(Op::Pull, Fault::Answer(ErrorCode::CapacityExhausted));
    let e = s.orch.migrate("acme", B).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::ImportFailed);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu1 pull acme",
            "cpu1 discard acme",
            &format!("cpu0 end-outbound {SESSION}"),
        ])
    );
    assert_stayed_on_a(&s);
    assert!(s.a.sessions().is_empty(), "the session ended");
    assert!(!s.a.tenant("acme").unwrap().frozen);
}

#[tokio::test]
async fn precopy_a_destination_of_an_older_release_gets_the_tenant_by_stop_and_copy() {
    let s = Setup::build(Duration::from_secs(30), true, false);
    s.place("acme", A);
    s.a.hold_tenant("acme", b"state", &[]);
    let report = s.orch.migrate("acme", B).await.unwrap();
    assert_eq!(report.protocol, Protocol::StopAndCopy);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu1 pull acme",
            "cpu1 discard acme",
            &format!("cpu0 end-outbound {SESSION}"),
            "cpu0 modules acme",
            "cpu0 export acme",
            "cpu1 import acme",
            "cpu0 drop acme",
        ])
    );
    assert_eq!(s.home("acme").as_deref(), Some(B));
}

#[tokio::test]
async fn precopy_a_failed_commit_the_destination_did_not_publish_is_undone() {
    let s = Setup::precopy();
    s.b.fail_once(Op::Commit, Fault::Answer(ErrorCode::Internal));
    let e = s.orch.migrate("acme", B).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::ImportFailed);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu0 outbound acme",
            "cpu1 pull acme",
            "cpu1 commit acme",
            "cpu1 discard acme",
            "cpu1 info",
            &format!("cpu0 end-outbound {SESSION}"),
        ])
    );
    assert_stayed_on_a(&s);
    assert!(s.b.staged().is_empty());
}

#[tokio::test]
async fn precopy_a_commit_whose_outcome_is_unknown_is_held_for_recovery() {
    let s = Setup::precopy();
    let commit = s.b.hold(Op::Commit);
    let mv = s.spawn_migrate("acme", B);
    until("B commits", || commit.reached()).await;
    // B goes away with the commit's answer: did it publish acme?
    s.b.set_down(true);
    commit.release();
    let e = mv.await.unwrap().unwrap_err();
    assert_eq!(code(&e), ErrorCode::ImportFailed);
    assert_eq!(s.orch.held_moves().await, 1);
    assert!(
        s.fleet.gate_closed("acme"),
        "no request reaches either copy"
    );
    assert!(s.recorded("acme").is_some());
    // Recovery asks again at each tick until B answers.
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 1);
    s.b.set_down(false);
    s.calls();
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 0);
    // B never committed (its commit failed before it began): undone.
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu1 discard acme",
            "cpu1 info",
            &format!("cpu0 end-outbound {SESSION}"),
        ])
    );
    assert_stayed_on_a(&s);
}

/// Starts a session on A and a pull on B, as steps 1 and 2 did, and
/// records the move.
async fn precopy_recorded(s: &Setup) {
    let session = s.a.start_outbound(&t("acme")).await.unwrap();
    s.b.pull(&t("acme"), A_ADDR, &session).await.unwrap();
    s.fleet
        .table()
        .begin_move(&t("acme"), &x(B), Some(session))
        .await
        .unwrap();
    s.calls();
}

#[tokio::test]
async fn precopy_recovery_undoes_a_move_the_destination_did_not_commit() {
    let mut s = Setup::precopy();
    precopy_recorded(&s).await;
    restart_holding(&mut s);
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 0);
    assert_eq!(
        s.calls(),
        calls(&[
            "cpu1 discard acme",
            "cpu1 info",
            &format!("cpu0 end-outbound {SESSION}"),
        ])
    );
    assert_stayed_on_a(&s);
    assert!(s.b.staged().is_empty());
}

#[tokio::test]
async fn precopy_recovery_finishes_a_move_the_destination_committed() {
    let mut s = Setup::precopy();
    precopy_recorded(&s).await;
    // The proxy died after B committed, before it recorded the end.
    s.b.commit(&t("acme")).await.unwrap();
    assert!(s.a.tenant("acme").unwrap().frozen);
    restart_holding(&mut s);
    s.calls();
    s.orch.recover().await;
    assert_eq!(s.orch.held_moves().await, 0);
    assert_eq!(s.calls(), calls(&["cpu1 discard acme", "cpu0 drop acme"]));
    assert_eq!(s.home("acme").as_deref(), Some(B));
    assert_eq!(s.recorded("acme"), None);
    assert!(!s.fleet.gate_closed("acme"));
    assert!(s.a.tenant("acme").is_none());
}

#[tokio::test]
async fn precopy_recovery_with_a_destination_that_restarted_after_its_commit_finishes() {
    let mut s = Setup::precopy();
    precopy_recorded(&s).await;
    s.b.commit(&t("acme")).await.unwrap();
    // A restart forgets the inbound move; the tenant is served there.
    s.b.forget_inbound();
    restart_holding(&mut s);
    s.calls();
    s.orch.recover().await;
    assert_eq!(
        s.calls(),
        calls(&["cpu1 discard acme", "cpu1 info", "cpu0 drop acme"])
    );
    assert_eq!(s.home("acme").as_deref(), Some(B));
}
