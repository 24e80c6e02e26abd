//! Backend initialisation (once per process) and routing of llama.cpp's log.
//!
//! llama.cpp prints a great deal to stderr. We install a log callback that keeps the recent lines
//! (so errors such as "failed to load model" or a quantization failure can be shown to the user)
//! and forwards them to stderr only in verbose mode. A progress observer can be attached to follow
//! long operations whose only progress report is the log (quantization's `[i/n]` lines).

use std::collections::VecDeque;
use std::io::Write;
use std::os::raw::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

const KEEP_LINES: usize = 400;

/// Sees every complete log line (used to follow progress that llama.cpp only logs).
pub type LogObserver = Box<dyn FnMut(&str) + Send>;

struct LogState {
    verbose: bool,
    lines: VecDeque<String>,
    partial: String,
    observer: Option<LogObserver>,
}

static LOG: Mutex<LogState> = Mutex::new(LogState {
    verbose: false,
    lines: VecDeque::new(),
    partial: String::new(),
    observer: None,
});

static INIT: Once = Once::new();

/// Set by Ctrl-C (see [`request_interrupt`]); checked by llama.cpp's abort callback and by our loops.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ask every running decode to stop as soon as possible.
pub fn request_interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether an interrupt was requested.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Initialise llama.cpp's backends and install the log router. Safe to call many times; only the
/// first call does anything. Verbosity is separate ([`set_verbose`]) so that library code calling
/// `init()` never undoes the user's `-v`.
pub fn init() {
    INIT.call_once(|| {
        // SAFETY: `log_callback` is a valid `extern "C"` function for the whole process lifetime and
        // does not unwind (its body runs in catch_unwind); a null user_data is never dereferenced.
        unsafe { llama_cpp_sys_2::llama_log_set(Some(log_callback), std::ptr::null_mut()) };
        // SAFETY: called once per process (guarded by `Once`) before any model or context exists.
        unsafe { llama_cpp_sys_2::llama_backend_init() };
        // SAFETY: `ggml_abort_handler` is a valid `extern "C"` function for the process lifetime
        // and never returns or unwinds.
        unsafe { llama_cpp_sys_2::ggml_set_abort_callback(Some(ggml_abort_handler)) };
    });
}

/// Forward llama.cpp's log to stderr (true) or keep it quiet (false).
pub fn set_verbose(verbose: bool) {
    lock().verbose = verbose;
}

fn lock() -> std::sync::MutexGuard<'static, LogState> {
    LOG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forget the kept log lines (so a following error message only shows what is new).
pub fn clear_log() {
    lock().lines.clear();
}

/// llama.cpp's own reason for the last failure, from the log lines kept since [`clear_log`].
///
/// llama.cpp logs the specific cause first ("llama_model_load: error loading model: tensor
/// 'blk.0.attn_q.weight' data is not within the file bounds") and a generic summary after it
/// ("failed to load model"), so the *first* error-like line is the informative one. The function
/// prefix ("llama_model_load: ") and the repeated "error loading model:" are dropped.
pub fn last_error_line() -> Option<String> {
    let st = lock();
    let find = |word: &str| {
        st.lines
            .iter()
            .find(|l| l.to_ascii_lowercase().contains(word))
    };
    let line = find("error")
        .or_else(|| find("failed"))
        .or_else(|| find("invalid"))?;
    Some(clean_reason(line))
}

/// "llama_model_load: error loading model: X" → "X"; "func: X" → "X".
fn clean_reason(line: &str) -> String {
    let mut s = line.trim();
    if let Some((head, rest)) = s.split_once(": ") {
        if !head.contains(' ') {
            s = rest;
        }
    }
    for prefix in [
        "error loading model: ",
        "error loading model hyperparameters: ",
        "error loading model architecture: ",
        "error loading model vocabulary: ",
    ] {
        if let Some(rest) = s.strip_prefix(prefix) {
            s = rest;
        }
    }
    s.trim().to_string()
}

/// Attach (or detach with `None`) an observer that sees every complete log line.
pub fn set_log_observer(observer: Option<LogObserver>) {
    lock().observer = observer;
}

unsafe extern "C" fn log_callback(_level: u32, text: *const c_char, _user: *mut c_void) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: llama.cpp passes a NUL-terminated string (or null) valid during this call.
        let text = unsafe { super::c_str_to_string(text) };
        let mut st = lock();
        if st.verbose {
            eprint!("{text}");
        }
        st.partial.push_str(&text);
        while let Some(nl) = st.partial.find('\n') {
            let line: String = st.partial.drain(..=nl).collect();
            let line = line.trim_end().to_string();
            if let Some(obs) = st.observer.as_mut() {
                obs(&line);
            }
            if st.lines.len() == KEEP_LINES {
                st.lines.pop_front();
            }
            st.lines.push_back(line);
        }
    });
}

/// Where llama.cpp would abort (a failed GGML_ASSERT, an RPC server that died, a check we did not
/// anticipate): print one `error:` line with llama.cpp's own message and end the process at once
/// with status 1 — no backtrace dump, no core. Outputs being written stay unfinished in their
/// staging directories, which the next command removes (or `--resume` continues).
/// What the abort path runs before the process ends: the output module's clean-up of stagings that
/// hold nothing to resume; it returns whether something resumable stays.
static ABORT_CLEANUP: std::sync::OnceLock<fn() -> bool> = std::sync::OnceLock::new();

/// Register the abort path's clean-up (once; later calls are ignored).
pub fn set_abort_cleanup(f: fn() -> bool) {
    let _ = ABORT_CLEANUP.set(f);
}

/// Test hook: with `GGUF_TRACE_FAILPOINT=ggml-abort`, llama.cpp's own abort (`ggml_abort`, what a
/// failed GGML_ASSERT calls) runs here, before the first decode, through the real abort path.
pub fn failpoint_ggml_abort() {
    if std::env::var("GGUF_TRACE_FAILPOINT").is_ok_and(|v| v == "ggml-abort") {
        // SAFETY: ggml_abort takes a file name, a line and a printf format (here without
        // conversions, so no variadic arguments are read); it calls our abort handler and does not
        // return.
        unsafe {
            llama_cpp_sys_2::ggml_abort(
                c"failpoint.c".as_ptr(),
                1,
                c"GGML_ASSERT(failpoint) failed".as_ptr(),
            )
        }
    }
}

unsafe extern "C" fn ggml_abort_handler(message: *const c_char) {
    // SAFETY: ggml passes its NUL-terminated message buffer, valid during this call.
    let text = unsafe { super::c_str_to_string(message) };
    // "path/to/file.c:123: message" → "message (file.c:123)".
    let (place, msg) = match text.split_once(": ") {
        Some((p, m)) if p.contains(':') => (
            p.rsplit('/').next().unwrap_or(p).to_string(),
            m.trim().to_string(),
        ),
        _ => (String::new(), text.trim().to_string()),
    };
    stop_process(&format!(
        "llama.cpp stopped: {msg}{}",
        if place.is_empty() {
            String::new()
        } else {
            format!(" ({place})")
        }
    ))
}

/// End the process with status 1 and one `error:` line, `what` and what became of the outputs:
/// stagings with nothing to resume are removed, and `--resume` is suggested only where it can
/// help. For when llama.cpp cannot go on or cannot be asked to (its abort, an RPC worker that
/// stopped answering); callable from any thread.
pub fn stop_process(what: &str) -> ! {
    // No panic may unwind into ggml: a failing clean-up counts as "something may be resumable".
    let resumable =
        std::panic::catch_unwind(|| ABORT_CLEANUP.get().is_some_and(|f| f())).unwrap_or(true);
    let _ = writeln!(
        std::io::stderr(),
        "error: {what} — {}",
        if resumable {
            "the output was not completed; the trace's checkpoints are kept: run the same command with --resume to continue"
        } else {
            "nothing was written"
        }
    );
    // SAFETY: _exit ends the process immediately without running destructors that llama.cpp's
    // other threads may still be using (or that would wait on a worker that does not answer);
    // nothing is unwound across C frames.
    unsafe { libc::_exit(1) }
}

/// End the process at once with `code`, without unwinding or running destructors (for when
/// llama.cpp is blocked and cannot be asked to stop, e.g. waiting on an RPC worker that never
/// answers). Outputs in progress stay in their staging directories, as after SIGKILL.
pub fn exit_now(code: i32) -> ! {
    let _ = std::io::stderr().flush();
    // SAFETY: _exit takes any status and never returns.
    unsafe { libc::_exit(code) }
}

/// llama.cpp's description of the CPU features and backends it was built with.
pub fn system_info() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated buffer owned by llama.cpp; copied
    // immediately.
    unsafe { super::c_str_to_string(llama_cpp_sys_2::llama_print_system_info()) }
        .trim()
        .to_string()
}

/// Whether this llama.cpp was compiled with its AMX path (`AMX_INT8 = 1` in the system info).
/// That path crashes inside `ggml_backend_amx_mul_mat` on `llama_decode` (llama.cpp issue
/// #20824); the project's build leaves it out (`.cargo/config.toml`), and a build that has it
/// anyway (other compiler flags) loads models without the CPU's extra buffer types, AMX's among
/// them ([`cpu_repack_usable`]).
pub fn amx_compiled() -> bool {
    system_info().contains("AMX_INT8 = 1")
}

/// Whether the CPU backend may repack weights into its extra buffer types (`use_extra_bufts`):
/// false where they include the AMX one ([`amx_compiled`]). Says so once on stderr when false.
pub fn cpu_repack_usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        let amx = amx_compiled();
        if amx {
            eprintln!(
                "note: this llama.cpp was built with its AMX path, which crashes on this CPU: weights are not repacked (as with --no-repack). Build gguf-trace from its repository (its .cargo/config.toml leaves AMX out) for the repacked kernels"
            );
        }
        !amx
    })
}

/// The compute devices llama.cpp can use (name: description), CPU included.
pub fn devices() -> Vec<String> {
    // SAFETY: device enumeration is valid after backend init; indices are in range; the returned
    // strings are static per device and copied immediately.
    unsafe {
        let n = llama_cpp_sys_2::ggml_backend_dev_count();
        (0..n)
            .map(|i| {
                let d = llama_cpp_sys_2::ggml_backend_dev_get(i);
                format!(
                    "{}: {}",
                    super::c_str_to_string(llama_cpp_sys_2::ggml_backend_dev_name(d)),
                    super::c_str_to_string(llama_cpp_sys_2::ggml_backend_dev_description(d))
                )
            })
            .collect()
    }
}

// OpenBLAS (linked through ndarray-linalg's `openblas-system`, and used by ndarray's matrix
// products) is the crate's other C library; its thread control lives here with the other FFI.
extern "C" {
    fn openblas_get_num_threads() -> std::os::raw::c_int;
    fn openblas_set_num_threads(n: std::os::raw::c_int);
}

/// How many `with_single_threaded_blas` calls are inside, and the thread count the outermost found.
struct BlasDepth {
    inside: usize,
    before: std::os::raw::c_int,
}
static BLAS_DEPTH: std::sync::Mutex<BlasDepth> = std::sync::Mutex::new(BlasDepth {
    inside: 0,
    before: 0,
});
fn blas_depth() -> std::sync::MutexGuard<'static, BlasDepth> {
    BLAS_DEPTH.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `f` with OpenBLAS on one thread, restoring its thread count afterwards: for work that is
/// already spread over every core by our own threads (OpenBLAS's threads on top of them
/// oversubscribe the cores and spin: a PCA pass ran 3× slower).
///
/// No precondition: calls may nest and may come from several threads at once. A depth count under
/// one lock makes the outermost call set one thread and the last one to leave restore the count
/// it found, so a nested or concurrent call never restores too early (before, a second caller
/// could restore the count while the first was still inside). A panic in `f` restores it too.
pub fn with_single_threaded_blas<T>(f: impl FnOnce() -> T) -> T {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            let mut d = blas_depth();
            d.inside -= 1;
            if d.inside == 0 {
                // SAFETY: OpenBLAS's thread count is one global integer that its setter may change
                // at any time (a call in flight on another thread keeps the count it read when it
                // started; growing the pool happens under OpenBLAS's own server lock). Our lock
                // orders this against the other set/restore calls.
                unsafe { openblas_set_num_threads(d.before) };
            }
        }
    }
    {
        let mut d = blas_depth();
        if d.inside == 0 {
            // SAFETY: a plain getter of that global count.
            d.before = unsafe { openblas_get_num_threads() };
            // SAFETY: as in `Leave::drop`.
            unsafe { openblas_set_num_threads(1) };
        }
        d.inside += 1;
    }
    let _leave = Leave;
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The build leaves llama.cpp's AMX path out (it crashes on AMX CPUs; see `amx_compiled`).
    /// On a CPU with AMX, `-march=native` would compile it in: this fails if the flags in
    /// .cargo/config.toml stop reaching llama.cpp's build. (On CPUs without AMX it cannot fail.)
    #[test]
    fn llama_cpp_is_built_without_its_amx_path() {
        init();
        let info = system_info();
        assert!(!amx_compiled(), "llama.cpp was built with AMX: {info}");
        assert!(cpu_repack_usable());
    }

    fn threads() -> std::os::raw::c_int {
        // SAFETY: a plain getter of OpenBLAS's global thread count.
        unsafe { openblas_get_num_threads() }
    }

    /// Two threads overlap (A enters, B enters, A leaves, B still inside): B must still run on one
    /// BLAS thread, and the count is restored once both have left. Before the depth count, A's
    /// exit restored the old count under B.
    #[test]
    fn single_threaded_blas_holds_while_any_caller_is_inside() {
        // Another test of this binary (the PCA tests) may be inside; wait until none is, then set
        // a count other than 1 under the lock, so a too-early restore is visible. (Setting it only
        // when none was inside, without waiting, let a test that was inside restore its own count
        // afterwards: the final check then failed on a count this test never set.)
        loop {
            let d = blas_depth();
            if d.inside == 0 {
                // SAFETY: as in `with_single_threaded_blas`.
                unsafe { openblas_set_num_threads(3) };
                break;
            }
            drop(d);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let a_in = std::sync::Barrier::new(2);
        let a_out = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                with_single_threaded_blas(|| {
                    assert_eq!(threads(), 1);
                    a_in.wait();
                });
                a_out.wait();
            });
            s.spawn(|| {
                a_in.wait();
                with_single_threaded_blas(|| {
                    a_out.wait();
                    assert_eq!(
                        threads(),
                        1,
                        "a caller's exit restored the count under another"
                    );
                    // Nested inside.
                    with_single_threaded_blas(|| assert_eq!(threads(), 1));
                    assert_eq!(threads(), 1);
                });
            });
        });
        // Other tests of this binary may be inside now; the count is restored once none is.
        let d = blas_depth();
        if d.inside == 0 {
            assert_eq!(threads(), 3, "the count found at entry is restored");
        }
    }
}
