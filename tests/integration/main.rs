//! The one integration test binary: real models through real llama.cpp.
//!
//! Models come from `$GGUF_TRACE_MODELS` (default `~/.cache/gguf-trace/models`, where
//! `scripts/test` puts them). Without them a test fails: no test passes without measuring.

mod common;

mod arch_matrix;
mod attention;
mod attribution;
mod bad_input;
mod capture;
mod chat;
mod cli_trace;
mod components;
mod interventions;
mod lens;
mod quant;
mod real_size;
mod report;
mod report_scale;
mod resume;
mod rpc;
mod serve;
mod steering;
mod taps;
