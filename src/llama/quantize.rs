//! Model quantization through llama.cpp's `llama_model_quantize`.
//!
//! llama.cpp reports progress and failures only in its log: the caller attaches a log observer
//! (see [`super::backend::set_log_observer`]) for the `[i/n]` lines, and a failure carries the last
//! error line of the log.

use std::path::Path;

use llama_cpp_sys_2 as sys;

use super::backend;

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("path contains a NUL byte: {0}")]
    NulInPath(String),
    #[error("llama.cpp could not quantize {src}{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Failed { src: String, reason: Option<String> },
}

/// Quantize `src` into `dst` as llama.cpp file type `ftype` (a `LLAMA_FTYPE_*` value).
/// `allow_requantize` must be set when the source is itself quantized.
pub fn quantize(
    src: &Path,
    dst: &Path,
    ftype: u32,
    threads: i32,
    allow_requantize: bool,
) -> Result<(), QuantizeError> {
    backend::init();
    let c = |p: &Path| {
        super::c_path(p).ok_or_else(|| QuantizeError::NulInPath(p.display().to_string()))
    };
    let (csrc, cdst) = (c(src)?, c(dst)?);
    // SAFETY: returns a plain struct of defaults (null pointers for imatrix/overrides).
    let mut params = unsafe { sys::llama_model_quantize_default_params() };
    params.nthread = threads;
    params.ftype = ftype as _;
    params.allow_requantize = allow_requantize;
    backend::clear_log();
    // SAFETY: both paths are NUL-terminated and live across the call; params is fully initialised
    // and its pointer members are the library defaults.
    let rc = unsafe { sys::llama_model_quantize(csrc.as_ptr(), cdst.as_ptr(), &params) };
    if rc != 0 {
        return Err(QuantizeError::Failed {
            src: src.display().to_string(),
            reason: backend::last_error_line(),
        });
    }
    Ok(())
}
