//! Fuzzing the readers of untrusted input (issue 21, class 11): run.json, NPY headers, prompt
//! files (.txt, .jsonl), control-vector GGUF files and the resume journal. Each reader gets valid
//! files mutated at random (bit flips, bytes set, inserted, deleted, truncation, a number or a
//! string swapped for a hostile one: huge, negative, NaN, deep nesting, `/dev/zero`, `../`) and must
//! end in `Ok` or a clear error: no panic, no hang, no allocation out of proportion to the input.
//!
//! The allocation bound: bytes allocated in all while a reader runs (an upper bound on its peak) are
//! at most `ALLOC_FACTOR` × the input's size + `ALLOC_SLACK`. Valid inputs measured at most 9× +
//! 0.2 MiB (run.json parsed into a `serde_json::Value` and then into the manifest, states widened
//! to f32); the bound leaves room for that and catches what it is for: a size read from a header
//! and allocated before the file is checked to hold it.
//!
//! Case counts: `GGUF_TRACE_FUZZ_CASES` (default 2,000 per reader; each test prints its count and
//! time). A case running over 20 s is a hang: the watchdog prints it and aborts the binary. Cases are random per run; a failure prints the shrunk input that fails. Tests here run
//! one at a time (one allocation counter).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use gguf_trace::run::{self, Run};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// One fuzz test at a time: the allocation counter is global.
static SERIAL: Mutex<()> = Mutex::new(());

const ALLOC_FACTOR: usize = 64;
const ALLOC_SLACK: usize = 16 << 20;

fn cases() -> u32 {
    std::env::var("GGUF_TRACE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    /// Replace the number at or after the index.
    Number(usize, &'static str),
    /// Replace the JSON string at or after the index (its contents).
    Text(usize, &'static str),
}

const NUMBERS: &[&str] = &[
    "-1",
    "0",
    "1",
    "255",
    "65536",
    "2147483648",
    "4294967296",
    "18446744073709551615",
    "99999999999999999999999",
    "1e400",
    "-1e400",
    "NaN",
    "0.5",
    "null",
    "\"x\"",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "{}",
    "[]",
];

const TEXTS: &[&str] = &[
    "",
    "/dev/zero",
    "../../../../../../dev/zero",
    "/etc/passwd",
    "states/000000.npy",
    "last.npy",
    "\\u0000",
    "\\ud800",
    "x\\ny",
    "<f8",
    "|u1",
    "f16",
    "all",
    "resid_post",
];

fn mutation(focus: usize) -> impl Strategy<Value = Mutation> {
    // `focus` > 0 keeps most edits within the first `focus` bytes (an NPY header).
    let at = move || {
        if focus > 0 {
            (0..focus).boxed()
        } else {
            any::<usize>().boxed()
        }
    };
    prop_oneof![
        (at(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (at(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (at(), proptest::collection::vec(any::<u8>(), 1..24))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (at(), 1usize..64).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (at(), proptest::sample::select(NUMBERS)).prop_map(|(i, n)| Mutation::Number(i, n)),
        (at(), proptest::sample::select(TEXTS)).prop_map(|(i, t)| Mutation::Text(i, t)),
    ]
}

fn mutations(focus: usize) -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(focus), 1..5)
}

fn apply(base: &[u8], ms: &[Mutation]) -> Vec<u8> {
    let mut b = base.to_vec();
    for m in ms {
        let n = b.len().max(1);
        match m {
            Mutation::Flip(i, bit) => {
                if let Some(x) = b.get_mut(i % n) {
                    *x ^= 1 << bit;
                }
            }
            Mutation::Set(i, v) => {
                if let Some(x) = b.get_mut(i % n) {
                    *x = *v;
                }
            }
            Mutation::Insert(i, v) => {
                let at = (i % n).min(b.len());
                b.splice(at..at, v.iter().copied());
            }
            Mutation::Delete(i, len) => {
                let at = (i % n).min(b.len());
                let end = (at + len).min(b.len());
                b.drain(at..end);
            }
            Mutation::Truncate(i) => b.truncate(i % n),
            Mutation::Number(i, s) => {
                let from = i % n;
                let Some(start) = b[from.min(b.len())..]
                    .iter()
                    .position(|c| c.is_ascii_digit())
                    .map(|p| p + from)
                else {
                    continue;
                };
                let end = b[start..]
                    .iter()
                    .position(|c| !(c.is_ascii_digit() || b".eE+-".contains(c)))
                    .map_or(b.len(), |p| p + start);
                b.splice(start..end, s.bytes());
            }
            Mutation::Text(i, s) => {
                let from = i % n;
                let Some(q) = b[from.min(b.len())..]
                    .iter()
                    .position(|&c| c == b'"')
                    .map(|p| p + from + 1)
                else {
                    continue;
                };
                let end = b[q.min(b.len())..]
                    .iter()
                    .position(|&c| c == b'"')
                    .map_or(b.len(), |p| p + q);
                b.splice(q.min(end)..end, s.bytes());
            }
        }
    }
    b
}

/// Run `f` and assert it allocated in proportion to `input` bytes; returns what `f` returned.
fn bounded<T>(what: &str, input: usize, f: impl FnOnce() -> T) -> T {
    let region = Region::new(GLOBAL);
    let out = f();
    let used = region.change().bytes_allocated;
    let bound = ALLOC_FACTOR * input + ALLOC_SLACK;
    assert!(
        used <= bound,
        "{what}: allocated {used} bytes for an input of {input} bytes (bound {bound})"
    );
    out
}

fn run_cases<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = cases();
    let mut runner = TestRunner::new(Config {
        cases: n,
        // A failure prints its (shrunk) input; nothing is written into the source tree.
        failure_persistence: None,
        ..Config::default()
    });
    let t = Instant::now();
    // The watchdog: a case that runs 20 s hangs (every case here takes milliseconds).
    let current: std::sync::Arc<Mutex<(Instant, String)>> =
        std::sync::Arc::new(Mutex::new((Instant::now(), String::new())));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let (current, done, name) = (current.clone(), done.clone(), name.to_string());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let c = current.lock().unwrap_or_else(|e| e.into_inner());
                if c.0.elapsed().as_secs() >= 20 {
                    eprintln!("fuzz {name}: a case hangs: {}", c.1);
                    std::process::abort();
                }
            }
        })
    };
    // GGUF_TRACE_FUZZ_SHOW=1 prints each case before it runs (to find a hang).
    let show = std::env::var_os("GGUF_TRACE_FUZZ_SHOW").is_some();
    runner
        .run(&strategy, |v| {
            let shown = format!("{v:?}");
            if show {
                eprintln!("{name}: {shown}");
            }
            *current.lock().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), shown);
            test(v)
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    watchdog.join().unwrap();
    eprintln!(
        "fuzz {name}: {n} cases in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

fn dir_bytes(d: &Path) -> usize {
    walk(d)
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len() as usize))
        .sum()
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn copy_dir(src: &Path, dst: &Path) {
    let _ = std::fs::remove_dir_all(dst);
    for p in walk(src) {
        let to = dst.join(p.strip_prefix(src).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&p, &to).unwrap();
    }
}

/// Everything `report` reads from a run: the manifest with its checks (in `Run::open`), and every
/// data file. Returns how far it got: 0 refused at open, 1 an error while reading, 2 all read.
fn read_whole_run(dir: &Path) -> usize {
    let Ok(r) = Run::open(dir) else { return 0 };
    let mut all = r.validate().is_ok() & r.require_finite().is_ok();
    all &= r.last().is_ok() & r.lens().is_ok() & r.logits().is_ok();
    for i in 0..r.manifest.prompts.len() {
        all &= r.states(i).is_ok();
    }
    if let Ok(last) = r.last_states() {
        all &= last.prompt(0).is_ok();
    }
    1 + all as usize
}

/// How far the cases of a run fuzz got (see [`read_whole_run`]), printed and checked: the cases
/// must reach both ends, or the fuzz tests only the first parser.
struct Stages(Mutex<[u32; 3]>);

impl Stages {
    fn new() -> Stages {
        Stages(Mutex::new([0; 3]))
    }
    fn add(&self, s: usize) {
        self.0.lock().unwrap()[s] += 1;
    }
    fn check(&self, name: &str) {
        let s = *self.0.lock().unwrap();
        let n: u32 = s.iter().sum();
        eprintln!(
            "fuzz {name}: {} refused at open, {} failed while reading, {} read whole",
            s[0], s[1], s[2]
        );
        // Measured with 5,000 cases: 5% (run.json) and 6% (npy) read whole, the rest refused.
        for (stage, k) in [("refused", s[0]), ("read whole", s[2])] {
            assert!(k * 50 >= n, "{name}: only {k} of {n} cases {stage}");
        }
    }
}

/// A structural edit of a JSON document: the node at the index (in document order, wrapping) is
/// replaced by a hostile literal, removed, or (in an array) duplicated.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, &'static str),
    Remove(usize),
    Duplicate(usize),
}

fn json_edits() -> impl Strategy<Value = Vec<Edit>> {
    let literal = prop_oneof![
        proptest::sample::select(NUMBERS),
        proptest::sample::select(TEXTS)
            .prop_map(|t| -> &'static str { Box::leak(format!("\"{t}\"").into_boxed_str()) }),
    ];
    let edit = prop_oneof![
        (any::<usize>(), literal).prop_map(|(i, l)| Edit::Replace(i, l)),
        any::<usize>().prop_map(Edit::Remove),
        any::<usize>().prop_map(Edit::Duplicate),
    ];
    proptest::collection::vec(edit, 1..4)
}

fn pointers(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        _ => {}
    }
}

fn apply_json(base: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(base).unwrap();
    for e in edits {
        let mut ps = Vec::new();
        pointers(&v, String::new(), &mut ps);
        let (Edit::Replace(i, _) | Edit::Remove(i) | Edit::Duplicate(i)) = e;
        let Some(p) = ps.get(i % ps.len().max(1)).cloned() else {
            continue;
        };
        let (parent, key) = p.rsplit_once('/').unwrap();
        let key = key.replace("~1", "/").replace("~0", "~");
        match e {
            Edit::Replace(_, lit) => {
                *v.pointer_mut(&p).unwrap() = serde_json::from_str(lit)
                    .unwrap_or_else(|_| serde_json::Value::String(lit.to_string()));
            }
            Edit::Remove(_) | Edit::Duplicate(_) => match v.pointer_mut(parent).unwrap() {
                serde_json::Value::Object(m) => {
                    m.remove(&key);
                }
                serde_json::Value::Array(a) => {
                    let i: usize = key.parse().unwrap();
                    if matches!(e, Edit::Remove(_)) {
                        a.remove(i);
                    } else {
                        let x = a[i].clone();
                        a.insert(i, x);
                    }
                }
                _ => {}
            },
        }
    }
    serde_json::to_vec_pretty(&v).unwrap()
}

/// A small valid run (3 prompts, 4 blocks, width 8) in f32 and one in f16.
fn base_runs() -> &'static (tempfile::TempDir, Vec<PathBuf>) {
    static RUNS: std::sync::OnceLock<(tempfile::TempDir, Vec<PathBuf>)> =
        std::sync::OnceLock::new();
    RUNS.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let mut dirs = Vec::new();
        for (name, dtype) in [("f32", run::Dtype::F32), ("f16", run::Dtype::F16)] {
            let p = d.path().join(name);
            run::synthetic::write_with(&p, 3, 4, 8, &["a", "b"], 7, dtype).unwrap();
            Run::open(&p).unwrap().validate().unwrap();
            dirs.push(p);
        }
        (d, dirs)
    })
}

#[test]
fn fuzz_run_json() {
    let (_keep, bases) = base_runs();
    let work = tempfile::tempdir().unwrap();
    let case = work.path().join("run");
    // Half the cases edit bytes (syntax, truncation), half edit the document (values, fields).
    let strategy = (
        0..bases.len(),
        prop_oneof![mutations(0).prop_map(Ok), json_edits().prop_map(Err)],
    );
    let stages = Stages::new();
    run_cases("run.json", strategy, |(which, edit)| {
        let base = &bases[which];
        copy_dir(base, &case);
        let json = std::fs::read(base.join(run::RUN_JSON)).unwrap();
        let bytes = match &edit {
            Ok(ms) => apply(&json, ms),
            Err(edits) => apply_json(&json, edits),
        };
        std::fs::write(case.join(run::RUN_JSON), bytes).unwrap();
        stages.add(bounded("run.json", dir_bytes(&case), || {
            read_whole_run(&case)
        }));
        Ok(())
    });
    stages.check("run.json");
}

#[test]
fn fuzz_npy_headers() {
    let (_keep, bases) = base_runs();
    let work = tempfile::tempdir().unwrap();
    let case = work.path().join("run");
    let files = ["states/000000.npy", "last.npy", "logits.npy"];
    let strategy = (0..bases.len(), 0..files.len(), mutations(160));
    let stages = Stages::new();
    run_cases("npy", strategy, |(which, f, ms)| {
        let base = &bases[which];
        copy_dir(base, &case);
        let target = case.join(files[f]);
        if !target.exists() {
            return Ok(());
        }
        let bytes = std::fs::read(&target).unwrap();
        std::fs::write(&target, apply(&bytes, &ms)).unwrap();
        let size = dir_bytes(&case);
        bounded("npy header", size, || {
            let _ = run::npy::NpyHeader::read(&target);
            if let Ok(r) = run::read::NpyReader::open(&target) {
                let _ = r.read(0, 8);
            }
        });
        stages.add(bounded("npy in a run", size, || read_whole_run(&case)));
        Ok(())
    });
    stages.check("npy");
}

const PROMPTS_JSONL: &str = concat!(
    "{\"text\": \"The capital of France is\", \"label\": \"fact\", \"id\": \"p1\"}\n",
    "{\"text\": \"Écris un poème 🌊\\nsur la mer\", \"label\": \"poem\"}\n",
    "{\"id\": \"x\", \"text\": \"\\u00e9t\\u00e9\", \"label\": \"fact\", \"system\": \"Be brief.\"}\n",
);
const PROMPTS_TXT: &str = "# comment\nThe capital of France is\n\n  Écris un poème 🌊  \nlast line";

#[test]
fn fuzz_prompt_files() {
    let work = tempfile::tempdir().unwrap();
    let strategy = (
        any::<bool>(),
        prop_oneof![
            mutations(0).prop_map(Some),
            Just(None) // pure random bytes below
        ],
        proptest::collection::vec(any::<u8>(), 0..256),
    );
    run_cases("prompt files", strategy, |(jsonl, ms, random)| {
        let (name, base) = if jsonl {
            ("p.jsonl", PROMPTS_JSONL)
        } else {
            ("p.txt", PROMPTS_TXT)
        };
        let bytes = match &ms {
            Some(ms) => apply(base.as_bytes(), ms),
            None => random,
        };
        let p = work.path().join(name);
        std::fs::write(&p, &bytes).unwrap();
        bounded("prompt file", bytes.len(), || {
            let _ = gguf_trace::prompts::load_file(&p);
        });
        Ok(())
    });
}

#[test]
fn fuzz_control_vectors() {
    let work = tempfile::tempdir().unwrap();
    let base_path = work.path().join("base.gguf");
    let dirs: Vec<(usize, Vec<f32>)> = (1..=3)
        .map(|il| (il, (0..8).map(|j| (il * 10 + j) as f32).collect()))
        .collect();
    gguf_trace::llama::gguf::write_control_vector(&base_path, "llama", &dirs).unwrap();
    let base = std::fs::read(&base_path).unwrap();
    assert!(gguf_trace::cvec::load(&[(base_path.as_path(), 1.0)], 8).is_ok());
    let case = work.path().join("case.gguf");
    run_cases("control-vector GGUF", mutations(0), |ms| {
        let bytes = apply(&base, &ms);
        std::fs::write(&case, &bytes).unwrap();
        bounded("control vector", bytes.len(), || {
            let _ = gguf_trace::cvec::load(&[(case.as_path(), 1.0)], 8);
            let _ = gguf_trace::cvec::peak_point(&case);
        });
        Ok(())
    });
}

#[test]
fn fuzz_resume_journal() {
    let (_keep, bases) = base_runs();
    let r = Run::open(&bases[0]).unwrap();
    let base: String = r
        .manifest
        .prompts
        .iter()
        .map(|rec| {
            let e = run::JournalEntry {
                record: rec.clone(),
                lens: None,
                lens_diff: 0.0,
                csv_lengths: [10, 20, 30],
                checkpoint_size: 1,
                checksums: [("last.npy#0".to_string(), "00".repeat(32))].into(),
            };
            serde_json::to_string(&e).unwrap() + "\n"
        })
        .collect();
    let work = tempfile::tempdir().unwrap();
    let p = work.path().join(run::JOURNAL);
    std::fs::write(&p, &base).unwrap();
    assert_eq!(run::read_journal(&p).len(), r.manifest.prompts.len());
    run_cases("resume journal", mutations(0), |ms| {
        let bytes = apply(base.as_bytes(), &ms);
        std::fs::write(&p, &bytes).unwrap();
        bounded("journal", bytes.len(), || {
            let _ = run::read_journal(&p);
        });
        Ok(())
    });
}
