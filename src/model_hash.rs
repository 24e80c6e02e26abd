//! The SHA-256 of a model file, recorded in every run's provenance — cached, so a 40 GB model is
//! hashed once rather than on every trace.
//!
//! The cache (`sha256.json` in gguf-trace's cache directory: `$GGUF_TRACE_CACHE`, else
//! `$XDG_CACHE_HOME/gguf-trace`, else `~/.cache/gguf-trace`) maps a file's canonical path to the
//! hash together with the file's size, modification time and inode when it was hashed. An entry
//! is used only when all three still match; a file modified while it was being hashed is not
//! cached. A cache that cannot be read or written is ignored (the hash is then computed).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What identifies one version of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: u64,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        let m = std::fs::metadata(path)?;
        let mtime_ns = m
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(Stamp {
            size: m.len(),
            mtime_ns,
            inode,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    stamp: Stamp,
    sha256: String,
}

/// gguf-trace's cache directory.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("GGUF_TRACE_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("gguf-trace"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/gguf-trace"))
}

fn cache_file() -> Option<PathBuf> {
    cache_dir().map(|d| d.join("sha256.json"))
}

fn load() -> BTreeMap<String, Entry> {
    cache_file()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn store(map: &BTreeMap<String, Entry>) {
    let Some(p) = cache_file() else { return };
    let Some(dir) = p.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!("sha256.json.{}.tmp", std::process::id()));
    if serde_json::to_vec_pretty(map)
        .ok()
        .is_some_and(|b| std::fs::write(&tmp, b).is_ok())
    {
        let _ = std::fs::rename(&tmp, &p);
    } else {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The file's identity as the cache sees it (canonical path, size, modification time, inode).
pub fn stamp(path: &Path) -> std::io::Result<serde_json::Value> {
    let key = path.canonicalize()?.to_string_lossy().into_owned();
    let s = Stamp::of(path)?;
    Ok(serde_json::json!({
        "path": key,
        "size": s.size,
        "mtime_ns": s.mtime_ns,
        "inode": s.inode,
    }))
}

/// SHA-256 of bytes, as lowercase hex.
pub fn hex_sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Hash a file from scratch.
pub fn compute(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The SHA-256 of `path`, from the cache when the file is unchanged; and whether it was cached.
pub fn sha256(path: &Path) -> std::io::Result<(String, bool)> {
    let key = path.canonicalize()?.to_string_lossy().into_owned();
    let before = Stamp::of(path)?;
    if let Some(e) = load().get(&key) {
        if e.stamp == before {
            return Ok((e.sha256.clone(), true));
        }
    }
    let sha = compute(path)?;
    // Cache only what was hashed from one stable version of the file.
    if Stamp::of(path)? == before {
        let mut map = load();
        map.insert(
            key,
            Entry {
                stamp: before,
                sha256: sha.clone(),
            },
        );
        store(&map);
    }
    Ok((sha, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test (it sets the process-wide cache directory): hashed once, reused while the file is
    /// unchanged, recomputed when its size or modification time changes.
    #[test]
    fn cache_follows_the_file() {
        let d = tempfile::tempdir().unwrap();
        std::env::set_var("GGUF_TRACE_CACHE", d.path().join("cache"));
        let f = d.path().join("m.gguf");
        std::fs::write(&f, b"first version").unwrap();
        let (a, cached) = sha256(&f).unwrap();
        assert!(!cached);
        assert_eq!(a, compute(&f).unwrap());
        assert_eq!(sha256(&f).unwrap(), (a.clone(), true));
        // Same size, new content and mtime: recomputed.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"other version").unwrap();
        let t = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(t)
            .unwrap();
        let (b, cached) = sha256(&f).unwrap();
        assert!(!cached);
        assert_ne!(a, b);
        assert_eq!(b, compute(&f).unwrap());
        // Another size: recomputed.
        std::fs::write(&f, b"a longer third version").unwrap();
        let (c, cached) = sha256(&f).unwrap();
        assert!(!cached);
        assert_eq!(c, compute(&f).unwrap());
        assert_eq!(sha256(&f).unwrap(), (c, true));
    }
}
