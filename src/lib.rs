//! gguf-trace: capture the residual stream of GGUF models through llama.cpp, write it as a run
//! directory, and analyse and report it. See ARCHITECTURE in the README for a map of the modules.
//!
//! Unsafe code lives only in [`llama`], the boundary with llama.cpp and OpenBLAS: the rest of the
//! crate is compiled with `unsafe_code` denied, and every unsafe block must carry a `// SAFETY:`
//! comment (clippy's `undocumented_unsafe_blocks`, denied in CI with the other warnings).

#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod analysis;
pub mod answer;
pub mod capture;
pub mod chat;
pub mod cli;
pub mod commands;
pub mod cvec;
#[allow(unsafe_code)]
pub mod llama;
pub mod model_hash;
pub mod model_info;
pub mod output;
pub mod paths;
pub mod prompts;
pub mod quant;
pub mod report;
pub mod run;
pub mod serve;
pub mod settings;
