//! `gguf-trace generate KIND`: shell completions and the man page, generated from the clap
//! definitions (so they never drift from `--help`), written to stdout.

use std::io::Write;

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{Cli, GenerateArgs, GenerateKind};

pub fn run(args: &GenerateArgs, out: &mut dyn Write) -> Result<()> {
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_string();
    let shell = match args.kind {
        GenerateKind::Man => {
            clap_mangen::Man::new(cmd).render(out)?;
            return Ok(());
        }
        GenerateKind::CompleteBash => clap_complete::Shell::Bash,
        GenerateKind::CompleteZsh => clap_complete::Shell::Zsh,
        GenerateKind::CompleteFish => clap_complete::Shell::Fish,
        GenerateKind::CompletePowershell => clap_complete::Shell::PowerShell,
    };
    clap_complete::generate(shell, &mut cmd, name, out);
    Ok(())
}
