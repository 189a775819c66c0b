//! The control protocol of a running `tensor-wasm up`: its socket, its
//! requests and replies, the client that other commands use and the server
//! loop the supervisor runs.
//!
//! This module owns the wire format and nothing else: it knows no process,
//! so `upgrade` and the client commands depend on it alone. What a request
//! does is the supervisor's ([`super::supervisor`]), behind [`Handler`].
//!
//! The socket is `<state>/control.sock` (mode 0600). A client writes one
//! JSON [`Request`] per line, tagged by `op`:
//!
//! - `{"op":"ls"}`: the supervised children, as a list of [`ChildStatus`];
//! - `{"op":"start","id":…,"device":…,"cuda_visible_devices":…,"binary":…}`:
//!   start an executor and wait until it answers `/healthz`; its
//!   [`ChildStatus`];
//! - `{"op":"stop","id":…}`: stop an executor gracefully and forget it;
//!   [`Stopped`];
//! - `{"op":"upgrade_proxy","binary":…}`: hand each proxy's sockets to a
//!   new proxy binary, one proxy after the other; [`ProxyUpgraded`].
//!
//! Each request gets one JSON line back: `{"ok":true,"result":…}` with the
//! request's [`Reply`], or `{"error":"…","ok":false}` (an unknown `op`
//! included). Keys are written in sorted order, as scripts and
//! cli/tests/e2e/harness.rs have always read them.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The control socket of the fleet whose state directory is `state`.
pub fn socket_path(state: &Path) -> PathBuf {
    state.join("control.sock")
}

/// Binds the control socket at `sock`, replacing a stale one, readable and
/// writable by this user only; non-blocking, for [`serve`].
pub fn bind(sock: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(sock);
    let listener = std::os::unix::net::UnixListener::bind(sock)?;
    listener.set_nonblocking(true)?;
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// A control request, one JSON line tagged by `op`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The children and their pids.
    Ls,
    /// Start an executor (and wait until it answers); the caller registers
    /// it with the proxy.
    Start(StartExecutor),
    /// Stop an executor gracefully and forget it.
    Stop { id: String },
    /// Hand each proxy's sockets to a new proxy binary (`-u`, then SIGQUIT
    /// to the old one) and supervise the new ones.
    UpgradeProxy { binary: PathBuf },
}

/// The executor a `start` request asks for.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct StartExecutor {
    pub id: String,
    /// `cpu` (when absent) or `cuda`.
    #[serde(default)]
    pub device: Option<String>,
    /// A GPU or MIG slice UUID the executor is pinned to.
    #[serde(default)]
    pub cuda_visible_devices: Option<String>,
    /// The binary; the supervisor's own when absent.
    #[serde(default)]
    pub binary: Option<PathBuf>,
}

/// What a supervised child is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Executor,
    Proxy,
    /// The etcd of the proxies' shared placement table, when `up` runs it.
    Etcd,
}

/// A child as `ls` and `start` show it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ChildStatus {
    pub id: String,
    pub role: Role,
    /// `127.0.0.1:<port>` for an executor; a proxy's admin listener;
    /// etcd's client address.
    pub addr: String,
    /// None while the child is down.
    pub pid: Option<u32>,
    pub restarts: u32,
    /// `cpu` or `cuda` for an executor; empty for the others.
    pub device: String,
    #[serde(default)]
    pub cuda_visible_devices: Option<String>,
    pub binary: PathBuf,
}

/// The answer to `stop`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Stopped {
    pub id: String,
    /// Always true: a failed stop is an error answer.
    pub stopped: bool,
}

/// The answer to `upgrade_proxy`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ProxyUpgraded {
    /// The new (first) proxy's pid.
    pub pid: u32,
    /// Every new proxy's pid, in the proxies' order.
    #[serde(default)]
    pub pids: Vec<u32>,
}

/// The `result` of a successful answer, one shape per request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// To `ls`.
    Children(Vec<ChildStatus>),
    /// To `start`.
    Started(ChildStatus),
    /// To `stop`.
    Stopped(Stopped),
    /// To `upgrade_proxy`.
    ProxyUpgraded(ProxyUpgraded),
}

/// One answer line. The fields are in sorted order so that the line reads
/// as it did when it was built as a JSON map.
#[derive(Debug, Deserialize, Serialize)]
struct Answer<T> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    ok: bool,
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    result: Option<T>,
}

fn none<T>() -> Option<T> {
    None
}

/// Why a control request got no result.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no fleet supervisor at {}: start one with `tensor-wasm up`", sock.display())]
    NoSupervisor {
        sock: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad control answer: {0}")]
    BadAnswer(#[from] serde_json::Error),
    /// The supervisor refused or failed the request; its message.
    #[error("{0}")]
    Refused(String),
}

/// The supervised children of the fleet at `state`.
pub fn ls(state: &Path) -> Result<Vec<ChildStatus>, ControlError> {
    call(state, &Request::Ls)
}

/// Starts an executor under the supervisor and waits until it answers.
pub fn start(state: &Path, executor: StartExecutor) -> Result<ChildStatus, ControlError> {
    call(state, &Request::Start(executor))
}

/// Stops and forgets a supervised executor.
pub fn stop(state: &Path, id: &str) -> Result<Stopped, ControlError> {
    call(state, &Request::Stop { id: id.to_string() })
}

/// Hands the proxy's sockets to `binary`.
pub fn upgrade_proxy(state: &Path, binary: PathBuf) -> Result<ProxyUpgraded, ControlError> {
    call(state, &Request::UpgradeProxy { binary })
}

/// Sends one request and parses its answer as `T`.
fn call<T: DeserializeOwned>(state: &Path, request: &Request) -> Result<T, ControlError> {
    let sock = socket_path(state);
    let mut stream = std::os::unix::net::UnixStream::connect(&sock)
        .map_err(|source| ControlError::NoSupervisor { sock, source })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    std::io::BufReader::new(stream).read_line(&mut answer)?;
    parse_answer(&answer)
}

fn parse_answer<T: DeserializeOwned>(line: &str) -> Result<T, ControlError> {
    let answer: Answer<T> = serde_json::from_str(line)?;
    match (answer.ok, answer.result) {
        (true, Some(result)) => Ok(result),
        (true, None) => Err(ControlError::Refused("the answer has no result".into())),
        (false, _) => Err(ControlError::Refused(
            answer
                .error
                .unwrap_or_else(|| "control request failed".into()),
        )),
    }
}

/// What the server does with a request; it may block (it runs on a
/// blocking thread), and its error's chain becomes the answer's `error`.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> anyhow::Result<Reply>;
}

/// Answers every connection to `listener`, each request in turn, until the
/// task is dropped.
pub async fn serve<H: Handler>(listener: tokio::net::UnixListener, handler: Arc<H>) {
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                if let Err(e) = connection(handler, stream).await {
                    tracing::warn!(error = %e, "control request failed");
                }
            });
        }
    }
}

async fn connection<H: Handler>(
    handler: Arc<H>,
    stream: tokio::net::UnixStream,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let handler = handler.clone();
                tokio::task::spawn_blocking(move || handler.handle(request))
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")))
            }
            Err(e) => Err(anyhow::anyhow!("bad request: {e}")),
        };
        let mut out = encode(reply);
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
    }
    Ok(())
}

/// One answer line, without its newline.
fn encode(reply: anyhow::Result<Reply>) -> String {
    let answer = match reply {
        Ok(result) => Answer {
            error: None,
            ok: true,
            result: Some(result),
        },
        Err(e) => Answer {
            error: Some(format!("{e:#}")),
            ok: false,
            result: None,
        },
    };
    // Through a JSON map, so every object's keys come out sorted (the
    // result's too), as they always have.
    match serde_json::to_value(&answer) {
        Ok(v) => v.to_string(),
        Err(e) => {
            serde_json::json!({"error": format!("cannot encode the answer: {e}"), "ok": false})
                .to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child() -> ChildStatus {
        ChildStatus {
            id: "cpu0".into(),
            role: Role::Executor,
            addr: "127.0.0.1:7001".into(),
            pid: Some(42),
            restarts: 1,
            device: "cpu".into(),
            cuda_visible_devices: None,
            binary: "/bin/tw".into(),
        }
    }

    #[test]
    fn requests_are_tagged_by_op() {
        assert_eq!(
            serde_json::to_string(&Request::Ls).unwrap(),
            r#"{"op":"ls"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"start","id":"cpu9"}"#).unwrap(),
            Request::Start(StartExecutor {
                id: "cpu9".into(),
                device: None,
                cuda_visible_devices: None,
                binary: None,
            })
        );
        assert_eq!(
            serde_json::to_value(Request::Start(StartExecutor {
                id: "cpu9".into(),
                device: Some("cpu".into()),
                cuda_visible_devices: None,
                binary: None,
            }))
            .unwrap(),
            serde_json::json!({"op": "start", "id": "cpu9", "device": "cpu",
                "cuda_visible_devices": null, "binary": null})
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"upgrade_proxy","binary":"/b"}"#).unwrap(),
            Request::UpgradeProxy {
                binary: "/b".into()
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"nonsense"}"#).is_err());
    }

    #[test]
    fn answers_keep_their_bytes() {
        assert_eq!(
            encode(Ok(Reply::Stopped(Stopped {
                id: "cpu9".into(),
                stopped: true,
            }))),
            r#"{"ok":true,"result":{"id":"cpu9","stopped":true}}"#
        );
        assert_eq!(
            encode(Ok(Reply::ProxyUpgraded(ProxyUpgraded {
                pid: 7,
                pids: vec![7, 8]
            }))),
            r#"{"ok":true,"result":{"pid":7,"pids":[7,8]}}"#
        );
        assert_eq!(
            encode(Ok(Reply::Children(vec![child()]))),
            r#"{"ok":true,"result":[{"addr":"127.0.0.1:7001","binary":"/bin/tw","cuda_visible_devices":null,"device":"cpu","id":"cpu0","pid":42,"restarts":1,"role":"executor"}]}"#
        );
        assert_eq!(
            encode(Err(anyhow::anyhow!("executor cpu9 already runs"))),
            r#"{"error":"executor cpu9 already runs","ok":false}"#
        );
    }

    #[test]
    fn answers_parse_to_the_requested_type() {
        let line = encode(Ok(Reply::Started(child())));
        assert_eq!(parse_answer::<ChildStatus>(&line).unwrap(), child());
        let line = encode(Ok(Reply::Children(Vec::new())));
        assert!(parse_answer::<Vec<ChildStatus>>(&line).unwrap().is_empty());
        let line = encode(Err(anyhow::anyhow!("no executor cpu3")));
        match parse_answer::<Stopped>(&line) {
            Err(ControlError::Refused(m)) => assert_eq!(m, "no executor cpu3"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_answer::<Stopped>("not json"),
            Err(ControlError::BadAnswer(_))
        ));
    }

    struct Echo;

    impl Handler for Echo {
        fn handle(&self, request: Request) -> anyhow::Result<Reply> {
            match request {
                Request::Stop { id } => Ok(Reply::Stopped(Stopped { id, stopped: true })),
                other => anyhow::bail!("not here: {other:?}"),
            }
        }
    }

    #[test]
    fn client_and_server_agree() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().to_path_buf();
        let listener = bind(&socket_path(&state)).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = runtime.spawn(async move {
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            serve(listener, Arc::new(Echo)).await;
        });
        assert_eq!(
            stop(&state, "cpu1").unwrap(),
            Stopped {
                id: "cpu1".into(),
                stopped: true,
            }
        );
        match ls(&state) {
            Err(ControlError::Refused(m)) => assert!(m.starts_with("not here: Ls"), "{m}"),
            other => panic!("{other:?}"),
        }
        server.abort();
        drop(runtime);
        let gone = tempfile::tempdir().unwrap();
        assert!(matches!(
            ls(gone.path()),
            Err(ControlError::NoSupervisor { .. })
        ));
    }
}
