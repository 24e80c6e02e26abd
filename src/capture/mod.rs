//! Capturing the residual stream: architecture facts, the tracer, and plain decoding helpers.

pub mod arch;
pub mod engine;
pub mod plain;
pub mod taps;
