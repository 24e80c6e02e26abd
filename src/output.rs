//! Writing outputs safely: the one place that decides whether a path may be (over)written and that
//! swaps finished outputs into place.
//!
//! Every command that writes (a run, a compare directory, a report and its CSVs, a control vector,
//! a quantized model) goes through [`Staging`]:
//!
//! 1. [`check_target`] refuses an existing target without `--force`, and with `--force` refuses
//!    anything gguf-trace did not write (a run directory, a compare directory, a report, a control
//!    vector, a GGUF) — `--force` never deletes a user's folder or file.
//! 2. [`Staging::new`] first cleans up what dead processes left for the same target (see below),
//!    then creates a hidden directory `.gguf-trace-<name>.<pid>.partial` beside the target and
//!    holds an exclusive lock on `.gguf-trace-<name>.<pid>.lock` while the process lives.
//! 3. Everything is written inside the staging directory and synced.
//! 4. [`Staging::commit`] journals the target names, moves each existing target into
//!    `.gguf-trace-<name>.<pid>.old`, moves each new output into place, marks the journal
//!    committed, and removes the old outputs.
//!
//! Ctrl-C or an error drops the `Staging` (removing its files); SIGKILL or a power cut leaves them,
//! and the lock dies with the process. The next command that writes the same target finds lock
//! files it can lock (their owner is dead), rolls an interrupted swap back (the old outputs return,
//! nothing half-new stays) or finishes a committed one, removes the leftovers, and says so.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;

/// What kind of output a target is (decides what `--force` may replace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A run directory (`run.json` written by gguf-trace).
    Run,
    /// A `compare` output directory (`compare.json` written by gguf-trace).
    Compare,
    /// A report page (generator meta tag) or one of its CSVs.
    Report,
    /// A control-vector GGUF (`general.architecture = controlvector`).
    ControlVector,
    /// A quantized model written by `quantize` (a GGUF file).
    Gguf,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Run => "a gguf-trace run directory",
            Kind::Compare => "a gguf-trace compare directory",
            Kind::Report => "a gguf-trace report",
            Kind::ControlVector => "a control-vector GGUF",
            Kind::Gguf => "a GGUF file",
        }
    }
}

/// The marker file of a compare directory.
pub const COMPARE_JSON: &str = "compare.json";

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0} already exists; pass --force to overwrite it")]
    Exists(String),
    #[error("{path} exists and is not {what}; --force only replaces what gguf-trace wrote, so remove or rename it yourself")]
    NotOurs { path: String, what: &'static str },
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {why}")]
    BadTarget { path: String, why: String },
    #[error("interrupted: nothing was written")]
    Interrupted,
    #[error("{0}")]
    Refused(String),
    #[error(
        "{path} is being written by another gguf-trace (pid {pid}); wait for it or stop it first"
    )]
    Busy { path: String, pid: String },
    #[error("{path} holds files gguf-trace did not write ({names}); --force would delete them, so move them out first")]
    Foreign { path: String, names: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `dir` itself, or the nearest folder above it that exists ("." at the end of a relative path).
fn nearest_existing(dir: &Path) -> PathBuf {
    let mut p = dir.to_path_buf();
    while fs::symlink_metadata(&p).is_err() {
        if !p.pop() || p.as_os_str().is_empty() {
            return PathBuf::from(".");
        }
    }
    p
}

/// The directory a target lives in ("." for a bare name).
pub fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The target's file name, which names its staging files and (for a report) its CSVs: UTF-8, so
/// that two names never share them (the folder it is in may be any bytes).
fn file_name(p: &Path) -> Result<String, OutputError> {
    let name = p
        .file_name()
        .filter(|n| *n != "." && *n != "..")
        .ok_or_else(|| OutputError::BadTarget {
            path: p.display().to_string(),
            why: "it names a folder (`.`, `..` or `/`), not an output; give the output its own name in it (e.g. ./run)".into(),
        })?;
    name.to_str()
        .filter(|n| !n.contains('\n'))
        .map(str::to_owned)
        .ok_or_else(|| OutputError::BadTarget {
            path: crate::paths::recorded(p.as_os_str()),
            why: "an output name must be UTF-8 text without line breaks (the folder it is in may be anything)".into(),
        })
}

/// Refuse `target` unless it is absent, or `force` is given and it is `kind` written by gguf-trace.
/// Also checks that the target's directory exists.
pub fn check_target(target: &Path, kind: Kind, force: bool) -> Result<(), OutputError> {
    let key = file_name(target)?;
    let parent = parent_dir(target);
    // A swap a killed process left half done is undone first, so the check sees the real state.
    {
        let _guard = dir_guard(&parent)?;
        for msg in recover_stale(&parent, &key, false) {
            eprintln!("note: {msg}");
        }
        // What the check saw is what the commit may replace: a target that appears after it
        // (another command's output) is left alone, however long this command computes.
        let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
        checked.retain(|(p, _)| p != &parent.join(&key));
        checked.push((parent.join(&key), fs::symlink_metadata(target).is_ok()));
    }
    // Folders of the output that do not exist yet are made when it is written (as `mkdir -p`), so
    // what must exist now is the nearest folder above them, writable.
    let existing = nearest_existing(&parent);
    if !existing.is_dir() {
        return Err(OutputError::BadTarget {
            path: target.display().to_string(),
            why: format!("{} is a file, not a folder", existing.display()),
        });
    }
    // Refused before any work, not after it: a read-only mount or a folder this user may not write
    // (the probe is removed when dropped).
    if let Err(e) = tempfile::Builder::new()
        .prefix(".gguf-trace~probe.")
        .tempfile_in(&existing)
    {
        return Err(OutputError::BadTarget {
            path: target.display().to_string(),
            why: format!(
                "{} is not writable ({})",
                existing.display(),
                std::io::Error::from(e.kind())
            ),
        });
    }
    let Ok(meta) = fs::symlink_metadata(target) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() && fs::metadata(target).is_err() {
        return Err(OutputError::BadTarget {
            path: target.display().to_string(),
            why: format!(
                "it is a symbolic link to {}, which does not exist; remove the link or choose another name",
                fs::read_link(target).unwrap_or_default().display()
            ),
        });
    }
    // What --force could not replace is said first: suggesting --force for a folder of the
    // user's own would only lead to a second refusal.
    if !is_ours(target, kind) {
        return Err(OutputError::NotOurs {
            path: target.display().to_string(),
            what: kind.describe(),
        });
    }
    let foreign = foreign_entries(target, kind);
    if !foreign.is_empty() {
        return Err(OutputError::Foreign {
            path: target.display().to_string(),
            names: foreign.join(", "),
        });
    }
    if !force {
        return Err(OutputError::Exists(target.display().to_string()));
    }
    Ok(())
}

/// Entries inside a run or compare directory that gguf-trace does not write (a user's notes):
/// `--force` would delete them, so it is refused while they are there.
fn foreign_entries(dir: &Path, kind: Kind) -> Vec<String> {
    use crate::run::{
        LAST_NPY, LENS_JSON, LOGITS_NPY, METRICS_CSV, RUN_JSON, STATES_CSV, STATES_DIR, TOKENS_CSV,
    };
    let names = |d: &Path| -> Vec<(String, bool)> {
        fs::read_dir(d)
            .map(|it| {
                it.flatten()
                    .map(|e| {
                        let dir = e.file_type().is_ok_and(|t| t.is_dir());
                        (e.file_name().to_string_lossy().into_owned(), dir)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    match kind {
        Kind::Run => {
            let files = [
                RUN_JSON,
                LAST_NPY,
                LOGITS_NPY,
                TOKENS_CSV,
                METRICS_CSV,
                STATES_CSV,
                LENS_JSON,
            ];
            // A folder of per-prompt NPY files (`00000.npy`, ...): anything else in it is foreign.
            let npy_folder = |rel: &str, out: &mut Vec<String>| {
                for (f, sub_dir) in names(&dir.join(rel)) {
                    let npy = f
                        .strip_suffix(".npy")
                        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()));
                    if sub_dir || !npy {
                        out.push(format!("{rel}/{f}"));
                    }
                }
            };
            for (n, is_dir) in names(dir) {
                if n == STATES_DIR && is_dir {
                    npy_folder(STATES_DIR, &mut out);
                } else if n == crate::run::TAPS_DIR && is_dir {
                    // taps/<tap>/NNNNN.npy, one folder per tap gguf-trace writes.
                    for (t, t_dir) in names(&dir.join(&n)) {
                        let rel = format!("{n}/{t}");
                        if t_dir && crate::capture::taps::ALL.iter().any(|tap| tap.name() == t) {
                            npy_folder(&rel, &mut out);
                        } else {
                            out.push(rel);
                        }
                    }
                } else if is_dir || !files.contains(&n.as_str()) {
                    out.push(n);
                }
            }
        }
        Kind::Compare => {
            let runs: Vec<String> =
                crate::paths::read_text(&dir.join(COMPARE_JSON), crate::paths::MAX_JSON)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| {
                        v.get("runs")?.as_array().map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(str::to_string))
                                .collect()
                        })
                    })
                    .unwrap_or_default();
            for (n, is_dir) in names(dir) {
                let ours = if is_dir {
                    runs.contains(&n)
                        && is_ours(&dir.join(&n), Kind::Run)
                        && foreign_entries(&dir.join(&n), Kind::Run).is_empty()
                } else {
                    n == COMPARE_JSON
                        || n == "report.html"
                        || (n.starts_with("report.") && n.ends_with(".csv"))
                        || n.starts_with(PREFIX)
                };
                if !ours {
                    out.push(n);
                }
            }
        }
        _ => {}
    }
    out.sort();
    out
}

fn read_head(path: &Path, n: usize) -> Option<Vec<u8>> {
    let mut f = fs::File::open(path).ok()?;
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(_) => return None,
        }
    }
    buf.truncate(got);
    Some(buf)
}

fn json_tool_is_ours(path: &Path) -> bool {
    let Ok(text) = crate::paths::read_text(path, crate::paths::MAX_JSON) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("tool")
                .and_then(|t| t.as_str())
                .map(|t| t == "gguf-trace")
        })
        .unwrap_or(false)
}

/// Whether `target` (which exists) is `kind` as gguf-trace writes it. Symbolic links never are.
pub fn is_ours(target: &Path, kind: Kind) -> bool {
    let Ok(meta) = fs::symlink_metadata(target) else {
        return false;
    };
    if meta.file_type().is_symlink() {
        return false;
    }
    match kind {
        Kind::Run => meta.is_dir() && json_tool_is_ours(&target.join(crate::run::RUN_JSON)),
        Kind::Compare => meta.is_dir() && json_tool_is_ours(&target.join(COMPARE_JSON)),
        Kind::Report => {
            meta.is_file()
                && read_head(target, 4096).is_some_and(|h| {
                    let h = String::from_utf8_lossy(&h);
                    if target.extension().is_some_and(|e| e == "csv") {
                        h.starts_with("run,")
                    } else {
                        h.contains("<meta name=\"generator\" content=\"gguf-trace")
                    }
                })
        }
        Kind::ControlVector => {
            meta.is_file()
                && crate::llama::gguf::Gguf::open(target).is_ok_and(|g| {
                    g.get_str("general.architecture").as_deref() == Some("controlvector")
                })
        }
        Kind::Gguf => meta.is_file() && read_head(target, 4).is_some_and(|h| h == b"GGUF"),
    }
}

const PREFIX: &str = ".gguf-trace-";

/// This process's stagings in progress, for the abort path: llama.cpp can end the process from
/// inside a decode (a failed GGML_ASSERT), where nothing unwinds and no `Drop` runs.
struct Live {
    dir: PathBuf,
    lock: PathBuf,
    /// Holds something `--resume` can continue (a checkpoint, a finished run of a compare).
    resumable: bool,
}

static LIVE: std::sync::Mutex<Vec<Live>> = std::sync::Mutex::new(Vec::new());

fn live_add(dir: &Path, lock: &Path, resumable: bool) {
    crate::llama::backend::set_abort_cleanup(abort_cleanup);
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.push(Live {
        dir: dir.to_path_buf(),
        lock: lock.to_path_buf(),
        resumable,
    });
}

fn live_remove(dir: &Path) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|l| l.dir != dir);
}

/// Called by the abort path just before the process ends: removes every staging that holds
/// nothing to resume (and its lock), so an abort leaves no leftovers; returns whether something
/// resumable stays (then, and only then, the error suggests `--resume`).
fn abort_cleanup() -> bool {
    let Ok(live) = LIVE.try_lock() else {
        // Held by the aborting thread itself: leave everything as it is, as SIGKILL would.
        return true;
    };
    let mut resumable = false;
    for l in live.iter() {
        if l.resumable {
            resumable = true;
        } else {
            let _ = fs::remove_dir_all(&l.dir);
            let _ = fs::remove_file(&l.lock);
        }
    }
    resumable
}

/// Files written while an output is being produced, and the swap into place.
pub struct Staging {
    parent: PathBuf,
    key: String,
    pid: u32,
    dir: PathBuf,
    lock_path: PathBuf,
    _lock: fs::File,
    done: bool,
    /// Whether the target existed when this staging began: one that appears meanwhile was made by
    /// someone else, and the commit leaves it alone.
    target_existed: bool,
}

impl Staging {
    /// Start staging outputs for `target` (its file name is the key: a report's CSVs share its
    /// key). Cleans up what dead processes left for the same key first, telling the user.
    pub fn new(target: &Path) -> Result<Staging, OutputError> {
        let parent = parent_dir(target);
        let key = file_name(target)?;
        // The output's folders that do not exist yet (checked by check_target: made in a writable
        // folder).
        fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        // Check, recovery and taking this staging's lock are one step under the folder's guard:
        // two commands writing the same target cannot both pass the check.
        let guard = dir_guard(&parent)?;
        refuse_if_busy(&parent, &key, target)?;
        pause_point("busy-checked");
        for msg in recover_stale(&parent, &key, true) {
            eprintln!("note: {msg}");
        }
        let pid = std::process::id();
        let lock_path = parent.join(format!("{PREFIX}{key}.{pid}.lock"));
        let dir = parent.join(format!("{PREFIX}{key}.{pid}.partial"));
        let lock = fs::File::create(&lock_path).map_err(io_err(&parent))?;
        lock.try_lock_exclusive().map_err(io_err(&lock_path))?;
        live_add(&dir, &lock_path, false);
        if dir.exists() {
            // Our own pid: a leftover of an earlier Staging in this process.
            fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        if let Err(e) = fs::create_dir(&dir) {
            let _ = fs::remove_file(&lock_path);
            return Err(io_err(&parent)(e));
        }
        drop(guard);
        let target_existed = existed_when_checked(target, &parent, &key);
        Ok(Staging {
            parent,
            key,
            pid,
            dir,
            lock_path,
            _lock: lock,
            done: false,
            target_existed,
        })
    }

    /// Like [`Staging::new`]; with `adopt`, first take over the staging directory of an
    /// interrupted (dead) process that was writing the same target and had not begun its swap —
    /// the basis of `--resume`. Returns whether one was adopted.
    ///
    /// `accept` sees a candidate staging directory before anything is changed; a candidate it
    /// refuses (its error) is left exactly as it was.
    pub fn new_or_adopt(
        target: &Path,
        adopt: bool,
        accept: &dyn Fn(&Path) -> Result<(), OutputError>,
    ) -> Result<(Staging, bool), OutputError> {
        if adopt {
            if let Some(st) = Self::adopt(target, accept)? {
                return Ok((st, true));
            }
        }
        Ok((Self::new(target)?, false))
    }

    fn adopt(
        target: &Path,
        accept: &dyn Fn(&Path) -> Result<(), OutputError>,
    ) -> Result<Option<Staging>, OutputError> {
        let parent = parent_dir(target);
        let key = file_name(target)?;
        let _guard = dir_guard(&parent)?;
        refuse_if_busy(&parent, &key, target)?;
        let prefix = format!("{PREFIX}{key}.");
        let me = std::process::id();
        let Some(pid) = resumable_pid(&parent, &key) else {
            return Ok(None);
        };
        let old_base = parent.join(format!("{prefix}{pid}"));
        accept(&PathBuf::from(format!("{}.partial", old_base.display())).join(&key))?;
        let lock_path = parent.join(format!("{PREFIX}{key}.{me}.lock"));
        let dir = parent.join(format!("{PREFIX}{key}.{me}.partial"));
        let lock = fs::File::create(&lock_path).map_err(io_err(&parent))?;
        lock.try_lock_exclusive().map_err(io_err(&lock_path))?;
        let old_dir = PathBuf::from(format!("{}.partial", old_base.display()));
        if let Err(e) = fs::rename(&old_dir, &dir) {
            let _ = fs::remove_file(&lock_path);
            return Err(io_err(&old_dir)(e));
        }
        let _ = fs::remove_file(format!("{}.lock", old_base.display()));
        live_add(&dir, &lock_path, true);
        // Anything else dead processes left for this target goes.
        for msg in recover_stale(&parent, &key, true) {
            eprintln!("note: {msg}");
        }
        let target_existed = existed_when_checked(target, &parent, &key);
        Ok(Some(Staging {
            parent,
            key,
            pid: me,
            dir,
            lock_path,
            _lock: lock,
            done: false,
            target_existed,
        }))
    }

    /// Leave the staging directory where it is (for a later `--resume`); its lock is released
    /// when this process exits, which is what marks it resumable.
    pub fn keep(mut self) {
        self.done = true;
        live_remove(&self.dir);
    }

    /// Record that the staging now holds something `--resume` can continue (a checkpoint, a
    /// finished run of a compare): an abort leaves it in place and says so.
    pub fn mark_resumable(&self) {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        for l in live.iter_mut().filter(|l| l.dir == self.dir) {
            l.resumable = true;
        }
    }

    /// Where to write the output that will become `parent/name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn old_dir(&self) -> PathBuf {
        self.parent
            .join(format!("{PREFIX}{}.{}.old", self.key, self.pid))
    }

    /// Move the staged outputs `names` (files or directories inside the staging directory) into
    /// the target directory, replacing what is there, and remove `stale` targets (earlier outputs
    /// of the same key that this output no longer has). Every name must already have passed
    /// [`check_target`].
    pub fn commit(mut self, names: &[String], stale: &[String]) -> Result<(), OutputError> {
        pause_point("commit");
        if crate::llama::backend::interrupted() {
            return Err(OutputError::Interrupted);
        }
        // No recovery and no other commit in this folder runs while this swap does.
        let guard = dir_guard(&self.parent)?;
        let main = self.parent.join(&self.key);
        if !self.target_existed && fs::symlink_metadata(&main).is_ok() {
            return Err(OutputError::BadTarget {
                path: main.display().to_string(),
                why: "it appeared while this command ran (made by someone else?); it is left as it is and nothing was written".into(),
            });
        }
        // From here a swap may be half done: an abort leaves it to the next command's recovery.
        live_remove(&self.dir);
        for n in names {
            let p = self.dir.join(n);
            if fs::symlink_metadata(&p).is_err() {
                return Err(OutputError::BadTarget {
                    path: p.display().to_string(),
                    why: "staged output missing".into(),
                });
            }
        }
        let all: Vec<&String> = names.iter().chain(stale).collect();
        let journal = self.dir.join(".targets");
        write_synced(
            &journal,
            all.iter()
                .map(|n| format!("{n}\n"))
                .collect::<String>()
                .as_bytes(),
        )?;
        // The targets that do not exist yet: a recovery removes only these when it finds them
        // without a staged copy (the others it restores from `.old`, and once restored it must
        // leave them, so a second recovery after an interrupted first one restores nothing twice
        // and deletes nothing it put back).
        write_synced(
            &self.dir.join(".new"),
            all.iter()
                .filter(|n| fs::symlink_metadata(self.parent.join(n)).is_err())
                .map(|n| format!("{n}\n"))
                .collect::<String>()
                .as_bytes(),
        )?;
        sync_dir(&self.dir);
        let new: Vec<&String> = all
            .iter()
            .copied()
            .filter(|n| fs::symlink_metadata(self.parent.join(n)).is_err())
            .collect();
        let old = self.old_dir();
        fs::create_dir(&old).map_err(io_err(&old))?;
        let swap = || -> Result<(), OutputError> {
            for n in &all {
                let target = self.parent.join(n);
                if fs::symlink_metadata(&target).is_ok() {
                    fs::rename(&target, old.join(n)).map_err(io_err(&target))?;
                }
            }
            failpoint("swap");
            for (i, n) in names.iter().enumerate() {
                let target = self.parent.join(n);
                #[cfg(test)]
                if tests::FAIL_MOVE_IN.with(|f| f.get()) == Some(i) {
                    return Err(io_err(&target)(std::io::Error::other(
                        "test: move-in fails",
                    )));
                }
                let _ = i;
                fs::rename(self.dir.join(n), &target).map_err(io_err(&target))?;
            }
            Ok(())
        };
        if let Err(e) = swap() {
            // Undone here, as a recovery would: every earlier output back in place, the new ones
            // moved in removed. Only if that fails too is the earlier output left in `.old` (and
            // the error says where).
            let mut left = false;
            for n in &all {
                let (target, was) = (self.parent.join(n), old.join(n));
                if fs::symlink_metadata(&was).is_ok() {
                    remove_any(&target);
                    left |= fs::rename(&was, &target).is_err();
                } else if new.contains(n) && fs::symlink_metadata(self.dir.join(n)).is_err() {
                    remove_any(&target);
                }
            }
            if left {
                self.done = true; // keep the staging: the next command's recovery finishes it
                return Err(OutputError::BadTarget {
                    path: self.parent.join(&self.key).display().to_string(),
                    why: format!(
                        "{e}; the earlier output could not be put back and is in {}",
                        old.display()
                    ),
                });
            }
            let _ = fs::remove_dir_all(&old);
            return Err(e);
        }
        write_synced(&self.dir.join(".committed"), b"")?;
        sync_dir(&self.parent);
        // Committed: the rest is deleting (the earlier output may be gigabytes), which a recovery
        // finishes if it must; other writers of this folder need not wait for it.
        drop(guard);
        self.done = true;
        let _ = fs::remove_dir_all(&old);
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_file(&self.lock_path);
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        live_remove(&self.dir);
        if !self.done {
            let _ = fs::remove_dir_all(&self.dir);
            let _ = fs::remove_file(&self.lock_path);
        }
    }
}

/// Test hook: abort the process here (like SIGKILL or a power cut) when the environment variable
/// `GGUF_TRACE_FAILPOINT` names this point. Used by the tests of atomic writes and `--resume`.
pub fn failpoint(name: &str) {
    if std::env::var("GGUF_TRACE_FAILPOINT").is_ok_and(|v| v == name) {
        std::process::abort();
    }
}

/// The targets [`check_target`] checked in this process, and whether each existed then.
static CHECKED: std::sync::Mutex<Vec<(PathBuf, bool)>> = std::sync::Mutex::new(Vec::new());

/// Whether `target` existed when it was checked (or now, if it was not checked).
fn existed_when_checked(target: &Path, parent: &Path, key: &str) -> bool {
    let p = parent.join(key);
    let checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    match checked.iter().find(|(q, _)| *q == p) {
        Some(&(_, existed)) => existed,
        None => fs::symlink_metadata(target).is_ok(),
    }
}

/// Test hook: with `GGUF_TRACE_PAUSE=NAME:FILE[;NAME:FILE...]`, stop at the point `NAME` until
/// its `FILE` exists or the process is interrupted (`FILE.reached` says the process got there; at
/// most 10 minutes). Used by the tests of interleavings and signals, to act at one step for certain.
pub fn pause_point(name: &str) {
    let Ok(v) = std::env::var("GGUF_TRACE_PAUSE") else {
        return;
    };
    let Some(file) = v
        .split(';')
        .filter_map(|e| e.split_once(':'))
        .find(|(n, _)| *n == name)
        .map(|(_, f)| f.to_string())
    else {
        return;
    };
    let _ = fs::write(format!("{file}.reached"), b"");
    let start = std::time::Instant::now();
    while !Path::new(&file).exists()
        && !crate::llama::backend::interrupted()
        && start.elapsed() < std::time::Duration::from_secs(600)
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How long a writer waits for another to release a folder's guard (it is held for milliseconds:
/// a check, a recovery or a swap of renames).
const GUARD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The guard of a folder's outputs: an exclusive lock on the folder itself (flock; nothing is
/// left behind), held by every writer across the steps that must not interleave — the busy check
/// with taking a staging's own lock, the recovery of what dead processes left, and a commit's
/// swap. Not nested: each of those takes it once. None where the folder cannot be opened (the
/// caller's own checks then name the problem).
fn dir_guard(parent: &Path) -> Result<Option<fs::File>, OutputError> {
    let Ok(f) = fs::File::open(parent) else {
        return Ok(None);
    };
    let start = std::time::Instant::now();
    loop {
        match f.try_lock_exclusive() {
            Ok(true) => return Ok(Some(f)),
            // A file system without locks: as before the guard existed.
            Err(_) => return Ok(None),
            Ok(false) if start.elapsed() < GUARD_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Ok(false) => {
                return Err(OutputError::BadTarget {
                    path: parent.display().to_string(),
                    why: format!(
                        "another gguf-trace has held this folder's lock for {} s (is it stopped?)",
                        GUARD_WAIT.as_secs()
                    ),
                })
            }
        }
    }
}

/// Write a file and flush it to disk.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Flush a file that is already written (fsync), e.g. an NPY file written by ndarray-npy.
pub fn sync_file(path: &Path) -> Result<(), OutputError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

/// Flush a directory's entries (renames) to disk; best effort (not every platform allows it).
pub fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Refuse to write `target` while another live gguf-trace writes it.
fn refuse_if_busy(parent: &Path, key: &str, target: &Path) -> Result<(), OutputError> {
    match busy(parent, key) {
        Some(pid) => Err(OutputError::Busy {
            path: target.display().to_string(),
            pid,
        }),
        None => Ok(()),
    }
}

/// The files another gguf-trace process made for `key` in `parent` with this `suffix`
/// (`.gguf-trace-<key>.<pid><suffix>`): (pid, entry) for every pid but this process's.
fn others(parent: &Path, key: &str, suffix: &str) -> Vec<(String, fs::DirEntry)> {
    let prefix = format!("{PREFIX}{key}.");
    let me = std::process::id().to_string();
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(&prefix)?
                .strip_suffix(suffix)?
                .to_string();
            (pid != me && pid.chars().all(|c| c.is_ascii_digit())).then_some((pid, e))
        })
        .collect()
}

/// A live gguf-trace (other than this one) writing `key` in `parent`: its pid.
fn busy(parent: &Path, key: &str) -> Option<String> {
    others(parent, key, ".lock")
        .into_iter()
        .find(|(_, e)| lock_is_free(&e.path()) == Some(false))
        .map(|(pid, _)| pid)
}

/// The pid of the newest staging of `key` in `parent` that `--resume` could take over: its writer
/// is dead (its lock is free), it had not begun its swap, and it holds the output.
fn resumable_pid(parent: &Path, key: &str) -> Option<String> {
    let mut found: Option<(std::time::SystemTime, String)> = None;
    for (pid, e) in others(parent, key, ".partial") {
        let base = format!("{PREFIX}{key}.{pid}");
        // Ours (a lock file exists) and its owner dead (the lock is free).
        let dead = lock_is_free(&parent.join(format!("{base}.lock"))) == Some(true);
        let dir = e.path();
        let swapping =
            parent.join(format!("{base}.old")).exists() || dir.join(".committed").exists();
        if dead && !swapping && dir.join(key).is_dir() {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            if found.as_ref().is_none_or(|(best, _)| t > *best) {
                found = Some((t, pid));
            }
        }
    }
    found.map(|(_, pid)| pid)
}

/// An interrupted output of `target` that `--resume` could continue: its staged copy (None when
/// there is none).
pub fn resumable(target: &Path) -> Option<PathBuf> {
    let parent = parent_dir(target);
    let key = file_name(target).ok()?;
    // Its probe of the lock files is one of the steps writers serialize.
    let _guard = dir_guard(&parent).ok()?;
    let pid = resumable_pid(&parent, &key)?;
    Some(
        parent
            .join(format!("{PREFIX}{key}.{pid}.partial"))
            .join(&key),
    )
}

/// Whether the lock file `path` is free (its writer is gone): None when there is no such file.
fn lock_is_free(path: &Path) -> Option<bool> {
    let f = fs::File::options().write(true).open(path).ok()?;
    let free = f.try_lock_exclusive().unwrap_or(false);
    if free {
        let _ = FileExt::unlock(&f);
    }
    Some(free)
}

/// Clean up what dead processes left while writing `key` in `parent`; returns what was done.
/// An interrupted swap is always rolled back; other leftovers (unfinished outputs, which `--resume`
/// may still adopt) are removed only with `remove_partials`.
fn recover_stale(parent: &Path, key: &str, remove_partials: bool) -> Vec<String> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let prefix = format!("{PREFIX}{key}.");
    let mut pids: Vec<String> = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(&prefix) {
            if let Some((pid, _what)) = rest.split_once('.') {
                if pid.chars().all(|c| c.is_ascii_digit()) && !pids.contains(&pid.to_string()) {
                    pids.push(pid.to_string());
                }
            }
        }
    }
    let mut notes = Vec::new();
    for pid in pids {
        let base = format!("{prefix}{pid}");
        let lock_path = parent.join(format!("{base}.lock"));
        // Only what a gguf-trace left is touched: it always holds a lock file while it writes, and
        // its owner is alive exactly when it still holds the lock.
        match fs::File::options().write(true).open(&lock_path) {
            Ok(f) if f.try_lock_exclusive().unwrap_or(false) => {}
            _ => continue,
        }
        let partial = parent.join(format!("{base}.partial"));
        let old = parent.join(format!("{base}.old"));
        if !remove_partials && !old.exists() {
            continue;
        }
        let committed = partial.join(".committed").exists();
        let mut restored = 0;
        if old.exists() && !committed {
            // An interrupted swap: put every earlier output back, remove what was half moved in.
            let read = |f: &str| {
                crate::paths::read_text(&partial.join(f), crate::paths::MAX_JSON)
                    .unwrap_or_default()
            };
            let (targets, new) = (read(".targets"), read(".new"));
            let new: Vec<&str> = new.lines().collect();
            for n in targets.lines().filter(|n| !n.is_empty()) {
                let target = parent.join(n);
                let was = old.join(n);
                if fs::symlink_metadata(&was).is_ok() {
                    remove_any(&target);
                    if fs::rename(&was, &target).is_ok() {
                        restored += 1;
                    }
                } else if new.contains(&n) && fs::symlink_metadata(partial.join(n)).is_err() {
                    // A new output moved in before the kill: it goes.
                    remove_any(&target);
                }
                // Else the earlier output is already back (an earlier recovery): left alone.
            }
        }
        remove_any(&partial);
        remove_any(&old);
        let _ = fs::remove_file(&lock_path);
        notes.push(if restored > 0 {
            format!(
                "an earlier gguf-trace (pid {pid}) was killed while replacing {}: restored the previous output and removed its leftovers",
                parent.join(key).display()
            )
        } else {
            format!(
                "removed the leftovers of an interrupted gguf-trace (pid {pid}) writing {}",
                parent.join(key).display()
            )
        });
    }
    notes
}

fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = fs::remove_file(p);
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn force_only_replaces_our_outputs() {
        let d = tempfile::tempdir().unwrap();
        let mine = d.path().join("thesis");
        fs::create_dir(&mine).unwrap();
        fs::write(mine.join("thesis.tex"), "x").unwrap();
        // Not ours: said at once, with or without --force (never "pass --force" first).
        for force in [false, true] {
            assert!(matches!(
                check_target(&mine, Kind::Run, force),
                Err(OutputError::NotOurs { .. })
            ));
        }
        fs::write(mine.join("run.json"), r#"{"tool": "gguf-trace"}"#).unwrap();
        // A run directory that also holds the user's file is not replaced either.
        assert!(matches!(
            check_target(&mine, Kind::Run, true),
            Err(OutputError::Foreign { .. })
        ));
        fs::remove_file(mine.join("thesis.tex")).unwrap();
        assert!(check_target(&mine, Kind::Run, true).is_ok());
        let html = d.path().join("r.html");
        fs::write(&html, "<html>mine</html>").unwrap();
        assert!(check_target(&html, Kind::Report, true).is_err());
        assert!(check_target(&d.path().join("absent"), Kind::Report, false).is_ok());
        // Missing folders are made when the output is written; a file in the way is refused.
        assert!(check_target(&d.path().join("no/such/x"), Kind::Report, false).is_ok());
        assert!(!d.path().join("no").exists());
        assert!(check_target(&html.join("x"), Kind::Report, false).is_err());
    }

    #[test]
    fn commit_swaps_and_a_killed_swap_is_rolled_back() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out.txt");
        fs::write(&target, "old").unwrap();
        let st = Staging::new(&target).unwrap();
        fs::write(st.path("out.txt"), "new").unwrap();
        st.commit(&["out.txt".into()], &[]).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "new");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);

        // Simulate a process killed mid-swap: its lock is free, the old output is in `.old`,
        // the half-new one in place.
        let base = d.path().join(".gguf-trace-out.txt.999999999");
        let partial = PathBuf::from(format!("{}.partial", base.display()));
        let old = PathBuf::from(format!("{}.old", base.display()));
        fs::create_dir(&partial).unwrap();
        fs::create_dir(&old).unwrap();
        fs::write(partial.join(".targets"), "out.txt\n").unwrap();
        fs::rename(&target, old.join("out.txt")).unwrap();
        fs::write(&target, "half").unwrap();
        fs::write(format!("{}.lock", base.display()), "").unwrap();
        let st = Staging::new(&target).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "new");
        drop(st);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    thread_local! {
        /// Test hook: make the move-in of the i-th name fail inside `commit`.
        pub(super) static FAIL_MOVE_IN: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    /// A commit whose swap fails midway puts every earlier output back and removes what it moved
    /// in: nothing stays hidden in `.old`, and the next commit works. Twice in a row.
    #[test]
    fn a_swap_that_fails_midway_puts_everything_back() {
        let d = tempfile::tempdir().unwrap();
        let names: Vec<String> = ["r.html", "r.metrics.csv", "r.delta.csv"]
            .map(String::from)
            .to_vec();
        fs::write(d.path().join("r.html"), "old page").unwrap();
        fs::write(d.path().join("r.delta.csv"), "old delta").unwrap();
        for round in 0..2 {
            let st = Staging::new(&d.path().join("r.html")).unwrap();
            for n in &names {
                fs::write(st.path(n), format!("new {n}")).unwrap();
            }
            FAIL_MOVE_IN.with(|f| f.set(Some(1 + round % 2)));
            assert!(st.commit(&names, &[]).is_err());
            FAIL_MOVE_IN.with(|f| f.set(None));
            assert_eq!(
                fs::read_to_string(d.path().join("r.html")).unwrap(),
                "old page"
            );
            assert_eq!(
                fs::read_to_string(d.path().join("r.delta.csv")).unwrap(),
                "old delta"
            );
            assert!(!d.path().join("r.metrics.csv").exists());
            assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2, "leftovers");
        }
        let st = Staging::new(&d.path().join("r.html")).unwrap();
        for n in &names {
            fs::write(st.path(n), format!("new {n}")).unwrap();
        }
        st.commit(&names, &[]).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("r.html")).unwrap(),
            "new r.html"
        );
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 3);
    }

    /// Recovery is idempotent: killed mid-swap (one target replaced, one new), then killed again
    /// after the recovery put the old output back but before it cleaned up — the second recovery
    /// keeps what the first restored and removes only the half-moved new output. Every step twice.
    #[test]
    fn a_recovery_interrupted_and_run_again_loses_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (kept, fresh) = (d.path().join("r.html"), d.path().join("r.metrics.csv"));
        let base = d.path().join(".gguf-trace-r.html.999999998");
        let partial = PathBuf::from(format!("{}.partial", base.display()));
        let old = PathBuf::from(format!("{}.old", base.display()));
        let lock = PathBuf::from(format!("{}.lock", base.display()));
        // The state a kill inside `commit` leaves: both targets listed, the metrics CSV new,
        // the old page in `.old`, both new files moved in.
        let killed_mid_swap = || {
            fs::create_dir_all(&partial).unwrap();
            fs::create_dir_all(&old).unwrap();
            fs::write(partial.join(".targets"), "r.html\nr.metrics.csv\n").unwrap();
            fs::write(partial.join(".new"), "r.metrics.csv\n").unwrap();
            fs::write(old.join("r.html"), "old page").unwrap();
            fs::write(&kept, "half page").unwrap();
            fs::write(&fresh, "half csv").unwrap();
            fs::write(&lock, "").unwrap();
        };
        for _round in 0..2 {
            killed_mid_swap();
            assert_eq!(recover_stale(d.path(), "r.html", true).len(), 1);
            assert_eq!(fs::read_to_string(&kept).unwrap(), "old page");
            assert!(!fresh.exists());
            assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
            // Killed again after restoring, before cleaning up: the leftovers are there, the
            // page already back.
            fs::create_dir_all(&partial).unwrap();
            fs::create_dir_all(&old).unwrap();
            fs::write(partial.join(".targets"), "r.html\nr.metrics.csv\n").unwrap();
            fs::write(partial.join(".new"), "r.metrics.csv\n").unwrap();
            fs::write(&lock, "").unwrap();
            for _again in 0..2 {
                recover_stale(d.path(), "r.html", true);
                assert_eq!(fs::read_to_string(&kept).unwrap(), "old page");
                assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
            }
            fs::remove_file(&kept).unwrap();
            fs::write(&kept, "old page").unwrap();
        }
    }
}
