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

/// What a path that is not a regular file or directory is ("a character device", ...), for
/// errors: `/dev/zero` is a device, not "an empty file".
pub fn special_kind(t: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_fifo() {
        Some("a pipe")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        None
    }
}

/// Largest JSON file gguf-trace reads back (run.json, compare.json, journals): far above any run
/// it writes, and a bound on what a damaged or hostile file can make it allocate.
pub const MAX_JSON: u64 = 1 << 30;

/// Read a file of at most `limit` bytes: a regular file, or a pipe where `pipes` allows one. A
/// device is refused (`/dev/zero` would be read forever), a directory too, and a longer file is
/// an error, never a truncated read.
pub fn read_bounded(path: &Path, limit: u64, pipes: bool) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(std::io::Error::other("is a directory"));
    }
    if let Some(kind) = special_kind(meta.file_type()) {
        if !(pipes && kind == "a pipe") {
            return Err(std::io::Error::other(format!("is {kind}, not a file")));
        }
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            limit >> 20
        )));
    }
    Ok(bytes)
}

/// [`read_bounded`] (no pipes) as UTF-8 text.
pub fn read_text(path: &Path, limit: u64) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, limit, false)?).map_err(|e| {
        std::io::Error::other(format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
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
