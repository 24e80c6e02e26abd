//! Resumable runs: a trace killed at any moment (SIGKILL, SIGINT, an abort at a named point inside
//! the final write — `GGUF_TRACE_FAILPOINT`) is completed by `--resume` into a run identical to an
//! uninterrupted one; `--resume` with another model or other prompts is refused.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

const N: usize = 96;

fn prompts(w: &Path, name: &str, n: usize) {
    let body: String = (0..n)
        .map(|i| format!("Prompt number {i} asks about something long and winding, again.\n"))
        .collect();
    std::fs::write(w.join(name), body).unwrap();
}

fn args<'a>(m: &'a str, file: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["trace", "-m", m, "-f", file, "--generate", "4", "-o", out]
}

/// Two run directories hold the same results: every data file byte for byte, and run.json apart
/// from what differs by nature (creation time, timings, command line and provenance).
fn assert_same_run(a: &Path, b: &Path) {
    assert_same_data(a, b);
    assert_eq!(
        std::fs::read_dir(b.join("states")).unwrap().count(),
        N,
        "one states file per prompt"
    );
    let json = |d: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("run.json")).unwrap()).unwrap();
        for k in ["created", "timings", "provenance"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v
    };
    assert_eq!(json(a), json(b), "run.json differs beyond timestamps");
    let hidden: Vec<_> = std::fs::read_dir(a.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".gguf-trace"))
        .collect();
    assert!(hidden.is_empty(), "leftovers: {hidden:?}");
}

#[test]
fn resume_after_any_interruption_equals_an_uninterrupted_run() {
    let m = model_path(SMOL).unwrap();
    let m = s(&m);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    prompts(w, "p.txt", N);
    ok(w, &args(m, "p.txt", "reference"));
    let reference = w.join("reference");

    // SIGKILL before the first prompt is on disk, then SIGKILL mid-run, then Ctrl-C mid-run
    // (which says how to resume), then --resume to the end.
    let a = args(m, "p.txt", "run");
    let (code, _) = interrupt(w, &a, "estimated output", Duration::from_millis(0), "KILL");
    assert_eq!(code, None);
    let mut r = a.clone();
    r.push("--resume");
    let (code, _) = interrupt_when(w, &r, || journaled(w, "") > 0, "KILL");
    assert_eq!(code, None);
    let before = journaled(w, "");
    let (code, seen) = interrupt_when(w, &r, || journaled(w, "") > before, "INT");
    assert_eq!(code, Some(130), "{seen:?}");
    assert!(
        seen.iter().any(|l| l.contains("resuming")),
        "the second run did not resume: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("run the same command with --resume")),
        "{seen:?}"
    );
    assert!(!w.join("run").exists(), "an unfinished run looks complete");
    let o = ok(w, &r);
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming"));
    assert_same_run(&w.join("run"), &reference);

    // Abort while run.json is being written, and right after: --resume finishes without
    // tracing again. An abort in the middle of the swap leaves the previous run, restored by the
    // next command.
    for point in ["run-json", "after-run-json"] {
        let out = format!("fp-{point}");
        let a = args(m, "p.txt", &out);
        let o = bin()
            .args(&a)
            .current_dir(w)
            .env("GGUF_TRACE_FAILPOINT", point)
            .output()
            .unwrap();
        assert!(
            o.status.code().is_none(),
            "{point}: the failpoint did not abort"
        );
        assert!(!w.join(&out).exists());
        let mut r = a.clone();
        r.push("--resume");
        let o = ok(w, &r);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("{N} of {N} prompt(s) already on disk")),
            "{err}"
        );
        assert_same_run(&w.join(&out), &reference);
    }
    let a = [&args(m, "p.txt", "run")[..], &["--force"]].concat();
    let o = bin()
        .args(&a)
        .current_dir(w)
        .env("GGUF_TRACE_FAILPOINT", "swap")
        .output()
        .unwrap();
    assert!(o.status.code().is_none());
    assert!(!w.join("run").exists(), "the swap had begun");
    // Any later command writing "run" puts the previous run back first.
    let o = bin()
        .args(["trace", "-m", m, "-p", "x", "-o", "run"])
        .current_dir(w)
        .output()
        .unwrap();
    assert_clean_error(&o, "already exists", None);
    assert!(String::from_utf8_lossy(&o.stderr).contains("restored the previous output"));
    assert_same_run(&w.join("run"), &reference);

    // A complete run is left alone by --resume.
    let o = ok(w, &[&args(m, "p.txt", "run")[..], &["--resume"]].concat());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already complete"));
}

#[test]
fn resume_refuses_other_inputs() {
    let m = model_path(SMOL).unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    prompts(w, "p.txt", N);
    prompts(w, "q.txt", N - 1);
    std::fs::copy(&m, w.join("copy.gguf")).unwrap();
    let a = args(s(&m), "p.txt", "run");
    let (code, _) = interrupt_when(w, &a, || journaled(w, "") > 0, "KILL");
    assert_eq!(code, None);
    let refuse = |extra: &[&str], model: &str, file: &str| {
        let before = snapshot(w);
        let mut r = args(model, file, "run");
        r.extend(extra);
        r.push("--resume");
        let o = bin().args(&r).current_dir(w).output().unwrap();
        assert_clean_error(
            &o,
            "another model file, other options or other prompts",
            None,
        );
        // The interrupted trace is left exactly as it was.
        assert_unchanged(w, &before, &format!("{r:?}"));
    };
    refuse(&[], s(&m), "q.txt");
    refuse(&[], "copy.gguf", "p.txt");
    // Every option that changes what is measured or how it is stored.
    for extra in [
        &["--positions", "last"][..],
        &["--dtype", "f16"],
        &["--points", "0,5,10"],
        &["--lens"],
        &["--cache-type", "f32"],
        &["--no-repack"],
        &["--n-seq", "1"],
        &["--chat"],
        &["--format", "both"],
        &["--taps", "attn_out"],
    ] {
        refuse(extra, s(&m), "p.txt");
    }
    // The interrupted trace is still there for the right --resume.
    let o = ok(w, &[&a[..], &["--resume"]].concat());
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming"));
}

/// A damaged or edited staging directory is never trusted: a deleted or truncated states file, a
/// journal torn mid-line, a journaled prompt that no longer matches, and data edited without
/// changing any size (a NaN in a states file, a row of last.npy, a byte of tokens.csv: caught by
/// the journal's checksums) — the affected prompts are traced again and the run still equals an
/// uninterrupted one.
#[test]
fn resume_repairs_a_damaged_interrupted_trace() {
    let m = model_path(SMOL).unwrap();
    let m = s(&m);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    prompts(w, "p.txt", N);
    ok(w, &args(m, "p.txt", "reference"));
    let partial = |w: &Path| -> std::path::PathBuf {
        std::fs::read_dir(w)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(".partial"))
            .unwrap()
            .join("run")
    };
    type Damage = Box<dyn Fn(&Path)>;
    let damages: Vec<Damage> = vec![
        Box::new(|d: &Path| std::fs::remove_file(d.join("states/00001.npy")).unwrap()),
        Box::new(|d: &Path| {
            let p = d.join("states/00000.npy");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..100]).unwrap();
        }),
        Box::new(|d: &Path| {
            let p = d.join(".journal.jsonl");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() - 50]).unwrap();
        }),
        Box::new(|d: &Path| {
            let p = d.join(".journal.jsonl");
            let t = std::fs::read_to_string(&p).unwrap();
            let edited = t.replacen("Prompt number 0 ", "Prompt number X ", 1);
            assert_ne!(edited, t, "prompt 0 is not in the journal");
            std::fs::write(&p, edited).unwrap();
        }),
        // Same size, other content.
        Box::new(|d: &Path| {
            let p = d.join("states/00000.npy");
            let mut b = std::fs::read(&p).unwrap();
            let n = b.len();
            b[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
            std::fs::write(&p, &b).unwrap();
        }),
        Box::new(|d: &Path| {
            // Row 0 of last.npy starts right after its header.
            let p = d.join("last.npy");
            let mut b = std::fs::read(&p).unwrap();
            let start = b.iter().position(|&c| c == b'\n').unwrap() + 1;
            b[start + 8] ^= 0x40;
            std::fs::write(&p, &b).unwrap();
        }),
        Box::new(|d: &Path| {
            let p = d.join("tokens.csv");
            let t = std::fs::read_to_string(&p).unwrap();
            let edited = t.replacen(",Prom,", ",Prox,", 1);
            assert_ne!(edited, t, "no piece `Prom` in tokens.csv");
            std::fs::write(&p, edited).unwrap();
        }),
    ];
    for damage in damages {
        let a = args(m, "p.txt", "run");
        let (code, _) = interrupt_when(w, &a, || journaled(w, "") > 0, "KILL");
        assert_eq!(code, None);
        damage(&partial(w));
        ok(w, &[&a[..], &["--resume"]].concat());
        assert_same_run(&w.join("run"), &w.join("reference"));
        std::fs::remove_dir_all(w.join("run")).unwrap();
    }
}

#[test]
fn compare_resumes() {
    let m = model_path(SMOL).unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // The same model under a second path (compare refuses one file given twice); same stem, so
    // its run is numbered "-1".
    let m2 = w.join("copy").join(m.file_name().unwrap());
    std::fs::create_dir(w.join("copy")).unwrap();
    std::fs::copy(&m, &m2).unwrap();
    let (m, m2) = (s(&m), s(&m2));
    prompts(w, "p.txt", N);
    let a = [
        "compare",
        "-m",
        m,
        "-m",
        m2,
        "-f",
        "p.txt",
        "--generate",
        "4",
        "-o",
        "cmp",
    ];
    // Interrupt during the second model's trace.
    let (code, seen) = interrupt_when(w, &a, || journaled(w, "Q4_1-1") > 0, "INT");
    assert_eq!(code, Some(130), "{seen:?}");
    assert!(seen.iter().any(|l| l.contains("--resume")), "{seen:?}");
    assert!(!w.join("cmp").exists());
    // Another plan does not take over the interrupted compare, and leaves it as it was.
    prompts(w, "q.txt", N - 1);
    let before = snapshot(w);
    for other in [
        a.map(|x| if x == "p.txt" { "q.txt" } else { x }).to_vec(),
        [&a[..], &["--dtype", "f16"]].concat(),
        [&a[..], &["--lens"]].concat(),
    ] {
        let o = bin()
            .args([&other[..], &["--resume"]].concat())
            .current_dir(w)
            .output()
            .unwrap();
        assert_clean_error(&o, "interrupted compare of cmp was made with other", None);
        assert_unchanged(w, &before, &format!("{other:?}"));
    }
    // The same compare without --resume or --force names it and keeps it (never discards it).
    let o = bin().args(a).current_dir(w).output().unwrap();
    assert_clean_error(
        &o,
        "cmp has an interrupted compare with 1 of 2 run(s) finished",
        None,
    );
    assert_unchanged(w, &before, "compare over an interrupted compare");
    let o = ok(w, &[&a[..], &["--resume"]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("already complete"),
        "the first run was traced again: {err}"
    );
    assert!(err.contains("resuming"), "{err}");
    assert!(w.join("cmp/report.html").exists() && w.join("cmp/compare.json").exists());
    let names: Vec<_> = std::fs::read_dir(w)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".gguf-trace"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}
