//! The llama.cpp boundary: the only module of the crate with `unsafe` code.
//!
//! A small safe layer over `llama-cpp-sys-2` (the safe `llama-cpp-2` crate no longer exposes the
//! eval callback and keeps its raw pointers private):
//! - [`backend`]: process-wide backend initialisation and log routing;
//! - [`model`]: a loaded model, its vocabulary, tokenizer and metadata;
//! - [`context`]: an inference context with the eval callback that captures the residual stream;
//! - [`gguf`]: reading GGUF metadata and tensors with the `gguf_*` API.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment. No Rust panic unwinds through a C callback:
//! each callback body runs inside `catch_unwind` and records failures for the caller.

pub mod backend;
pub mod context;
pub mod gguf;
pub mod lens;
pub mod model;
pub mod quantize;
pub mod rpc;

use std::ffi::CStr;
use std::os::raw::c_char;

/// The version of the `llama-cpp-sys-2` crate this build links (checked against Cargo.lock by a test).
pub const LLAMA_CPP_SYS_VERSION: &str = "0.1.161";

pub use llama_cpp_sys_2::llama_token as Token;

/// A path as the C string llama.cpp opens: its bytes exactly (a lossy conversion would open a
/// different file when the name is not UTF-8). `None` when the path holds a NUL byte.
pub(crate) fn c_path(path: &std::path::Path) -> Option<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).ok()
}

/// Copy a C string owned by llama.cpp into an owned `String` (lossy on invalid UTF-8).
///
/// Returns an empty string for a null pointer.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that stays valid and unmodified for the
/// duration of the call (llama.cpp/ggml's static strings and the strings they hand to callbacks).
unsafe fn c_str_to_string(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller guarantees a valid NUL-terminated string; we copy immediately.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Name of a ggml tensor type ("f32", "q4_K", ...), as ggml spells it.
pub fn ggml_type_name(t: u32) -> String {
    if t >= llama_cpp_sys_2::GGML_TYPE_COUNT {
        return format!("type{t}");
    }
    // SAFETY: ggml_type_name accepts any valid ggml_type (checked above) and returns a static
    // NUL-terminated string (or null for a removed type, which c_str_to_string handles).
    unsafe { c_str_to_string(llama_cpp_sys_2::ggml_type_name(t as _)) }
}

/// ggml's name of an op ("ADD", "RMS_NORM", ...).
pub fn ggml_op_name(op: u32) -> String {
    if op >= llama_cpp_sys_2::GGML_OP_COUNT {
        return format!("op{op}");
    }
    // SAFETY: ggml_op_name accepts any op below GGML_OP_COUNT (checked above) and returns a
    // static NUL-terminated string.
    unsafe { c_str_to_string(llama_cpp_sys_2::ggml_op_name(op as _)) }
}

/// llama.cpp's label of a file type number ("Q4_1", "Q4_K - Medium", ...).
pub fn ftype_name(ftype: u32) -> String {
    // SAFETY: llama_ftype_name returns a static NUL-terminated string for any value ("unknown"
    // when out of range).
    unsafe { c_str_to_string(llama_cpp_sys_2::llama_ftype_name(ftype as _)) }
}
