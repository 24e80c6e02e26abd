//! The `gguf-trace` binary: parse, dispatch, print errors as one line, exit codes.

#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;
use gguf_trace::cli::{Cli, Command};
use gguf_trace::{commands, llama};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => usage_error(e),
    };
    llama::backend::init();
    llama::backend::set_verbose(cli.verbose);
    // Ctrl-C / SIGTERM: ask llama.cpp to abort the running decode (abort callback) and our loops
    // to stop; nothing that looks complete is left behind. (An RPC server just ends.)
    // If llama.cpp cannot be stopped (blocked on an RPC worker that never answers), a second signal
    // or 10 s end the process the hard way; its outputs stay staged, as after SIGKILL.
    if !matches!(cli.command, Command::RpcServer(_) | Command::Serve(_)) {
        let _ = ctrlc::set_handler(|| {
            if llama::backend::interrupted() {
                eprintln!("error: interrupted again: stopping now");
                llama::backend::exit_now(130);
            }
            llama::backend::request_interrupt();
            std::thread::spawn(|| {
                std::thread::sleep(std::time::Duration::from_secs(10));
                eprintln!(
                    "error: interrupted, and llama.cpp did not stop within 10 s: stopping now"
                );
                llama::backend::exit_now(130);
            });
        });
    }

    let stdout = io::stdout();
    let mut out = stdout.lock();
    let result = match &cli.command {
        Command::Inspect(a) => commands::inspect::run(a, &mut out),
        Command::Trace(a) => commands::trace::run(a, &mut out),
        Command::Report(a) => commands::report::run(a, &mut out),
        Command::Quantize(a) => commands::quantize::run(a, &mut out),
        Command::Compare(a) => commands::compare::run(a, &mut out),
        Command::Direction(a) => commands::direction::run(a, &mut out),
        Command::Patch(a) => commands::patch::run(a, &mut out),
        Command::RpcServer(a) => commands::rpc_server::run(a, &mut out),
        Command::Serve(a) => gguf_trace::serve::run(a, &mut out),
        Command::Generate(a) => commands::generate::run(a, &mut out),
    };
    let _ = out.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = one_line(&e);
            eprintln!("error: {msg}");
            if llama::backend::interrupted() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line, each cause once (a cause whose text the message
/// already holds is not repeated).
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let t = c.to_string().replace('\n', " ");
        if parts.iter().any(|p| p.contains(&t)) {
            continue;
        }
        parts.push(t);
    }
    parts.join(": ")
}

/// clap's usage errors as one `error:` line (help and version print as usual).
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let body = text.split("\nUsage:").next().unwrap_or(&text);
    let body = body.split("\nFor more information").next().unwrap_or(body);
    let line = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    // Point at the subcommand's own help when one was named.
    use clap::CommandFactory;
    let cmd = Cli::command();
    let sub = std::env::args_os()
        .skip(1)
        .filter_map(|a| a.into_string().ok())
        .find(|a| !a.starts_with('-'))
        .filter(|a| cmd.find_subcommand(a).is_some());
    match sub {
        Some(sub) => eprintln!("error: {line} (see gguf-trace {sub} --help)"),
        None => eprintln!("error: {line} (see gguf-trace --help)"),
    }
    std::process::exit(2);
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
