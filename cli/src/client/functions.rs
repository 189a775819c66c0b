//! `tensor-wasm functions`: list, show and delete the tenant's functions,
//! and read their captured guest output.

use clap::Subcommand;
use tensor_wasm_shared::api::{FunctionInfo, FunctionList};

use super::http::{Body, encode};
use super::{Conn, deploy, output};

/// Flags of `tensor-wasm functions`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the tenant's functions.
    Ls {
        /// Print `{"functions": [...]}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one function.
    Get {
        id: String,
        /// Print the record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a function, its instances and its assets.
    Rm { id: String },
    /// Print what the function's guest wrote to stdout and stderr, newest
    /// last.
    Logs { id: String },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ep = args.conn.public()?;
    match args.command {
        Command::Ls { json } => {
            let list: FunctionList = ep.get_json("/functions")?;
            if json {
                return Ok(output::print_json(&list)?);
            }
            if list.functions.is_empty() {
                eprintln!("no functions yet; register one with `tensor-wasm deploy <file.wasm>`");
            }
            let rows: Vec<Vec<String>> = list.functions.iter().map(row).collect();
            output::print(&output::table(
                &["ID", "NAME", "EXPORTS", "ASSETS", "CREATED"],
                &rows,
            ))?;
        }
        Command::Get { id, json } => {
            let info: FunctionInfo = ep.get_json(&format!("/functions/{}", encode(&id)))?;
            if json {
                output::print_json(&info)?;
            } else {
                output::print(&deploy::describe(&info))?;
            }
        }
        Command::Rm { id } => {
            ep.call(
                "DELETE",
                &format!("/functions/{}", encode(&id)),
                &[],
                Body::None,
            )?;
            output::println(&format!("deleted {id}"))?;
        }
        Command::Logs { id } => {
            let reply = ep.call(
                "GET",
                &format!("/functions/{}/logs", encode(&id)),
                &[],
                Body::None,
            )?;
            output::print(&String::from_utf8_lossy(&reply.body))?;
        }
    }
    Ok(())
}

fn row(f: &FunctionInfo) -> Vec<String> {
    let assets = if f.assets.is_empty() {
        "-".to_string()
    } else {
        f.assets.len().to_string()
    };
    vec![
        f.id.to_string(),
        f.name.clone(),
        f.exports.join(","),
        assets,
        f.created_at.clone(),
    ]
}
