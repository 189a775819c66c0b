//! `tensor-wasm migrate`: move a tenant, state and all, to another
//! executor (`POST /admin/tenants/{t}/migrate`). The call returns when the
//! move is done; the tenant's requests wait in the proxy meanwhile
//! (`ARCHITECTURE.md`, "Live migration"), so the pause printed is all its
//! clients saw.

use serde::{Deserialize, Serialize};
use serde_json::json;
use tensor_wasm_shared::TenantId;

use super::http::{Body, encode};
use super::{Conn, output};

/// Flags of `tensor-wasm migrate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The tenant to move.
    tenant: String,
    /// The executor to move it to.
    #[arg(long)]
    to: String,
    /// Print the move as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// One finished move, as the admin API reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub tenant: String,
    pub from: String,
    pub to: String,
    /// How long the tenant's requests were held, in ms.
    pub pause_ms: f64,
    /// Size of the snapshot that moved, in bytes.
    pub bytes: u64,
}

impl Move {
    /// One line: `acme: cpu0 -> cpu1, paused 3.2 ms, 10.5 KiB moved`.
    pub fn line(&self) -> String {
        if self.from == self.to {
            return format!("{} is already on {}; nothing moved", self.tenant, self.to);
        }
        format!(
            "{}: {} -> {}, paused {:.1} ms, {} moved",
            self.tenant,
            self.from,
            self.to,
            self.pause_ms,
            output::bytes(self.bytes)
        )
    }
}

/// A tenant id from the command line, checked before any request.
pub fn tenant(s: &str) -> anyhow::Result<TenantId> {
    TenantId::new(s).map_err(|e| anyhow::anyhow!("{s:?}: {e}"))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let tenant = tenant(&args.tenant)?;
    let ep = args.conn.admin()?;
    let moved: Move = ep.send_json(
        "POST",
        &format!("/admin/tenants/{}/migrate", encode(tenant.as_str())),
        Body::json(&json!({ "to": args.to })),
    )?;
    if args.json {
        output::print_json(&moved)?;
    } else {
        output::println(&moved.line())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_read_as_one_line() {
        let m = Move {
            tenant: "acme".into(),
            from: "cpu0".into(),
            to: "cpu1".into(),
            pause_ms: 3.24,
            bytes: 10_752,
        };
        assert_eq!(
            m.line(),
            "acme: cpu0 -> cpu1, paused 3.2 ms, 10.5 KiB moved"
        );
        let noop = Move {
            from: "cpu1".into(),
            ..m
        };
        assert!(noop.line().contains("already on cpu1"));
        assert!(tenant("Bad Tenant").is_err());
    }
}
