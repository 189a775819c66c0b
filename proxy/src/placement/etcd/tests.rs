//! The etcd-backed table against a real etcd (the Debian `etcd-server`
//! package's `etcd`, started here on loopback ports).

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// An `etcd` of its own, in a temporary folder; killed when dropped.
struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    fn start() -> Etcd {
        let mut e = Etcd {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
        };
        e.run();
        e
    }

    /// Starts (or starts again) the server on its data folder and ports,
    /// and waits until it answers.
    fn run(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian package etcd-server) must be installed");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.client_port).parse().unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "etcd never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoints(&self) -> Vec<String> {
        vec![format!("127.0.0.1:{}", self.client_port)]
    }

    async fn proxy(&self) -> EtcdPlacements {
        EtcdPlacements::connect(&self.endpoints(), DEFAULT_PREFIX, None)
            .await
            .unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn candidates(ids: &[(&str, u16)]) -> Vec<Candidate> {
    ids.iter()
        .map(|(id, port)| Candidate {
            id: ExecutorId::new(*id).unwrap(),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        })
        .collect()
}

fn tenant(t: &str) -> TenantId {
    TenantId::new(t).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_placing_one_tenant_at_once_agree_on_one_executor() {
    let etcd = Etcd::start();
    let (a, b) = (etcd.proxy().await, etcd.proxy().await);
    // They see different executors, so alone they would choose apart.
    let seen_by_a = candidates(&[("cpu0", 1), ("cpu1", 2)]);
    let seen_by_b = candidates(&[("cpu2", 3)]);
    for i in 0..20 {
        let t = tenant(&format!("t{i}"));
        let (pa, pb) = tokio::join!(a.place(&t, &seen_by_a), b.place(&t, &seen_by_b));
        let (pa, pb) = (pa.unwrap(), pb.unwrap());
        assert_eq!(pa, pb, "{t}: one executor, one epoch");
        // Sticky: asked again with other executors, the answer stands.
        assert_eq!(a.place(&t, &seen_by_b).await.unwrap(), pa);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_proxy_writes_reaches_the_others_copy_by_the_watch() {
    let etcd = Etcd::start();
    let (a, b) = (etcd.proxy().await, etcd.proxy().await);
    let t = tenant("acme");
    let (home, epoch) = a.place(&t, &candidates(&[("cpu0", 1)])).await.unwrap();
    assert!(b.wait_for(a.written(), Duration::from_secs(10)).await);
    assert_eq!(b.get(&t), Some((home.clone(), epoch)), "from B's copy");
    // Epochs count from the time the table was made, in microseconds.
    let made = crate::placement::epoch_base();
    assert!(
        epoch < made && epoch > made - 600_000_000,
        "{epoch} vs {made}"
    );

    a.add_executor(&ExecutorId::new("cpu1").unwrap(), "127.0.0.1:2")
        .await
        .unwrap();
    a.set_draining(&home, true).await.unwrap();
    let mv = Move {
        from: home.clone(),
        to: ExecutorId::new("cpu1").unwrap(),
        snapshot: None,
        session: Some("s1".into()),
        mover: None,
        pausing: false,
        seal: None,
    };
    a.begin_move(&t, &mv).await.unwrap();
    assert!(b.wait_for(a.written(), Duration::from_secs(10)).await);
    let seen = b.state();
    assert_eq!(seen.moving.get("acme"), Some(&mv));
    assert!(seen.draining.contains(&home));
    assert_eq!(seen.executors["cpu1"], "127.0.0.1:2");
    // One move at a time, whichever proxy asks.
    assert!(matches!(
        b.begin_move(&t, &mv).await,
        Err(PlacementError::AlreadyMoving(_))
    ));

    assert_eq!(a.finish_move(&t).await.unwrap(), mv);
    assert!(b.wait_for(a.written(), Duration::from_secs(10)).await);
    let (now, moved_epoch) = b.get(&t).unwrap();
    assert_eq!(now.as_str(), "cpu1");
    assert!(moved_epoch > epoch, "a move is a new epoch");
    assert!(b.state().moving.is_empty());
    assert!(matches!(
        b.finish_move(&t).await,
        Err(PlacementError::NotMoving(_))
    ));

    // A proxy that starts later loads all of it.
    let c = etcd.proxy().await;
    assert_eq!(c.get(&t), Some((now, moved_epoch)));
    assert!(c.state().draining.contains(&home));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_serves_while_etcd_is_down_and_catches_up_after() {
    let mut etcd = Etcd::start();
    let (a, b) = (etcd.proxy().await, etcd.proxy().await);
    let t = tenant("acme");
    let placed = a.place(&t, &candidates(&[("cpu0", 1)])).await.unwrap();
    assert!(b.wait_for(a.written(), Duration::from_secs(10)).await);

    etcd.stop();
    // Placed tenants route from the copy; new placements are refused.
    assert_eq!(a.get(&t), Some(placed.clone()));
    let fresh = tenant("newcomer");
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        a.place(&fresh, &candidates(&[("cpu0", 1)])),
    )
    .await
    .expect("a refusal, not a hang");
    assert!(
        matches!(refused, Err(PlacementError::Store(_))),
        "{refused:?}"
    );

    etcd.run();
    // Once etcd is back, placing works again, and B's watcher, which broke,
    // catches up.
    let start = Instant::now();
    let again = loop {
        match a.place(&fresh, &candidates(&[("cpu0", 1)])).await {
            Ok(p) => break p,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(30), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(b.wait_for(a.written(), Duration::from_secs(30)).await);
    assert_eq!(b.get(&fresh), Some(again));
    assert_eq!(b.get(&t), Some(placed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_waits_for_every_live_proxy_and_a_dead_movers_move_is_taken_over_once() {
    let etcd = Etcd::start();
    let (a, b) = (etcd.proxy().await, etcd.proxy().await);
    a.join("pa").await.unwrap();
    b.join("pb").await.unwrap();
    let t = tenant("acme");
    let (home, _) = a.place(&t, &candidates(&[("cpu0", 1)])).await.unwrap();
    let mv = Move {
        from: home,
        to: ExecutorId::new("cpu1").unwrap(),
        snapshot: None,
        session: Some("s1".into()),
        mover: a.member(),
        pausing: false,
        seal: None,
    };
    a.begin_move(&t, &mv).await.unwrap();
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    b.follow_moves(tx);
    a.pause(&t).await.unwrap();
    // B's watch tells it the move pauses; A waits for B's report.
    loop {
        let (told, seen) = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(told, t);
        if seen.unwrap().pausing {
            break;
        }
    }
    assert!(b.wait_for(a.written(), Duration::from_secs(10)).await);
    assert_eq!(a.not_holding(&t), vec!["pb".to_string()]);
    b.hold(&t).await.unwrap();
    assert!(a.wait_for(b.written(), Duration::from_secs(10)).await);
    assert!(a.not_holding(&t).is_empty());
    assert!(b.orphaned_moves().is_empty(), "its mover is alive");

    // A dies: once its lease runs out, its move is B's to take over, and
    // only once.
    drop(a);
    let start = Instant::now();
    while b.orphaned_moves().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "never orphaned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = etcd.proxy().await;
    c.join("pc").await.unwrap();
    let taken = b.take_over(&t).await.unwrap();
    assert_eq!(taken.mover.as_deref(), Some("pb"));
    assert!(c.wait_for(b.written(), Duration::from_secs(10)).await);
    // A proxy whose view of the record is older cannot write it.
    assert!(c.take_over(&t).await.is_ok(), "C's copy is current");
    assert!(matches!(
        b.finish_move(&t).await,
        Err(PlacementError::NotMoving(_))
    ));
    // The one that holds it ends it; the reports go with the record.
    assert!(c.abort_move(&t).await.is_ok());
    assert!(b.wait_for(c.written(), Duration::from_secs(10)).await);
    assert!(b.state().moving.is_empty());
    assert!(b.not_holding(&t).contains(&"pc".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_table_is_imported_once_into_an_empty_etcd_keeping_every_tenant_where_it_was() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let mut file = crate::placement::Placements::load(&dir.path().join("placements.json")).unwrap();
    let (cpu0, cpu1) = (
        ExecutorId::new("cpu0").unwrap(),
        ExecutorId::new("cpu1").unwrap(),
    );
    file.add_executor(&cpu0, "127.0.0.1:7001").unwrap();
    file.add_executor(&cpu1, "127.0.0.1:7002").unwrap();
    // More tenants than one transaction writes; each where the file has
    // it, whatever the ring would say now.
    for i in 0..250 {
        let at = candidates(&[(if i % 3 == 0 { "cpu1" } else { "cpu0" }, 1)]);
        file.place(&tenant(&format!("t{i}")), &at).unwrap();
    }
    file.set_draining(&cpu1, true).unwrap();
    let newest = file.state().epochs.values().copied().max().unwrap();

    let a = etcd.proxy().await;
    assert_eq!(a.import(file.state()).await.unwrap(), Some(250));
    let b = etcd.proxy().await;
    for (copy, who) in [(a.state(), "importer"), (b.state(), "another proxy")] {
        assert_eq!(copy.placements, file.state().placements, "{who}");
        assert_eq!(copy.executors, file.state().executors, "{who}");
        assert_eq!(copy.draining, file.state().draining, "{who}");
    }
    // Epochs of the etcd table are above every epoch the file gave, so
    // executors take its routes as newer.
    let (_, epoch) = b.get(&tenant("t7")).unwrap();
    assert!(epoch > newest, "{epoch} > {newest}");

    // Once etcd holds tenants, nothing is imported again.
    let mut later = file.state().clone();
    later.placements.insert("t0".into(), cpu0.clone());
    assert_eq!(b.import(&later).await.unwrap(), None);
    assert_eq!(b.get(&tenant("t0")).unwrap().0, cpu1);

    // A table with a move in progress, or epochs not below etcd's, is
    // refused, and etcd is left as it was.
    let other = Etcd::start();
    let c = other.proxy().await;
    let mut moving = file.state().clone();
    file.begin_move(&tenant("t1"), &cpu1).unwrap();
    moving.moving = file.state().moving.clone();
    let e = c.import(&moving).await.unwrap_err().to_string();
    assert!(e.contains("move in progress"), "{e}");
    let mut ahead = file.state().clone();
    ahead.moving.clear();
    ahead.epochs.insert("t1".into(), i64::MAX - 1);
    let e = c.import(&ahead).await.unwrap_err().to_string();
    assert!(e.contains("epochs"), "{e}");
    assert!(c.state().placements.is_empty() && c.state().executors.is_empty());
}
