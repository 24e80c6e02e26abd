//! The `gguf-trace` binary: parse, dispatch, print errors as one line, exit codes.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;
use gguf_trace::cli::{Cli, Command};
use gguf_trace::{commands, llama};

fn main() -> ExitCode {
    let cli = Cli::parse();
    llama::backend::init();
    llama::backend::set_verbose(cli.verbose);
    // Ctrl-C: ask llama.cpp to abort the running decode (abort callback) and our loops to stop;
    // the partial run directory is removed, nothing that looks complete is left behind.
    let _ = ctrlc::set_handler(llama::backend::request_interrupt);

    let stdout = io::stdout();
    let mut out = stdout.lock();
    let result = match &cli.command {
        Command::Inspect(a) => commands::inspect::run(a, &mut out),
        Command::Trace(a) => commands::trace::run(a, &mut out),
        Command::Report(a) => commands::report::run(a, &mut out),
        Command::Quantize(a) => commands::quantize::run(a, &mut out),
        Command::Compare(a) => commands::compare::run(a, &mut out),
        Command::Direction(a) => commands::direction::run(a, &mut out),
    };
    let _ = out.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            if llama::backend::interrupted() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
