//! `tensor-wasm completions <shell>`: a completion script for bash, zsh,
//! fish, elvish or PowerShell, generated from the command line's own
//! definition so it never drifts from the flags.
//!
//! ```sh
//! tensor-wasm completions bash > ~/.local/share/bash-completion/completions/tensor-wasm
//! tensor-wasm completions zsh > "${fpath[1]}/_tensor-wasm"
//! ```

use clap_complete::Shell;

/// Flags of `tensor-wasm completions`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// bash, zsh, fish, elvish or powershell.
    shell: Shell,
}

pub fn run(args: Args, mut cli: clap::Command) -> anyhow::Result<()> {
    let name = cli.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cli, name, &mut script);
    super::output::print(&String::from_utf8_lossy(&script))?;
    Ok(())
}
