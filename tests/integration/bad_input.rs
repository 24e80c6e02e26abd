//! Bad input: one `error:` line naming the problem, non-zero exit, no crash, no complete run.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::require;

fn trace_err(model: &str, extra: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = vec!["trace", "-m", model, "-o", s(&out)];
    args.extend(extra);
    let o = run_bin(&args);
    assert_clean_error(&o, needle, Some(&out));
}

#[test]
fn bad_model_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    trace_err(s(&missing), &["-p", "x"], "cannot open model");
    trace_err(s(dir.path()), &["-p", "x"], "is a directory");
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    trace_err(s(&empty), &["-p", "x"], "empty file");
    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, b"this is not a model at all").unwrap();
    trace_err(s(&text), &["-p", "x"], "not a GGUF file");
    let o = run_bin(&["inspect", s(&text)]);
    assert_clean_error(&o, "not a GGUF file", None);

    let path = require!(model_path(SMOL));
    let bytes = std::fs::read(&path).unwrap();
    let trunc = dir.path().join("truncated.gguf");
    std::fs::write(&trunc, &bytes[..bytes.len() / 3]).unwrap();
    trace_err(s(&trunc), &["-p", "x"], "could not load the model");
    let o = run_bin(&["inspect", s(&trunc)]);
    assert_clean_error(&o, "could not load the model", None);
}

#[test]
fn bad_prompts() {
    let path = require!(model_path(SMOL));
    let m = s(&path);
    let dir = tempfile::tempdir().unwrap();
    trace_err(m, &["-p", "   "], "empty prompt");
    trace_err(m, &[], "no prompts");
    let dup = dir.path().join("dup.jsonl");
    std::fs::write(
        &dup,
        "{\"text\":\"a\",\"id\":\"x\"}\n{\"text\":\"b\",\"id\":\"x\"}\n",
    )
    .unwrap();
    trace_err(m, &["-f", s(&dup)], "duplicate prompt id");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\":\"a\"}\n\n{\"text\": oops}\n").unwrap();
    trace_err(m, &["-f", s(&bad)], "bad.jsonl:3");
    let md = dir.path().join("prompts.md");
    std::fs::write(&md, "hello\n").unwrap();
    trace_err(m, &["-f", s(&md)], "unknown prompt file type");
    let long = "word ".repeat(600);
    trace_err(m, &["-p", &long], "more than --ctx 512");
    trace_err(
        m,
        &["-p", "hello", "--ctx", "4", "--generate", "8"],
        "raise --ctx",
    );
    trace_err(m, &["-p", "hello", "--points", "31"], "out of range");
}

#[test]
fn bad_output_directories() {
    let path = require!(model_path(SMOL));
    let m = s(&path);
    let dir = tempfile::tempdir().unwrap();
    // Existing directory without --force: refused, and left untouched.
    let existing = dir.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("keep.txt"), "mine").unwrap();
    let o = run_bin(&["trace", "-m", m, "-p", "x", "-o", s(&existing)]);
    assert_clean_error(&o, "--force", None);
    assert_eq!(
        std::fs::read_to_string(existing.join("keep.txt")).unwrap(),
        "mine"
    );
    // With --force it is replaced by a complete run.
    let o = run_bin(&["trace", "-m", m, "-p", "x", "-o", s(&existing), "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(existing.join("run.json").exists() && !existing.join("keep.txt").exists());
    // A parent that does not exist / is a file / cannot be written (even by root).
    let o = run_bin(&[
        "trace",
        "-m",
        m,
        "-p",
        "x",
        "-o",
        s(&dir.path().join("no/such/dir")),
    ]);
    assert_clean_error(&o, "no such directory", None);
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let o = run_bin(&["trace", "-m", m, "-p", "x", "-o", s(&file.join("run"))]);
    assert_clean_error(&o, "cannot write", None);
    let o = run_bin(&[
        "trace",
        "-m",
        m,
        "-p",
        "x",
        "-o",
        "/proc/gguf-trace-test-run",
    ]);
    // (/proc reports no free space, so the disk-space check is what refuses it: still one line naming /proc.)
    assert_clean_error(&o, "/proc", None);
}

#[test]
fn ctrl_c_during_a_trace_leaves_no_run() {
    let path = require!(model_path(GEMMA));
    let dir = tempfile::tempdir().unwrap();
    let pf = dir.path().join("many.txt");
    let body: String = (0..400).map(|i| format!("Prompt number {i} asks about something long and winding, again and again and again.\n")).collect();
    std::fs::write(&pf, body).unwrap();
    let out = dir.path().join("run");
    let mut child = bin()
        .args([
            "trace",
            "-m",
            s(&path),
            "-f",
            s(&pf),
            "-o",
            s(&out),
            "--generate",
            "8",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("trace started");
        seen.push(line.clone());
        if line.contains("estimated output") {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "trace finished before it could be interrupted"
    );
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        seen.push(l);
    }
    assert_eq!(status.code(), Some(130), "stderr: {seen:?}");
    assert!(start.elapsed() < Duration::from_secs(120));
    assert!(
        seen.iter().filter(|l| l.starts_with("error:")).count() == 1,
        "{seen:?}"
    );
    assert!(seen.iter().any(|l| l.contains("interrupted")), "{seen:?}");
    assert!(!out.exists(), "an interrupted trace left {}", out.display());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "partial files left behind: {left:?}");
}
