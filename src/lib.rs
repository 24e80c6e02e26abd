//! gguf-trace: capture the residual stream of GGUF models through llama.cpp, write it as a run
//! directory, and analyse and report it. See ARCHITECTURE in the README for a map of the modules.

pub mod analysis;
pub mod capture;
pub mod chat;
pub mod cli;
pub mod commands;
pub mod cvec;
pub mod llama;
pub mod model_hash;
pub mod model_info;
pub mod output;
pub mod prompts;
pub mod quant;
pub mod report;
pub mod run;
pub mod settings;
