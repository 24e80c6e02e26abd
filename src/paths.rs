//! Paths that become text. On disk a path is an `OsStr` (any bytes but NUL on Unix) and gguf-trace
//! passes it that way to the filesystem and, byte for byte, to llama.cpp. run.json and messages are
//! text, so two rules decide what happens where a path meets them:
//!
//! - a path that run.json only *records* for people (the model file, the command line, the file a
//!   prompt came from) is written with [`recorded`]: UTF-8 as it is, any other byte as `\xNN`;
//! - a path that a later command *reads back* from run.json (a direction to ablate, a run to patch
//!   from, control vectors) must be UTF-8: [`read_back`] refuses it up front, before anything runs,
//!   with an error that says so.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A path or argument as text, losslessly: valid UTF-8 as it is, every other byte as `\xNN`.
pub fn recorded(s: &OsStr) -> String {
    let mut out = String::new();
    for chunk in s.as_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

/// Why a path run.json must read back cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{what} {shown}: the path is not valid UTF-8, and run.json records it as text for later commands to open; rename it, or link to it from a UTF-8 path (ln -s)")]
pub struct NotUtf8 {
    what: String,
    shown: String,
}

/// `p` as UTF-8 text for run.json, or a clear error naming `what` it is (`--ablate`, ...).
pub fn read_back<'a>(p: &'a Path, what: &str) -> Result<&'a str, NotUtf8> {
    p.to_str().ok_or_else(|| NotUtf8 {
        what: what.into(),
        shown: recorded(p.as_os_str()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn recorded_keeps_text_and_escapes_every_other_byte() {
        assert_eq!(
            recorded(OsStr::new("runs/ünïcode.gguf")),
            "runs/ünïcode.gguf"
        );
        let raw = OsString::from_vec(b"d\xfe/m\xff\xc3.gguf".to_vec());
        assert_eq!(recorded(&raw), "d\\xFE/m\\xFF\\xC3.gguf");
        assert!(read_back(Path::new(&raw), "--ablate").is_err());
        let e = read_back(Path::new(&raw), "--ablate")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--ablate d\\xFE/m\\xFF\\xC3.gguf: the path is not valid UTF-8"),
            "{e}"
        );
        assert_eq!(read_back(Path::new("a/b.gguf"), "x").unwrap(), "a/b.gguf");
    }
}
