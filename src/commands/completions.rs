//! `kiln completions SHELL`: the one command that knows clap, since completions are generated from
//! the flag definitions in [`crate::cli`].

use clap_complete::Shell;

/// The completion script for `shell`.
pub fn completions(shell: Shell) -> Vec<u8> {
    use clap::CommandFactory;
    let mut cmd = crate::cli::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "kiln", &mut out);
    out
}
