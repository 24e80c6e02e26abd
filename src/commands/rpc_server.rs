//! `gguf-trace rpc-server --host 127.0.0.1 --port 50052`: serve this machine's CPU backend over
//! llama.cpp's RPC protocol, so `trace --rpc HOST:PORT` elsewhere can run layers here.

use std::io::Write;

use anyhow::Result;

use crate::cli::RpcServerArgs;
use crate::llama::rpc;

pub fn run(args: &RpcServerArgs, out: &mut dyn Write) -> Result<()> {
    let threads = super::resolve_threads(args.threads)?;
    let loopback = matches!(args.host.as_str(), "127.0.0.1" | "localhost" | "::1");
    if !loopback {
        // llama.cpp's own rpc-server prints this warning too: the protocol has no authentication.
        eprintln!(
            "WARNING: Host ('{}') is != '127.0.0.1'\n         Never expose the RPC server to an open network!\n         This is an experimental feature and is not secure!",
            args.host
        );
    }
    let endpoint = if args.host.contains(':') {
        format!("[{}]:{}", args.host, args.port)
    } else {
        format!("{}:{}", args.host, args.port)
    };
    writeln!(
        out,
        "serving {endpoint} ({threads} threads); stop with Ctrl-C"
    )?;
    out.flush()?;
    rpc::serve(&endpoint, threads as usize)?;
    Ok(())
}
