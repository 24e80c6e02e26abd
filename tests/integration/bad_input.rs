//! Bad input, attacker-style, for every subcommand: each case asserts the exit status, the one
//! `error:` line (it names the problem), and what is left on disk — nothing the user owns is
//! touched, no partial output stays behind, and no earlier output is lost.
//!
//! The classes (issue "Hardening"): data loss (overwrite without --force, --force on what
//! gguf-trace did not write, a failed command replacing good output), crashes and hangs (options
//! llama.cpp would assert on, hostile GGUF metadata, inconsistent run directories, endless chat
//! templates), wrong results with exit 0 (NaN states, options silently ignored), vague errors
//! (llama.cpp's own reason), and signals (SIGINT, SIGTERM, SIGKILL at any moment).

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::*;

// ---------------------------------------------------------------------------------------------
// Helpers: a snapshot of a directory tree, hostile model files, the CLI.

/// Run the binary with `args` in `work`, in a mount namespace of its own with a tmpfs mounted
/// with `opts` ("size=64k", "ro,size=64k") over `mount` (`unshare -rm`: no root needed where user
/// namespaces are allowed). Its stdout ends with `left:` and what the tmpfs then held.
#[cfg(target_os = "linux")]
fn on_tmpfs(work: &Path, mount: &Path, opts: &str, args: &[&str]) -> Output {
    let script = r#"dir=$1; opts=$2; shift 2
        mount -t tmpfs -o "$opts" tmpfs "$dir" || exit 99
        "$@"; rc=$?; echo "left:$(ls -A "$dir")"; exit $rc"#;
    let o = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", script, "sh", s(mount), opts])
        .arg(env!("CARGO_BIN_EXE_gguf-trace"))
        .args(args)
        .current_dir(work)
        .output()
        .unwrap();
    assert_ne!(
        o.status.code(),
        Some(99),
        "cannot mount a tmpfs in a user namespace (unshare -rm): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Run the binary in `work` and assert a clean failure mentioning `needle` that left `work` as
/// it was.
fn fails(work: &Path, args: &[&str], needle: &str) -> Output {
    // (`GGUF_TRACE_COUNT_CASES=FILE` lists the subcommand of every case, for counting.)
    if let Some(f) = std::env::var_os("GGUF_TRACE_COUNT_CASES") {
        use std::io::Write;
        let mut f = std::fs::File::options()
            .create(true)
            .append(true)
            .open(f)
            .unwrap();
        writeln!(f, "{}", args[0]).unwrap();
    }
    let before = snapshot(work);
    let o = bin().args(args).current_dir(work).output().unwrap();
    assert_clean_error(&o, needle, None);
    assert_unchanged(work, &before, &format!("{args:?}"));
    o
}

fn smol_path() -> PathBuf {
    model_path(SMOL).unwrap()
}

/// A copy of SmolLM2 with one change, made once per process in a shared directory.
fn variant(name: &str, make: impl FnOnce(&Path, &Path)) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let p = dir.path().join(name);
    if !p.exists() {
        let tmp = dir.path().join(format!("{name}.tmp"));
        make(&smol_path(), &tmp);
        std::fs::rename(&tmp, &p).unwrap();
    }
    p
}

/// Byte offset of the value of GGUF metadata key `key` (after its u64 length, name and u32 type).
fn meta_value_offset(bytes: &[u8], key: &str) -> (usize, u32) {
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .unwrap_or_else(|| panic!("key {key} not in the model"));
    let t = at + needle.len();
    let ty = u32::from_le_bytes(bytes[t..t + 4].try_into().unwrap());
    (t + 4, ty)
}

/// SmolLM2 with an unsigned 32-bit metadata value replaced.
fn with_u32(key: &str, value: u32) -> PathBuf {
    variant(&format!("{key}={value}.gguf"), |src, dst| {
        let mut b = std::fs::read(src).unwrap();
        let (off, ty) = meta_value_offset(&b, key);
        assert!(
            ty == 4 || ty == 5,
            "{key} is not a 32-bit integer (type {ty})"
        );
        b[off..off + 4].copy_from_slice(&value.to_le_bytes());
        std::fs::write(dst, b).unwrap();
    })
}

/// SmolLM2 with a 32-bit float metadata value replaced.
fn with_f32(key: &str, value: f32, tag: &str) -> PathBuf {
    variant(&format!("{key}={tag}.gguf"), |src, dst| {
        let mut b = std::fs::read(src).unwrap();
        let (off, ty) = meta_value_offset(&b, key);
        assert_eq!(ty, 6, "{key} is not a float32");
        b[off..off + 4].copy_from_slice(&value.to_le_bytes());
        std::fs::write(dst, b).unwrap();
    })
}

/// SmolLM2 claiming an architecture llama.cpp does not know ("llamx").
fn unknown_arch() -> PathBuf {
    variant("llamx.gguf", |src, dst| {
        let mut b = std::fs::read(src).unwrap();
        let (off, ty) = meta_value_offset(&b, "general.architecture");
        assert_eq!(ty, 8, "string");
        // u64 length then the bytes "llama".
        b[off + 8 + 4] = b'x';
        std::fs::write(dst, b).unwrap();
    })
}

/// SmolLM2 with NaN in block 0's attention norm: every state from point 1 on is NaN.
fn nan_weights() -> PathBuf {
    variant("nan.gguf", |src, dst| {
        let g = gguf_trace::llama::gguf::Gguf::open(src).unwrap();
        let t = g
            .tensors()
            .into_iter()
            .find(|t| t.name == "blk.0.attn_norm.weight")
            .unwrap();
        let mut b = std::fs::read(src).unwrap();
        for i in 0..t.size / 4 {
            let o = t.offset as usize + 4 * i;
            b[o..o + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        std::fs::write(dst, b).unwrap();
    })
}

/// SmolLM2 with another chat template (None: without one), through the gguf package's own tool.
fn with_template(name: &str, template: Option<&str>) -> PathBuf {
    variant(name, |src, dst| {
        let mut c = python();
        c.args([
            "-m",
            "gguf.scripts.gguf_new_metadata",
            s(src),
            s(dst),
            "--force",
        ]);
        match template {
            Some(t) => c.args(["--chat-template", t]),
            None => c.args(["--remove-metadata", "tokenizer.chat_template"]),
        };
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    })
}

/// A small finished run of SmolLM2 (two labels, three prompts each) that tests copy and damage.
fn base_run() -> &'static Path {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &RUN.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let pf = d.path().join("p.jsonl");
        let body: String = ["a", "b", "c"]
            .iter()
            .flat_map(|x| {
                [
                    format!("{{\"text\": \"I love {x} so much\", \"label\": \"pos\"}}\n"),
                    format!("{{\"text\": \"I hate {x} so much\", \"label\": \"neg\"}}\n"),
                ]
            })
            .collect();
        std::fs::write(&pf, body).unwrap();
        ok(
            d.path(),
            &["trace", "-m", s(&smol_path()), "-f", "p.jsonl", "-o", "run"],
        );
        let run = d.path().join("run");
        (d, run)
    })
    .1
}

/// Copy a run directory into `work/name`.
fn copy_run(work: &Path, name: &str) -> PathBuf {
    let dst = work.join(name);
    let src = base_run();
    std::fs::create_dir_all(dst.join("states")).unwrap();
    for e in walk(src) {
        let rel = e.strip_prefix(src).unwrap();
        if e.is_file() {
            std::fs::copy(&e, dst.join(rel)).unwrap();
        }
    }
    dst
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Model files: inspect, trace and quantize refuse damaged or hostile GGUFs with a reason.

#[test]
fn model_files() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(w.join("empty.gguf"), b"").unwrap();
    std::fs::write(w.join("notes.gguf"), b"this is not a model at all").unwrap();
    std::fs::create_dir(w.join("dir.gguf")).unwrap();
    let bytes = std::fs::read(smol_path()).unwrap();
    std::fs::write(w.join("truncated.gguf"), &bytes[..bytes.len() / 3]).unwrap();
    std::fs::write(w.join("header.gguf"), &bytes[..20]).unwrap();
    let (block0, heads0, width0) = (
        with_u32("llama.block_count", 0),
        with_u32("llama.attention.head_count", 0),
        with_u32("llama.embedding_length", 0),
    );
    let arch = unknown_arch();
    let eps_nan = with_f32("llama.attention.layer_norm_rms_epsilon", f32::NAN, "nan");
    let eps_neg = with_f32("llama.attention.layer_norm_rms_epsilon", -1.0, "neg");
    let cases: Vec<(String, &str)> = vec![
        (s(&eps_nan).into(), "layer_norm_rms_epsilon is not a number"),
        (s(&eps_neg).into(), "cannot be negative"),
        ("nope.gguf".into(), "cannot open model"),
        ("dir.gguf".into(), "is a directory"),
        ("empty.gguf".into(), "empty file"),
        ("notes.gguf".into(), "not a GGUF file"),
        ("header.gguf".into(), "not a readable GGUF"),
        ("truncated.gguf".into(), "beyond the end of the file"),
        (s(&block0).into(), "block_count = 0"),
        (s(&heads0).into(), "head_count is 0"),
        (s(&width0).into(), "embedding_length = 0"),
        // llama.cpp's own reason, not only "failed to load".
        (s(&arch).into(), "unknown model architecture: 'llamx'"),
    ];
    for (model, needle) in &cases {
        fails(w, &["inspect", model], needle);
        fails(w, &["trace", "-m", model, "-p", "x", "-o", "run"], needle);
        fails(
            w,
            &["quantize", model, "--type", "q8_0", "-o", "ladder"],
            needle,
        );
    }
    // -v shows llama.cpp's own log (it was silenced by every internal init).
    let o = bin()
        .args(["-v", "inspect", s(&smol_path())])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("llama_model_loader"),
        "-v shows no llama.cpp log"
    );
}

// ---------------------------------------------------------------------------------------------
// trace: prompts and options.

/// Sizes beyond what one decode can hold are lowered as llama.cpp lowers them (a batch to the KV
/// cache, a micro-batch to the batch), and run.json records the sizes llama.cpp ran with (the
/// context creation refuses any size llama.cpp would change itself); the states equal those of
/// the default sizes bit for bit.
#[test]
fn oversized_batches_run_as_llama_cpp_runs_them_and_are_recorded() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let m = smol_path();
    let trace = |dir: &str, extra: &[&str]| {
        let o = bin()
            .args([
                "trace",
                "-m",
                s(&m),
                "-p",
                "hello there",
                "-p",
                "a second prompt",
            ])
            .args(["--ctx", "32", "--n-seq", "2", "-o", s(&w.join(dir))])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let run: serde_json::Value =
            serde_json::from_slice(&std::fs::read(w.join(dir).join("run.json")).unwrap()).unwrap();
        run
    };
    let big = trace(
        "big",
        &["--batch-size", "4194304", "--ubatch-size", "4194304"],
    );
    assert_eq!(big["capture"]["n_batch"], 64, "--ctx 32 × 2 sequences");
    assert_eq!(big["capture"]["n_ubatch"], 64);
    assert_eq!(
        big["capture"]["settings"]["batch_size"], 4194304,
        "as given"
    );
    let small = trace("small", &["--batch-size", "64", "--ubatch-size", "64"]);
    for i in ["00000", "00001"] {
        let a: ndarray::Array3<f32> =
            ndarray_npy::read_npy(w.join(format!("big/states/{i}.npy"))).unwrap();
        let b: ndarray::Array3<f32> =
            ndarray_npy::read_npy(w.join(format!("small/states/{i}.npy"))).unwrap();
        assert_eq!(a, b, "prompt {i}");
    }
    assert_eq!(small["capture"]["n_batch"], 64);
}

#[test]
fn trace_prompts_and_options() {
    let m = smol_path();
    let m = s(&m);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let file = |name: &str, body: &[u8]| {
        std::fs::write(w.join(name), body).unwrap();
    };
    file(
        "dup.jsonl",
        b"{\"text\":\"a\",\"id\":\"x\"}\n{\"text\":\"b\",\"id\":\"x\"}\n",
    );
    file("bad.jsonl", b"{\"text\":\"a\"}\n\n{\"text\": oops}\n");
    file("num.jsonl", b"{\"text\": 42}\n");
    file("lab.jsonl", b"{\"text\": \"hi\", \"label\": [1]}\n");
    file("prompts.md", b"hello\n");
    file("latin1.txt", b"caf\xe9\n");
    file("comments.txt", b"# only a comment\n\n");
    std::fs::create_dir(w.join("folder.txt")).unwrap();
    let long = "word ".repeat(600);
    let t = |extra: &[&str], needle: &str| {
        let mut a = vec!["trace", "-m", m, "-o", "run"];
        a.extend(extra);
        fails(w, &a, needle);
    };
    t(&["-p", "   "], "empty prompt");
    t(&[], "no prompts");
    t(&["-f", "dup.jsonl"], "duplicate prompt id");
    t(&["-f", "bad.jsonl"], "bad.jsonl:3");
    t(
        &["-f", "num.jsonl"],
        "num.jsonl:1: missing string field \"text\"",
    );
    t(&["-f", "lab.jsonl"], "field \"label\" must be a string");
    t(&["-f", "prompts.md"], "unknown prompt file type");
    t(&["-f", "latin1.txt"], "not UTF-8");
    t(&["-f", "comments.txt"], "holds no prompts");
    t(&["-f", "folder.txt"], "is a directory");
    t(&["-f", "missing.txt"], "cannot read prompt file");
    t(&["-p", &long], "more than --ctx 512");
    t(
        &["-p", "hello", "--ctx", "4", "--generate", "8"],
        "raise --ctx",
    );
    t(&["-p", "hello", "--points", "31"], "out of range");
    t(&["-p", "hello", "--points", "5-2"], "backwards");
    t(&["-p", "hello", "--points", "x"], "not a point number");
    t(&["-p", "hello", "--threads", "0"], "--threads 0");
    t(&["-p", "hello", "--threads", "100000"], "--threads 100000");
    t(&["-p", "hello", "--ctx", "0"], "--ctx 0");
    t(
        &["-p", "hello", "--ctx", "99999999999"],
        "--ctx 99999999999",
    );
    t(&["-p", "hello", "--n-seq", "0"], "--n-seq 0");
    t(&["-p", "hello", "--n-seq", "1000"], "--n-seq 1000");
    t(&["-p", "hello", "--batch-size", "0"], "--batch-size");
    // Sizes that cross into llama.cpp as 32-bit ints (these segfaulted or were silently ignored).
    for (flag, v) in [
        ("--batch-size", "3000000000"),
        ("--batch-size", "2147483648"),
        ("--ubatch-size", "3000000000"),
        ("--ubatch-size", "4194305"),
    ] {
        t(
            &["-p", "hello", flag, v],
            &format!("{flag} {v}: must be between 1 and 4194304 tokens"),
        );
    }
    t(
        &["-p", "hello", "--generate", "18446744073709551615"],
        "--generate 18446744073709551615: at most 4194304 tokens",
    );
    t(&["-p", "hello", "--n-gpu-layers=-5"], "--n-gpu-layers -5");
    t(&["-p", "hello", "--lens", "--lens-k", "0"], "--lens-k 0");
    t(
        &["-p", "hello", "--lens", "--lens-k", "99999999"],
        "only 49152 tokens",
    );
    t(
        &["-p", "hello", "--lens", "--points", "0-5"],
        "needs every point",
    );
    t(&["-p", "hello", "--lens-all"], "required arguments");
    t(
        &["-p", "hello", "--control-scale", "2"],
        "--control-scale needs --control-vector",
    );
    t(
        &["-p", "hello", "--control-points", "2-5"],
        "--control-points needs --control-vector",
    );
    t(&["-p", "hello", "--system", "x"], "required arguments");
    t(&["-p", "hello", "--format", "xml"], "xml");
    t(
        &["-p", "hello", "--dtype", "f16", "--format", "csv"],
        "--dtype f16 applies to NPY",
    );
}

/// Options llama.cpp would abort on are adapted before it sees them: more sequences than
/// --batch-size decode fewer at a time and give the same states.
/// Paths are bytes (issue 21, class 3): a model, a prompt file and an output folder whose names
/// are not UTF-8 are opened as they are (llama.cpp gets the exact bytes), run.json records them
/// with `\xNN`, and where a name must be text (an output's own name; a path run.json hands to a
/// later command) the command refuses up front with a clear error and leaves nothing behind.
#[test]
fn paths_that_are_not_utf8() {
    use std::ffi::{OsStr, OsString};
    use std::os::unix::ffi::OsStringExt;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let raw = |b: &[u8]| OsString::from_vec(b.to_vec());
    let (model, prompts, folder) = (raw(b"m\xff.gguf"), raw(b"p\xfd.txt"), raw(b"d\xfe"));
    std::os::unix::fs::symlink(smol_path(), w.join(&model)).unwrap();
    std::fs::write(w.join(&prompts), "hello there\nhow are you\n").unwrap();
    std::fs::create_dir(w.join(&folder)).unwrap();
    let run = Path::new(&folder).join("run");
    let go = |args: &[&OsStr]| bin().args(args).current_dir(w).output().unwrap();
    let o = go(&[
        "trace".as_ref(),
        "-m".as_ref(),
        &model,
        "-f".as_ref(),
        &prompts,
        "-o".as_ref(),
        run.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.join(&run).join("run.json")).unwrap()).unwrap();
    assert_eq!(manifest["model"]["path"], "m\\xFF.gguf");
    assert_eq!(manifest["prompts"][1]["source"], "p\\xFD.txt:2");
    let cmd = manifest["provenance"]["command_line"].as_array().unwrap();
    assert!(cmd.iter().any(|a| a == "d\\xFE/run"), "{cmd:?}");
    let html = Path::new(&folder).join("r.html");
    let o = go(&[
        "report".as_ref(),
        run.as_os_str(),
        "-o".as_ref(),
        html.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(w.join(&html).is_file());
    let o = go(&["inspect".as_ref(), &model]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("m\\xFF.gguf"));
    // Refused up front, with nothing left behind.
    let m = smol_path();
    let refused = |args: &[&OsStr], needle: &str| {
        let before = snapshot(w);
        let o = go(args);
        assert_clean_error(&o, needle, None);
        assert_unchanged(w, &before, &format!("{args:?}"));
    };
    let p = [
        "trace".as_ref(),
        "-m".as_ref(),
        m.as_os_str(),
        "-p".as_ref(),
        "hi".as_ref(),
    ];
    let bad_out = raw(b"o\xfc");
    refused(
        &[&p[..], &["-o".as_ref(), bad_out.as_os_str()]].concat(),
        "an output name must be UTF-8",
    );
    for flag in ["--ablate", "--control-vector"] {
        refused(
            &[
                &p[..],
                &[
                    flag.as_ref(),
                    model.as_os_str(),
                    "-o".as_ref(),
                    "x".as_ref(),
                ],
            ]
            .concat(),
            &format!("{flag} m\\xFF.gguf: the path is not valid UTF-8"),
        );
    }
    refused(
        &[
            &p[..],
            &[
                "--patch-from".as_ref(),
                run.as_os_str(),
                "--patch-points".as_ref(),
                "3".as_ref(),
                "-o".as_ref(),
                "x".as_ref(),
            ],
        ]
        .concat(),
        "--patch-from d\\xFE/run: the path is not valid UTF-8",
    );
}

/// A full disk is named (issue 21, class 7): llama.cpp's GGUF writers (`direction`, `quantize`)
/// report only "gguf_write_to_file failed" / "iostream error"; every writer says "no space left
/// on …" and leaves nothing on the disk. Each case runs in its own mount namespace (`unshare -rm`,
/// no root needed where user namespaces are allowed) over a 64 KiB tmpfs.
#[test]
#[cfg(target_os = "linux")] // mount namespaces (unshare)
fn a_full_disk_is_named() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let run = copy_run(w, "run");
    let full = w.join("full");
    std::fs::create_dir(&full).unwrap();
    let m = smol_path();
    let cases: [&[&str]; 4] = [
        &[
            "direction",
            s(&run),
            "--labels",
            "pos,neg",
            "-o",
            "full/d.gguf",
        ],
        &["quantize", s(&m), "-o", "full/q", "--type", "q8_0"],
        &["report", s(&run), "-o", "full/r.html"],
        &["trace", "-m", s(&m), "-p", "hi", "-o", "full/run"],
    ];
    for args in cases {
        let o = on_tmpfs(w, &full, "size=64k", args);
        let needle = if args[0] == "trace" {
            "not enough disk space in full"
        } else {
            "no space left on"
        };
        assert_clean_error(&o, needle, None);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.ends_with("left:\n"),
            "{args:?} left files behind: {out}"
        );
    }
}

/// Errors that say what is wrong (issue 21, class 7): a device is not "an empty file" and is never
/// read forever (a model, a prompt file, a run.json, a phrase list), `.` and `/` are folders, a
/// dangling link is named as one (with or without --force), the same run twice is not a
/// comparison, and a folder that cannot be written is refused before any work — shown by giving a
/// model that does not exist, which would be the error if the work had started.
#[test]
#[cfg(target_os = "linux")] // mount namespaces (unshare)
fn errors_name_the_problem() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let m = smol_path();
    let m = s(&m);
    let run = copy_run(w, "run");
    // Links live outside `work`, whose snapshot would follow them.
    let odd_dir = tempfile::tempdir().unwrap();
    let odd = |name: &str| s(&odd_dir.path().join(name)).to_string();
    let link = |name: &str, to: &str| std::os::unix::fs::symlink(to, odd(name)).unwrap();
    link("zero.txt", "/dev/zero");
    link("dangling", "absent");
    std::fs::create_dir(odd("fake")).unwrap();
    link("fake/run.json", "/dev/zero");
    let (zero_txt, dangling, fake) = (odd("zero.txt"), odd("dangling"), odd("fake"));
    let trace =
        |more: &[&'static str]| -> Vec<&str> { [&["trace", "-m", m, "-p", "hi"], more].concat() };
    fails(
        w,
        &["trace", "-m", "/dev/zero", "-p", "hi", "-o", "x"],
        "is a character device, not a file",
    );
    fails(w, &["inspect", "/dev/zero"], "is a character device");
    fails(
        w,
        &["trace", "-m", m, "-f", &zero_txt, "-o", "x"],
        "zero.txt: cannot read prompt file: is a character device",
    );
    fails(
        w,
        &["report", &fake, "-o", "r.html"],
        "fake/run.json: is a character device",
    );
    fails(
        w,
        &[
            "report",
            "run",
            "-o",
            "r.html",
            "--refusal-phrases",
            "/dev/zero",
        ],
        "is a character device",
    );
    for o in [".", "..", "/"] {
        fails(w, &trace(&["-o", o, "--force"]), "names a folder");
    }
    fails(
        w,
        &[trace(&["-o"]), vec![&dangling]].concat(),
        "symbolic link to absent, which does not exist",
    );
    fails(
        w,
        &[trace(&["--force", "-o"]), vec![&dangling]].concat(),
        "symbolic link to absent",
    );
    assert_eq!(
        std::fs::read_dir(odd_dir.path()).unwrap().count(),
        3,
        "files left beside the links"
    );
    fails(
        w,
        &["report", "run", "run/", "-o", "r.html"],
        "are the same run",
    );
    fails(
        w,
        &["report", "run", "./run", s(&run), "-o", "r.html"],
        "are the same run",
    );
    // A read-only folder, in a mount namespace of its own.
    let ro = w.join("ro");
    std::fs::create_dir(&ro).unwrap();
    let missing = s(&w.join("no-such-model.gguf")).to_string();
    let cases: [&[&str]; 5] = [
        &[
            "patch",
            "-m",
            &missing,
            "--clean",
            "a",
            "--corrupt",
            "b",
            "-o",
            "ro/p.html",
        ],
        &["trace", "-m", &missing, "-p", "hi", "-o", "ro/run"],
        &[
            "compare", "-m", &missing, "-m", &missing, "-p", "hi", "-o", "ro/c",
        ],
        &["report", "run", "-o", "ro/r.html"],
        &["direction", "run", "--labels", "pos,neg", "-o", "ro/d.gguf"],
    ];
    for args in cases {
        let o = on_tmpfs(w, &ro, "ro,size=64k", args);
        assert_clean_error(&o, "ro is not writable (read-only", None);
        assert!(String::from_utf8_lossy(&o.stdout).ends_with("left:\n"));
    }
}

/// Recurrent models (issue 21, class 12): mamba, mamba2 and rwkv6 headers (written by the `gguf`
/// package as their converters write them: state-space or WKV keys, head_count 0 or absent) are
/// refused as recurrent by `trace` and `inspect`, not as "a model needs attention heads".
#[test]
fn recurrent_models_are_named() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    run_python(
        r#"
import sys, numpy as np, gguf
def make(path, arch, heads):
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(2); w.add_embedding_length(8); w.add_context_length(64)
    if arch.startswith("mamba"):
        for k, v in [("conv_kernel", 4), ("inner_size", 16), ("state_size", 16), ("time_step_rank", 1)]:
            w.add_uint32(f"{arch}.ssm.{k}", v)
    else:
        w.add_uint32(f"{arch}.wkv.head_size", 4)
    if heads is not None:
        w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
make(sys.argv[1] + "/mamba.gguf", "mamba", 0)
make(sys.argv[1] + "/mamba2.gguf", "mamba2", None)
make(sys.argv[1] + "/rwkv6.gguf", "rwkv6", 0)
"#,
        &[s(w)],
    );
    for arch in ["mamba", "mamba2", "rwkv6"] {
        let f = format!("{arch}.gguf");
        let needle = format!("{arch} is a recurrent architecture");
        fails(w, &["inspect", &f], &needle);
        fails(w, &["trace", "-m", &f, "-p", "hi", "-o", "x"], &needle);
    }
}

/// An abort inside llama.cpp before anything is checkpointed (issue 21, class 12: an embedding-only
/// Gemma variant fails `GGML_ASSERT(buffer)` at its first decode) leaves no staging folder and no
/// lock, and does not suggest `--resume`, which could not help. Driven through llama.cpp's own
/// `ggml_abort` at the first decode (`GGUF_TRACE_FAILPOINT=ggml-abort`); the other half — an abort
/// after a checkpoint keeps it and says `--resume` — is the dead-worker case in `rpc.rs`.
#[test]
fn an_abort_inside_llama_cpp_leaves_nothing_behind() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let m = smol_path();
    let m = s(&m);
    // compare refuses one model given twice: a second model.
    let g = model_path(GEMMA).unwrap();
    let g = s(&g);
    let cases: [&[&str]; 3] = [
        &["trace", "-m", m, "-p", "hi", "-o", "run"],
        &["compare", "-m", m, "-m", g, "-p", "hi", "-o", "cmp"],
        &[
            "patch",
            "-m",
            m,
            "--clean",
            "The capital of France is",
            "--corrupt",
            "The capital of Italy is",
            "-o",
            "p.html",
        ],
    ];
    for args in cases {
        let before = snapshot(w);
        let o = bin()
            .args(args)
            .env("GGUF_TRACE_FAILPOINT", "ggml-abort")
            .current_dir(w)
            .output()
            .unwrap();
        assert_clean_error(&o, "llama.cpp stopped: GGML_ASSERT(failpoint) failed", None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("nothing was written") && !err.contains("--resume"),
            "{err}"
        );
        assert_unchanged(w, &before, &format!("{args:?}"));
    }
}

/// A folder someone else creates at `-o` while a trace runs is not replaced at the end (issue 21,
/// class 6): the trace fails naming it, the folder and its file stay, nothing else is left.
#[test]
fn an_output_that_appears_meanwhile_is_left_alone() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    many_prompts(w);
    let m = smol_path();
    let child = spawn_until_journaled(w, &["trace", "-m", s(&m), "-f", "many.txt", "-o", "run"]);
    std::fs::create_dir(w.join("run")).unwrap();
    std::fs::write(w.join("run/notes.txt"), "mine").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_clean_error(&o, "run: it appeared while this command ran", None);
    assert_eq!(
        std::fs::read_to_string(w.join("run/notes.txt")).unwrap(),
        "mine"
    );
    let mut left: Vec<String> = std::fs::read_dir(w)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["many.txt", "run"]);
}

/// Wait (at most 120 s) until a process paused with `GGUF_TRACE_PAUSE=NAME:FILE` got there.
fn wait_paused(file: &Path, child: &mut std::process::Child) {
    let reached = PathBuf::from(format!("{}.reached", file.display()));
    let start = Instant::now();
    while !reached.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "ended before the pause"
        );
        assert!(start.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Interleavings of readers and writers (issue 21, class 6), each made certain by pausing a
/// process at the step in question: a report reading a run that a `--force` retrace replaces
/// mid-read says so (it read a read error or, worse, a mix of two runs before); two reports
/// writing one page cannot both pass the check that no other gguf-trace writes it (the check and
/// taking the lock were two steps); and the page the first writes is not replaced by the second.
#[test]
fn readers_and_writers_interleaved_are_told_apart() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let m = smol_path();
    let trace = |prompts: &[&str], extra: &[&str]| {
        let mut a = vec!["trace", "-m", s(&m), "-o", "run"];
        for p in prompts {
            a.extend(["-p", p]);
        }
        a.extend_from_slice(extra);
        ok(w, &a);
    };
    trace(&["The capital of France is", "Water boils at"], &[]);
    let go = w.join("go");
    let report = |pause: Option<String>| {
        let mut cmd = bin();
        if let Some(p) = pause {
            cmd.env("GGUF_TRACE_PAUSE", p);
        }
        cmd.args(["report", "run", "-o", "r.html"])
            .current_dir(w)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut reader = report(Some(format!("report-read:{}", go.display())));
    wait_paused(&go, &mut reader);
    trace(
        &["Something else entirely, and longer", "Another one"],
        &["--force"],
    );
    std::fs::write(&go, "").unwrap();
    let o = reader.wait_with_output().unwrap();
    assert_clean_error(&o, "run was replaced while it was being read", None);
    assert!(!w.join("r.html").exists());

    // The first report pauses between its check that nobody else writes the page and taking its
    // lock (holding the folder's guard), then again with everything staged before its commit. The
    // second starts meanwhile: it must wait for the guard and then find the first busy, not pass
    // the check in the gap (without the guard it did, and both wrote the page).
    let (go1, go2) = (w.join("go1"), w.join("go2"));
    let mut first = report(Some(format!(
        "busy-checked:{};commit:{}",
        go1.display(),
        go2.display()
    )));
    wait_paused(&go1, &mut first);
    let second = report(None);
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::write(&go1, "").unwrap();
    // The first now holds its lock until go2; the second ends on its own.
    let o2 = second.wait_with_output().unwrap();
    assert_clean_error(&o2, "r.html is being written by another gguf-trace", None);
    assert!(!w.join("r.html").exists());
    std::fs::write(&go2, "").unwrap();
    let o1 = first.wait_with_output().unwrap();
    assert!(
        o1.status.success(),
        "{}",
        String::from_utf8_lossy(&o1.stderr)
    );
    assert!(w.join("r.html").is_file());
}

#[test]
fn trace_adapts_batch_size_below_sequences() {
    let m = smol_path();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let args = |out: &'static str, extra: &[&'static str]| {
        let mut a = vec![
            "trace",
            "-m",
            s(&m),
            "-p",
            "The cat",
            "-p",
            "A dog ran",
            "-o",
            out,
        ];
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let a1 = args("small", &["--batch-size", "1", "--generate", "2"]);
    let o = ok(w, &a1.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(String::from_utf8_lossy(&o.stderr).contains("to fit --batch-size 1"));
    let a2 = args("default", &["--generate", "2"]);
    ok(w, &a2.iter().map(String::as_str).collect::<Vec<_>>());
    let (a, b) = (
        gguf_trace::run::Run::open(&w.join("small")).unwrap(),
        gguf_trace::run::Run::open(&w.join("default")).unwrap(),
    );
    assert_eq!(a.manifest.capture.n_seq, 1);
    for i in 0..2 {
        // SmolLM2 is bit-identical across batch shapes (capture tests).
        assert_eq!(a.states(i).unwrap(), b.states(i).unwrap());
    }
}

/// Chat templates: a model without one, one that loops for ever, one that grows without end, one
/// that drops the user's message — each a clear error, none a hang.
#[test]
fn trace_chat_templates() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let none = with_template("no-template.gguf", None);
    let endless = with_template(
        "endless.gguf",
        Some("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
    );
    let chunk = "y".repeat(1000);
    let huge_t = format!("{{% for i in range(100000) %}}{chunk}{{% endfor %}}");
    let huge = with_template("huge.gguf", Some(&huge_t));
    let lossy = with_template("lossy.gguf", Some("<|im_start|>assistant\n"));
    let chat = |model: &Path, needle: &str| {
        let start = Instant::now();
        fails(
            w,
            &[
                "trace",
                "-m",
                s(model),
                "--chat",
                "-p",
                "hello there",
                "-o",
                "run",
            ],
            needle,
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{needle}: too slow"
        );
    };
    chat(&none, "has no chat template");
    chat(&endless, "fuel");
    chat(&huge, "grew past");
    chat(&lossy, "drops the user message");
    // A system prompt the template ignores is refused as well (SmolLM2's own template keeps it).
    let user_only = with_template(
        "user-only.gguf",
        Some("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"),
    );
    fails(
        w,
        &[
            "trace",
            "-m",
            s(&user_only),
            "--chat",
            "--system",
            "Be brief.",
            "-p",
            "hello",
            "-o",
            "run",
        ],
        "drops the system message",
    );
}

// ---------------------------------------------------------------------------------------------
// Wrong results with exit 0: non-finite states and control vectors.

#[test]
fn nonfinite_states_are_never_written_silently() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let nan = nan_weights();
    fails(
        w,
        &["trace", "-m", s(&nan), "-p", "hello", "-o", "run"],
        "state at point 1, position 0 is NaN or infinite",
    );
    // With the explicit flag the run records where, and the report refuses it by name.
    ok(
        w,
        &[
            "trace",
            "-m",
            s(&nan),
            "-p",
            "hello",
            "-o",
            "run",
            "--allow-nonfinite",
        ],
    );
    let run = gguf_trace::run::Run::open(&w.join("run")).unwrap();
    let nf = run.manifest.prompts[0].nonfinite.clone().unwrap();
    assert_eq!((nf.point, nf.position), (1, 0));
    fails(
        w,
        &["report", "run", "-o", "r.html"],
        "holds non-finite states",
    );
    fails(
        w,
        &["direction", "run", "--labels", "a,b", "-o", "d.gguf"],
        "holds non-finite states",
    );

    // Control vectors: a NaN strength, a vector holding NaN, an overflowing strength.
    let cv = w.join("d.gguf");
    gguf_trace::llama::gguf::write_control_vector(
        &cv,
        "llama",
        &(1..30)
            .map(|il| (il, vec![0.5f32; 576]))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let nan_cv = w.join("nan.gguf");
    let mut v = vec![0.5f32; 576];
    v[7] = f32::NAN;
    gguf_trace::llama::gguf::write_control_vector(&nan_cv, "llama", &[(3, v)]).unwrap();
    let m = smol_path();
    let st = |extra: &[&str], needle: &str| {
        let mut a = vec!["trace", "-m", s(&m), "-p", "hello", "-o", "steered"];
        a.extend(extra);
        fails(w, &a, needle);
    };
    st(
        &["--control-vector", "d.gguf", "--control-scale", "nan"],
        "finite",
    );
    st(
        &["--control-vector", "d.gguf", "--control-scale", "inf"],
        "finite",
    );
    st(&["--control-vector", "nan.gguf"], "non-finite values");
    st(
        &["--control-vector", "d.gguf", "--control-scale", "1e38"],
        "NaN or infinite",
    );
    // Finite but beyond llama.cpp's f32 norms: every logit came out exactly 0 and the generation
    // empty, with exit 0 (issue 21, class 4).
    for scale in ["1e30", "1e20"] {
        st(
            &["--control-vector", "d.gguf", "--control-scale", scale],
            "saturated beyond llama.cpp's f32 arithmetic",
        );
    }
    st(&["--control-vector", "missing.gguf"], "cannot open model");
    st(
        &["--control-vector", s(&m)],
        "not a control-vector direction",
    );
    st(
        &["--control-vector", "d.gguf", "--control-points", "1-5"],
        "outside 2-30",
    );
}

// ---------------------------------------------------------------------------------------------
// Data loss: outputs are never overwritten without --force, and --force only replaces what
// gguf-trace wrote.

#[test]
fn outputs_are_never_lost() {
    let m = smol_path();
    let m = s(&m);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::create_dir(w.join("thesis")).unwrap();
    std::fs::write(w.join("thesis/thesis.tex"), "my thesis").unwrap();
    std::fs::write(w.join("notes.txt"), "mine").unwrap();
    std::fs::copy(m, w.join("model.gguf")).unwrap();
    copy_run(w, "run");

    // Hidden folders that merely look like gguf-trace's staging (no lock file of ours) are the
    // user's: a trace writing "x" leaves them alone.
    for d in [".gguf-trace-x.1.partial", ".gguf-trace-x.4000000.partial"] {
        std::fs::create_dir(w.join(d)).unwrap();
        std::fs::write(w.join(d).join("thesis.txt"), "mine").unwrap();
    }
    ok(w, &["trace", "-m", m, "-p", "x", "-o", "x"]);
    for d in [".gguf-trace-x.1.partial", ".gguf-trace-x.4000000.partial"] {
        assert_eq!(
            std::fs::read_to_string(w.join(d).join("thesis.txt")).unwrap(),
            "mine"
        );
        std::fs::remove_dir_all(w.join(d)).unwrap();
    }
    std::fs::remove_dir_all(w.join("x")).unwrap();

    // trace: a run directory holding the user's own files is not replaced either.
    let mine = copy_run(w, "annotated");
    std::fs::write(mine.join("notes.txt"), "my notes").unwrap();
    fails(
        w,
        &["trace", "-m", m, "-p", "x", "-o", "annotated", "--force"],
        "holds files gguf-trace did not write (notes.txt)",
    );
    // Without --force the refusal is already the one --force would give: never "pass --force"
    // for a folder --force cannot replace.
    fails(
        w,
        &["trace", "-m", m, "-p", "x", "-o", "thesis"],
        "not a gguf-trace run directory",
    );
    fails(
        w,
        &["trace", "-m", m, "-p", "x", "-o", "thesis", "--force"],
        "not a gguf-trace run directory",
    );
    fails(
        w,
        &["trace", "-m", m, "-p", "x", "-o", "notes.txt", "--force"],
        "not a gguf-trace run directory",
    );
    fails(
        w,
        &["trace", "-m", m, "-p", "x", "-o", "run"],
        "already exists",
    );
    fails(
        w,
        &["trace", "-m", m, "-p", "x", "-o", "notes.txt/run"],
        "notes.txt is a file, not a folder",
    );
    fails(
        w,
        &["trace", "-m", m, "-p", "x", "-o", "notes.txt/deeper/run"],
        "notes.txt is a file, not a folder",
    );
    fails(
        w,
        &["trace", "-m", m, "-p", "x", "-o", "."],
        "names a folder",
    );
    fails(
        w,
        &[
            "trace",
            "-m",
            m,
            "-p",
            "x",
            "-o",
            "/proc/gguf-trace-test-run",
        ],
        "/proc",
    );

    // report
    fails(
        w,
        &["report", "run", "-o", "run/run.json"],
        "not a gguf-trace report",
    );
    fails(
        w,
        &["report", "run", "-o", "run/run.json", "--force"],
        "not a gguf-trace report",
    );
    fails(
        w,
        &["report", "run", "-o", "notes.txt", "--force"],
        "not a gguf-trace report",
    );
    fails(w, &["report", "run", "-o", "run"], "is a directory");
    fails(
        w,
        &["report", "run", "-o", "notes.txt/r.html"],
        "notes.txt is a file, not a folder",
    );
    std::fs::write(w.join("r.metrics.csv"), "my,own,table\n").unwrap();
    fails(
        w,
        &["report", "run", "-o", "r.html"],
        "r.metrics.csv exists and is not",
    );
    fails(
        w,
        &["report", "run", "-o", "r.html", "--force"],
        "r.metrics.csv exists and is not",
    );
    std::fs::remove_file(w.join("r.metrics.csv")).unwrap();

    // direction
    fails(
        w,
        &[
            "direction",
            "run",
            "--labels",
            "pos,neg",
            "-o",
            "model.gguf",
        ],
        "not a control-vector GGUF",
    );
    fails(
        w,
        &[
            "direction",
            "run",
            "--labels",
            "pos,neg",
            "-o",
            "model.gguf",
            "--force",
        ],
        "not a control-vector GGUF",
    );
    fails(
        w,
        &[
            "direction",
            "run",
            "--labels",
            "pos,neg",
            "-o",
            "thesis",
            "--force",
        ],
        "not a control-vector GGUF",
    );

    // quantize: the existing file is kept, a non-GGUF is never replaced, -o must be a directory.
    std::fs::create_dir(w.join("ladder")).unwrap();
    std::fs::write(w.join("ladder/model.Q8_0.gguf"), "not a model").unwrap();
    fails(
        w,
        &["quantize", "model.gguf", "--type", "q8_0", "-o", "ladder"],
        "not a GGUF file",
    );
    fails(
        w,
        &[
            "quantize",
            "model.gguf",
            "--type",
            "q8_0",
            "-o",
            "ladder",
            "--force",
        ],
        "not a GGUF file",
    );
    fails(
        w,
        &[
            "quantize",
            "model.gguf",
            "--type",
            "q8_0",
            "-o",
            "notes.txt",
        ],
        "not a directory",
    );
    fails(
        w,
        &["quantize", "model.gguf", "--type", "q9_9", "-o", "ladder"],
        "q9_9",
    );
    fails(
        w,
        &[
            "quantize",
            "model.gguf",
            "--type",
            "q8_0",
            "-o",
            "ladder2",
            "--threads",
            "0",
        ],
        "--threads 0",
    );

    // compare
    fails(
        w,
        &["compare", "-m", m, "-p", "x", "-o", "cmp"],
        "at least two models",
    );
    fails(
        w,
        &[
            "compare", "-m", m, "-m", m, "-p", "x", "-o", "thesis", "--force",
        ],
        "not a gguf-trace compare directory",
    );
    fails(
        w,
        &[
            "compare", "-m", m, "-m", m, "-p", "x", "-o", "run", "--force",
        ],
        "not a gguf-trace compare directory",
    );
    fails(
        w,
        &[
            "compare",
            "-m",
            m,
            "-m",
            m,
            "-p",
            "x",
            "-o",
            "cmp",
            "--reference",
            "notes.txt",
        ],
        "not one of the -m models",
    );
    fails(
        w,
        &[
            "compare",
            "-m",
            m,
            "-m",
            "nope.gguf",
            "-p",
            "x",
            "-o",
            "cmp",
        ],
        "cannot open model",
    );
    assert_eq!(
        std::fs::read_to_string(w.join("thesis/thesis.tex")).unwrap(),
        "my thesis"
    );

    // --force replaces what gguf-trace wrote: a run, a report (and drops its stale CSVs).
    ok(w, &["trace", "-m", m, "-p", "x", "-o", "run", "--force"]);
    ok(w, &["report", "run", "-o", "r.html"]);
    std::fs::write(w.join("r.drift.csv"), "run,level\n").unwrap();
    ok(w, &["report", "run", "-o", "r.html", "--force"]);
    assert!(
        !w.join("r.drift.csv").exists(),
        "a stale CSV of our own stays"
    );
}

/// A compare that fails on its second model leaves the previous compare output as it was, and
/// nothing that blocks a re-run.
#[test]
fn a_failed_compare_keeps_the_previous_output() {
    let m = smol_path();
    let m = s(&m);
    let g = model_path(GEMMA).unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // A second model that is not the same file (compare refuses one file given twice).
    let m2 = w.join("second.gguf");
    std::fs::copy(m, &m2).unwrap();
    let m2 = s(&m2);
    ok(
        w,
        &[
            "compare",
            "-m",
            m,
            "-m",
            s(&g),
            "-p",
            "Hello there",
            "-o",
            "cmp",
        ],
    );
    assert!(w.join("cmp/compare.json").exists() && w.join("cmp/report.html").exists());
    let block0 = with_u32("llama.block_count", 0);
    fails(
        w,
        &[
            "compare",
            "-m",
            m,
            "-m",
            s(&block0),
            "-p",
            "Hello there",
            "-o",
            "cmp",
            "--force",
        ],
        "block_count = 0",
    );
    // A second model that loads but cannot trace the prompt fails after the first trace ran.
    let nan = nan_weights();
    fails(
        w,
        &[
            "compare",
            "-m",
            m,
            "-m",
            s(&nan),
            "-p",
            "Hello there",
            "-o",
            "cmp",
            "--force",
        ],
        "NaN or infinite",
    );
    fails(
        w,
        &[
            "compare",
            "-m",
            m,
            "-m",
            s(&nan),
            "-p",
            "Hello there",
            "-o",
            "fresh",
        ],
        "NaN or infinite",
    );
    // Models whose names clash with the compare directory's own files get numbered runs.
    std::fs::copy(m, w.join("report.html.gguf")).unwrap();
    ok(
        w,
        &[
            "compare",
            "-m",
            "report.html.gguf",
            "-m",
            m,
            "-p",
            "Hi",
            "-o",
            "clash",
        ],
    );
    assert!(w.join("clash/report.html").is_file() && w.join("clash/report.html-0").is_dir());
    // Nothing left at "fresh": a re-run without --force is not blocked.
    ok(
        w,
        &[
            "compare",
            "-m",
            m,
            "-m",
            m2,
            "-p",
            "Hello there",
            "-o",
            "fresh",
        ],
    );
    ok(
        w,
        &[
            "compare", "-m", m, "-m", m2, "-p", "Hi", "-o", "cmp", "--force",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// report and direction on damaged or inconsistent run directories: the file is named, no panic.

#[test]
fn damaged_runs() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let damage = |name: &str, f: &dyn Fn(&Path)| {
        let d = copy_run(w, name);
        f(&d);
    };
    damage("incomplete", &|d| {
        edit_json(&d.join("run.json"), |v| v["complete"] = false.into())
    });
    damage("badjson", &|d| {
        std::fs::write(d.join("run.json"), "{ not json").unwrap()
    });
    damage("schema", &|d| {
        edit_json(&d.join("run.json"), |v| v["schema_version"] = 99.into())
    });
    damage("points", &|d| {
        edit_json(&d.join("run.json"), |v| {
            v["capture"]["points"] = serde_json::json!([0, 1, 2])
        })
    });
    damage("points-range", &|d| {
        edit_json(&d.join("run.json"), |v| {
            let n = v["capture"]["points"].as_array().unwrap().len();
            v["capture"]["points"] = (0..n).map(|p| p * 7).collect::<Vec<_>>().into()
        })
    });
    damage("last", &|d| {
        // A valid NPY of the wrong shape.
        let a = ndarray::Array3::<f32>::zeros((2, 3, 4));
        ndarray_npy::write_npy(d.join("last.npy"), &a).unwrap();
    });
    damage("logits-missing", &|d| {
        std::fs::remove_file(d.join("logits.npy")).unwrap()
    });
    damage("states-missing", &|d| {
        std::fs::remove_file(d.join("states/00003.npy")).unwrap()
    });
    damage("states-truncated", &|d| {
        let p = d.join("states/00001.npy");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 100]).unwrap();
    });
    damage("states-garbage", &|d| {
        std::fs::write(d.join("states/00002.npy"), b"garbage").unwrap()
    });
    damage("escape", &|d| {
        edit_json(&d.join("run.json"), |v| {
            v["prompts"][0]["states_file"] = "../../../etc/passwd".into()
        })
    });
    damage("tokens", &|d| {
        edit_json(&d.join("run.json"), |v| {
            v["prompts"][1]["positions"] = serde_json::json!([0, 1, 2, 3, 4, 5, 6, 7, 8, 90])
        })
    });
    damage("lens", &|d| {
        edit_json(&d.join("run.json"), |v| {
            v["lens"] = serde_json::json!({"k": 5, "positions": "last", "output_tensor": "x",
                "norm": "rms", "eps": 1e-5, "softcap": 0.0, "self_check_max_abs_diff": 0.0,
                "tolerance": 0.01, "valid": true})
        })
    });
    damage("nan-last", &|d| {
        let mut a: ndarray::Array3<f32> = ndarray_npy::read_npy(d.join("last.npy")).unwrap();
        a[[0, 5, 3]] = f32::NAN;
        ndarray_npy::write_npy(d.join("last.npy"), &a).unwrap();
    });
    damage("dup-states", &|d| {
        edit_json(&d.join("run.json"), |v| {
            v["prompts"][1]["states_file"] = v["prompts"][0]["states_file"].clone()
        })
    });
    damage("label-type", &|d| {
        edit_json(&d.join("run.json"), |v| v["prompts"][0]["label"] = 5.into())
    });
    std::fs::create_dir(w.join("empty")).unwrap();
    let cases = [
        ("empty", "not a gguf-trace run directory"),
        ("missing", "not a gguf-trace run directory"),
        ("incomplete", "incomplete run"),
        ("badjson", "invalid run.json"),
        ("schema", "unsupported schema_version 99"),
        ("points", "capture.point_tensors and capture.points differ"),
        ("points-range", "are not sorted, unique points"),
        ("last", "last.npy: shape [2, 3, 4]"),
        ("logits-missing", "logits.npy: missing"),
        ("states-missing", "00003.npy: missing"),
        ("states-truncated", "00001.npy"),
        ("states-garbage", "00002.npy"),
        ("escape", "is not this prompt's file"),
        ("tokens", "prompt 1: positions"),
        ("lens", "lens.json"),
        ("nan-last", "last.npy: holds a NaN or infinite value"),
        ("dup-states", "is not this prompt's file"),
        ("label-type", "line"),
    ];
    for (run, needle) in cases {
        let o = fails(w, &["report", run, "-o", "r.html"], needle);
        // Each cause once: no message repeats its own cause.
        let line = String::from_utf8_lossy(&o.stderr).to_string();
        let parts: Vec<&str> = line.trim().split(": ").collect();
        for win in parts.windows(2) {
            assert_ne!(win[0], win[1], "repeated cause in {line}");
        }
        fails(
            w,
            &["direction", run, "--labels", "pos,neg", "-o", "d.gguf"],
            needle,
        );
    }
    let base = copy_run(w, "good");
    let _ = base;
    fails(
        w,
        &["report", "good", "-o", "r.html", "--reference", "badjson"],
        "not one of the runs",
    );
    fails(
        w,
        &["direction", "good", "--labels", "pos", "-o", "d.gguf"],
        "--labels",
    );
    fails(
        w,
        &["direction", "good", "--labels", "pos,pos", "-o", "d.gguf"],
        "two different labels",
    );
    fails(
        w,
        &["direction", "good", "--labels", "pos,kind", "-o", "d.gguf"],
        "label \"kind\" is not in",
    );
}

// ---------------------------------------------------------------------------------------------
// Signals: SIGINT and SIGTERM stop cleanly; SIGKILL leaves leftovers that the next command
// writing the same place removes (and says so); the previous output always survives.

fn many_prompts(w: &Path) {
    let body: String = (0..400)
        .map(|i| format!("Prompt number {i} asks about something long and winding, again and again and again.\n"))
        .collect();
    std::fs::write(w.join("many.txt"), body).unwrap();
}

#[test]
fn signals_during_a_trace() {
    let m = smol_path();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    many_prompts(w);
    ok(w, &["trace", "-m", s(&m), "-p", "previous", "-o", "run"]);
    let previous = snapshot(&w.join("run"));
    let args = [
        "trace",
        "-m",
        s(&m),
        "-f",
        "many.txt",
        "--generate",
        "8",
        "-o",
        "run",
        "--force",
    ];
    for signal in ["INT", "TERM"] {
        let (code, seen) = interrupt_when(w, &args, || journaled(w, "") > 0, signal);
        assert_eq!(code, Some(130), "SIG{signal}: {seen:?}");
        assert_eq!(
            seen.iter().filter(|l| l.starts_with("error:")).count(),
            1,
            "{seen:?}"
        );
        // The prompts already on disk are kept for --resume, and the user is told how.
        assert!(
            seen.iter()
                .any(|l| l.contains("interrupted after") && l.contains("--resume")),
            "{seen:?}"
        );
        assert_unchanged(&w.join("run"), &previous, &format!("SIG{signal}"));
        for e in std::fs::read_dir(w).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                n == "run" || n == "many.txt" || n.starts_with(".gguf-trace-run."),
                "{n}"
            );
        }
        // (The next signal must hit a fresh trace, not this one's kept progress.)
        for e in std::fs::read_dir(w).unwrap() {
            let p = e.unwrap().path();
            if p.to_string_lossy().contains(".gguf-trace-run.") {
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
            }
        }
    }
    // SIGKILL leaves a partial run; the previous run is intact and the next trace cleans up.
    let (code, _) = interrupt_when(w, &args, || journaled(w, "") > 0, "KILL");
    assert_eq!(code, None);
    let left: Vec<String> = std::fs::read_dir(w)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".gguf-trace-run."))
        .collect();
    assert!(!left.is_empty(), "SIGKILL left nothing to clean up?");
    assert!(gguf_trace::run::Run::open(&w.join("run")).is_ok());
    // Started again without --resume or --force, the interrupted trace is named, not discarded
    // (issue 23, class 2): how many prompts are on disk, and which flag keeps or drops them.
    let before = snapshot(w);
    let o = bin()
        .args(["trace", "-m", s(&m), "-p", "again", "-o", "run"])
        .current_dir(w)
        .output()
        .unwrap();
    assert_clean_error(&o, "run has an interrupted trace with", None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("prompt(s) on disk") && err.contains("--resume") && err.contains("--force"),
        "{err}"
    );
    assert_unchanged(w, &before, "trace over an interrupted trace");
    let o = ok(
        w,
        &["trace", "-m", s(&m), "-p", "again", "-o", "run", "--force"],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("removed the leftovers of an interrupted gguf-trace"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let names: Vec<String> = std::fs::read_dir(w)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".gguf-trace")),
        "{names:?}"
    );
}

#[test]
fn signals_during_report_and_quantize() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // A large synthetic run makes the report take seconds.
    let big = w.join("big");
    gguf_trace::run::synthetic::write(&big, 3000, 30, 576, &["a", "b"], 3).unwrap();
    ok(w, &["report", "big", "-o", "r.html"]);
    let before = snapshot(w);
    // Each signal lands at a step made certain by a pause point (a fixed delay raced the
    // command: on a fast machine it could end first, on a slow one the signal came before the
    // step the case is about): while the runs are read, and with everything staged just before
    // the commit.
    for point in ["report-read", "commit"] {
        for signal in ["INT", "TERM"] {
            let (code, seen) = interrupt_at(
                w,
                &["report", "big", "-o", "r.html", "--force"],
                point,
                signal,
            );
            assert_eq!(code, Some(130), "report SIG{signal} at {point}: {seen:?}");
            assert!(seen.iter().any(|l| l.contains("interrupted")), "{seen:?}");
            assert_unchanged(w, &before, &format!("report SIG{signal} at {point}"));
        }
    }
    // SIGKILL with the page staged: the staging stays, and the next report removes it and says so.
    let (code, _) = interrupt_at(
        w,
        &["report", "big", "-o", "r.html", "--force"],
        "commit",
        "KILL",
    );
    assert_eq!(code, None);
    let staged = std::fs::read_dir(w)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            n.to_string_lossy().ends_with(".partial")
        })
        .count();
    assert_eq!(staged, 1, "the killed report left its staging");
    let o = ok(w, &["report", "big", "-o", "r.html", "--force"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("note:"), "{err}");
    let names: Vec<String> = std::fs::read_dir(w)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".gguf-trace")),
        "{names:?} / {err}"
    );

    // quantize: an F32 copy of SmolLM2 takes seconds to write.
    std::fs::create_dir(w.join("ladder")).unwrap();
    let m = smol_path();
    let before = snapshot(w);
    // The signal lands while llama.cpp writes the file: once its staged copy has bytes.
    let writing = || {
        std::fs::read_dir(w.join("ladder"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .filter_map(|e| std::fs::read_dir(e.path()).ok())
            .flatten()
            .flatten()
            .any(|f| f.metadata().is_ok_and(|m| m.len() > 0))
    };
    for signal in ["INT", "TERM"] {
        let (code, seen) = interrupt_when(
            w,
            &["quantize", s(&m), "--type", "f32", "-o", "ladder"],
            writing,
            signal,
        );
        assert_eq!(code, Some(130), "quantize SIG{signal}: {seen:?}");
        assert!(seen.iter().any(|l| l.contains("interrupted")), "{seen:?}");
        assert_unchanged(w, &before, &format!("quantize SIG{signal}"));
    }
}

/// Two commands writing the same output at once: the second is refused while the first runs.
#[test]
fn a_second_writer_of_the_same_output_is_refused() {
    let m = smol_path();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    many_prompts(w);
    let args = ["trace", "-m", s(&m), "-f", "many.txt", "-o", "run"];
    let (code, seen) = interrupt_when(
        w,
        &args,
        || {
            if journaled(w, "") == 0 {
                return false;
            }
            let o = bin().args(args).current_dir(w).output().unwrap();
            assert_clean_error(&o, "is being written by another gguf-trace", None);
            true
        },
        "INT",
    );
    assert_eq!(code, Some(130), "{seen:?}");
}

/// An RPC "worker" that accepts the connection and never answers: llama.cpp blocks inside, but
/// Ctrl-C still ends the command (exit 130) within seconds.
#[test]
fn ctrl_c_ends_a_trace_blocked_on_a_silent_worker() {
    let m = smol_path();
    let work = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            held.push(c);
        }
    });
    let start = Instant::now();
    let (code, seen) = interrupt(
        work.path(),
        &[
            "trace",
            "-m",
            s(&m),
            "-p",
            "hi",
            "--rpc",
            &endpoint,
            "-o",
            "run",
        ],
        "",
        Duration::from_millis(2000),
        "INT",
    );
    assert_eq!(code, Some(130), "{seen:?}");
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(!work.path().join("run").exists());
}

/// The tool's own CLI parsing errors are one line too (clap), and unknown subcommands fail.
#[test]
fn cli_usage_errors() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let o = bin().args(["frobnicate"]).current_dir(w).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = bin()
        .args(["trace", "--positions", "some"])
        .current_dir(w)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("error:"));
    assert!(snapshot(w).is_empty());
}
