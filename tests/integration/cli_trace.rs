//! The `trace` and `inspect` commands end to end, and the run directory read back by numpy.

use crate::common::*;
use crate::require;
use gguf_trace::run::Run;

/// numpy (an independent reader) checks shapes and values against run.json and our own reader.
const NUMPY_CHECK: &str = r#"
import sys, json, csv
import numpy as np
d = sys.argv[1]
m = json.load(open(f"{d}/run.json"))
assert m["complete"] is True and m["schema_version"] == 2
P = len(m["capture"]["points"]); E = m["model"]["n_embd"]; V = m["model"]["n_vocab"]; N = len(m["prompts"])
last = np.load(f"{d}/last.npy"); logits = np.load(f"{d}/logits.npy")
assert last.shape == (N, P, E) and last.dtype == np.float32, last.shape
assert logits.shape == (N, V) and logits.dtype == np.float32
out = {"sums": [], "last_match": True}
for p in m["prompts"]:
    s = np.load(f"{d}/{p['states_file']}")
    assert s.shape == (P, len(p["positions"]), E), s.shape
    j = p["positions"].index(p["n_prompt_tokens"] - 1)
    out["last_match"] &= bool(np.array_equal(s[:, j, :].astype(np.float32), last[p["index"]]))
    out["sums"].append(float(np.abs(s.astype(np.float64)).sum()))
rows = list(csv.DictReader(open(f"{d}/tokens.csv")))
assert len(rows) == sum(len(p["tokens"]) for p in m["prompts"])
out["argmax"] = [int(i) for i in logits.argmax(axis=1)]
# run.json's answers: the top 5 of logits.npy, with softmax probabilities (float64 here).
out["top_err"] = 0.0
for p in m["prompts"]:
    row = logits[p["index"]].astype(np.float64)
    prob = np.exp(row - row.max()); prob /= prob.sum()
    want = [int(i) for i in np.argsort(-row, kind="stable")[:5]]
    assert [t["id"] for t in p["top"]] == want, (p["top"], want)
    out["top_err"] = max(out["top_err"], max(abs(t["p"] - prob[t["id"]]) for t in p["top"]))
mrows = list(csv.DictReader(open(f"{d}/metrics.csv")))
assert len(mrows) == N * P, len(mrows)
pts = m["capture"]["points"]
for r in mrows:
    i, k = int(r["prompt"]), pts.index(int(r["point"]))
    want = float(np.linalg.norm(last[i, k].astype(np.float64)))
    assert abs(float(r["norm"]) - want) <= 1e-9 * want, (r["norm"], want)
    if k == P - 1:
        assert abs(float(r["cos_final"]) - 1.0) < 1e-9 and r["step"] == ""
print(json.dumps(out))
"#;

#[test]
fn run_directory_is_what_the_readme_says() {
    let path = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let pf = dir.path().join("prompts.jsonl");
    std::fs::write(&pf, "{\"text\": \"The capital of France is\", \"label\": \"fact\", \"id\": \"paris\"}\n{\"text\": \"Water boils at\", \"label\": \"fact\"}\n").unwrap();
    let out = dir.path().join("run");
    let o = run_bin(&[
        "trace",
        "-m",
        s(&path),
        "-f",
        s(&pf),
        "-p",
        "Hello",
        "--generate",
        "3",
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        s(&out),
        "stdout is just the run path"
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("estimated output"), "{stderr}");
    // No leftovers beside the run.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("partial")), "{names:?}");

    let run = Run::open(&out).unwrap();
    let m = &run.manifest;
    assert_eq!(m.prompts.len(), 3);
    assert_eq!(m.prompts[0].id, "p0"); // -p prompts come first
    assert_eq!(m.prompts[1].id, "paris");
    assert_eq!(m.prompts[1].label.as_deref(), Some("fact"));
    assert_eq!(m.prompts[2].id, "prompts:2");
    assert_eq!(m.model.architecture, "llama");
    assert_eq!(m.model.n_layer, 30);
    assert_eq!(
        m.provenance.model_sha256,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
    assert_eq!(m.capture.point_tensors[0], "embd");
    assert_eq!(m.capture.point_tensors[30], "l_out-29");
    assert!(
        m.prompts[1].generated_text.contains("Paris"),
        "{}",
        m.prompts[1].generated_text
    );

    let py: serde_json::Value = serde_json::from_str(&run_python(NUMPY_CHECK, &[s(&out)])).unwrap();
    assert_eq!(
        py["last_match"], true,
        "last.npy is the last prompt position of the states files"
    );
    // The recorded probabilities are the softmax of the stored logits: both sides sum in f64 in
    // another order, so they agree to rounding (measured ≤ 1e-16; 1e-12 leaves room).
    let top_err = py["top_err"].as_f64().unwrap();
    assert!(
        top_err <= 1e-12,
        "run.json's top probabilities are off by {top_err:e}"
    );
    let logits = run.logits().unwrap();
    for (i, rec) in m.prompts.iter().enumerate() {
        let st = run.states(i).unwrap();
        let ours: f64 = st.iter().map(|x| x.abs() as f64).sum();
        let theirs = py["sums"][i].as_f64().unwrap();
        assert!(
            (ours - theirs).abs() <= 1e-9 * theirs,
            "numpy reads other values than we wrote"
        );
        assert_eq!(st.shape()[1], rec.positions.len());
        let am = argmax_ref(logits.row(i).as_slice().unwrap());
        assert_eq!(py["argmax"][i].as_u64().unwrap() as usize, am);
        // The first generated token is the argmax of the stored logits, and the first of the
        // recorded answers, by id and text.
        assert_eq!(rec.tokens[rec.n_prompt_tokens] as usize, am);
        assert_eq!(rec.top.len(), 5);
        assert_eq!(rec.top[0].id as usize, am);
        assert_eq!(rec.top[0].piece, rec.pieces[rec.n_prompt_tokens]);
        assert!(rec.top.windows(2).all(|w| w[0].p >= w[1].p));
    }
}

#[test]
fn f16_and_csv_formats_hold_the_same_states() {
    let path = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("f32");
    let b = dir.path().join("f16");
    for (out, extra) in [(&a, vec!["--format", "both"]), (&b, vec!["--dtype", "f16"])] {
        let mut args = vec![
            "trace",
            "-m",
            s(&path),
            "-p",
            "Good morning",
            "--points",
            "0,15-16,30",
            "-o",
            s(out),
        ];
        args.extend(extra);
        let o = run_bin(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let ra = Run::open(&a).unwrap();
    let rb = Run::open(&b).unwrap();
    assert_eq!(ra.manifest.capture.points, vec![0, 15, 16, 30]);
    let sa = ra.states(0).unwrap();
    let sb = rb.states(0).unwrap();
    let d = max_rel_diff(sa.view(), sb.view());
    assert!(
        d > 0.0 && d < 1e-3,
        "f16 rounding should be small and non-zero: {d}"
    );
    // The CSV holds exactly the NPY values (shortest round-trip text, no rounding).
    let mut rdr = csv::Reader::from_path(a.join("states.csv")).unwrap();
    let hdr = rdr.headers().unwrap().clone();
    assert_eq!(&hdr[0], "prompt");
    assert_eq!(hdr.len(), 3 + 576);
    let mut n = 0;
    for rec in rdr.records() {
        let rec = rec.unwrap();
        let point: usize = rec[1].parse().unwrap();
        let pos: usize = rec[2].parse().unwrap();
        let k = ra
            .manifest
            .capture
            .points
            .iter()
            .position(|&p| p == point)
            .unwrap();
        let j = ra.manifest.prompts[0]
            .positions
            .iter()
            .position(|&p| p == pos)
            .unwrap();
        for d in 0..576 {
            let v: f32 = rec[3 + d].parse().unwrap();
            assert_eq!(v, sa[[k, j, d]]);
        }
        n += 1;
    }
    assert_eq!(n, 4 * sa.shape()[1]);
}

#[test]
fn inspect_reports_the_real_tensor_mix() {
    for (name, arch, layers, width, ftype, template) in [
        (SMOL, "llama", 30, 576, "Q4_1", true),
        (GEMMA, "gemma3", 18, 640, "Q4_K - Medium", false),
    ] {
        let path = require!(model_path(name));
        let o = run_bin(&["inspect", s(&path), "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["architecture"], arch);
        assert_eq!(v["n_layer"], layers);
        assert_eq!(v["n_embd"], width);
        assert_eq!(v["file_type"], ftype);
        assert_eq!(v["has_chat_template"], template);
        assert!(v["untraceable"].is_null());
        assert_eq!(v["trust"], "verified");
        let hist = v["tensor_types"].as_object().unwrap();
        let total: u64 = hist.values().map(|n| n.as_u64().unwrap()).sum();
        assert!(total > 100 && hist.contains_key("f32"));
        let text = run_bin(&["inspect", s(&path)]);
        let text = String::from_utf8_lossy(&text.stdout);
        // The verdict comes from the trace's own graph check, which `--no-check` skips.
        assert!(
            text.contains("traceable     yes: llama.cpp's graph checked"),
            "{text}"
        );
        let unchecked = run_bin(&["inspect", s(&path), "--no-check"]);
        let unchecked = String::from_utf8_lossy(&unchecked.stdout);
        assert!(
            unchecked.contains("traceable     not checked (--no-check)"),
            "{unchecked}"
        );
        assert!(
            text.contains("trust         verified against HF transformers"),
            "{text}"
        );
    }
}

#[test]
fn llama_cpp_sys_version_matches_cargo_lock() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    let pos = lock.find("name = \"llama-cpp-sys-2\"").unwrap();
    let ver = lock[pos..].lines().nth(1).unwrap();
    assert_eq!(
        ver,
        format!("version = \"{}\"", gguf_trace::llama::LLAMA_CPP_SYS_VERSION)
    );
}

/// The README's first commands in an empty folder (issue 23, class 2): `-o runs/paris` and
/// `-o reports/paris.html` make their folders, each command says what it wrote (a trace also the
/// report command that comes next), and a command that fails before writing makes no folder.
#[test]
fn outputs_make_their_folders_and_say_what_comes_next() {
    let m = model_path(SMOL).unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let o = ok(
        w,
        &[
            "trace",
            "-m",
            s(&m),
            "-p",
            "The capital of France is",
            "-o",
            "runs/paris",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("wrote runs/paris/ — next: gguf-trace report runs/paris -o runs/paris.html"),
        "{err}"
    );
    Run::open(&w.join("runs/paris")).unwrap();
    let o = ok(
        w,
        &["report", "runs/paris", "-o", "reports/deep/paris.html"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("wrote reports/deep/paris.html"), "{err}");
    assert!(w.join("reports/deep/paris.html").is_file());
    // Failing before anything is written: no folder is made.
    let o = bin()
        .args(["trace", "-m", "missing.gguf", "-p", "x", "-o", "other/run"])
        .current_dir(w)
        .output()
        .unwrap();
    assert_clean_error(&o, "missing.gguf", None);
    assert!(!w.join("other").exists());
}

/// The answer, everywhere: printed after a trace when asked (a block per prompt for a few, a table
/// for many), recorded in run.json, first on the report's page and in its answers CSV.
#[test]
fn the_answer_is_printed_recorded_and_on_the_page() {
    let m = require!(model_path(SMOL));
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(
        w.join("p.jsonl"),
        "{\"text\": \"The capital of France is\", \"label\": \"fact\", \"id\": \"paris\"}\n{\"text\": \"Water boils at\", \"id\": \"water\"}\n",
    )
    .unwrap();
    let o = ok(
        w,
        &[
            "trace",
            "-m",
            s(&m),
            "-f",
            "p.jsonl",
            "--generate",
            "4",
            "-o",
            "r",
            "--answers",
            "always",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.last(), Some(&"r"), "the path comes last: {out}");
    let run = Run::open(&w.join("r")).unwrap();
    let recs = &run.manifest.prompts;
    // Two prompts: a block of three lines each (prompt, answer, generated text), then the path.
    assert_eq!(lines.len(), 2 * 3 + 1, "{out}");
    assert_eq!(lines[0], "[paris · fact] The capital of France is", "{out}");
    for (k, rec) in recs.iter().enumerate() {
        let want = gguf_trace::answer::top_line(&rec.top, 5);
        assert!(
            lines[3 * k + 1].starts_with(&format!("  → {}", cut_chars(&want, 20))),
            "{out}"
        );
        let gen = gguf_trace::answer::one_line(&rec.generated_text);
        assert!(lines[3 * k + 2].contains(&cut_chars(&gen, 10)), "{out}");
    }
    // Invisible characters are shown: SmolLM2 answers these prompts with a token that starts
    // with a space (" Paris", " 100"): ␣, never a bare leading space.
    assert!(recs[0].top[0].piece.starts_with(' '), "{:?}", recs[0].top);
    assert!(lines[1].starts_with("  → ␣"), "{out}");

    // Piped without --answers: the path only (scripts read it).
    let o = ok(w, &["trace", "-m", s(&m), "-f", "p.jsonl", "-o", "q"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "q\n");

    // The page leads with the answers; the CSV holds them.
    ok(w, &["report", "r", "-o", "r.html"]);
    let html = std::fs::read_to_string(w.join("r.html")).unwrap();
    let body = html.split("<main>").nth(1).unwrap();
    let answers = body.find("<h2>Answers</h2>").expect("an Answers section");
    let first_figure = body.find("<figure>").unwrap();
    assert!(answers < first_figure, "the answers come before any figure");
    for rec in recs {
        let cell = gguf_trace::report::answers::top_html(&rec.top, 3);
        assert!(body.contains(&cell), "the page lacks {cell}");
    }
    let mut rdr = csv::Reader::from_path(w.join("r.answers.csv")).unwrap();
    let h = rdr.headers().unwrap().clone();
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), recs.len());
    let col = |name: &str| h.iter().position(|x| x == name).unwrap();
    for (r, rec) in rows.iter().zip(recs) {
        assert_eq!(r[col("id")], rec.id);
        assert_eq!(r[col("top1")], rec.top[0].piece);
        assert_eq!(r[col("top1_id")], rec.top[0].id.to_string());
        assert_eq!(r[col("p1")].parse::<f64>().unwrap(), rec.top[0].p);
        assert_eq!(r[col("generated")], rec.generated_text);
    }
}

fn cut_chars(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// One grammar: usage errors name the subcommand's own help, and the completions and man page
/// come from the same clap definitions (they know every option, e.g. trace's --answers).
#[test]
fn usage_errors_completions_and_the_man_page() {
    let work = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["trace", "-p", "x", "-o", "r"])
        .current_dir(work.path())
        .output()
        .unwrap();
    assert_clean_error(&o, "(see gguf-trace trace --help)", None);
    assert_eq!(o.status.code(), Some(2));
    // -t is the thread count everywhere, quantize included (its types are --type only).
    let o = bin()
        .args(["quantize", "m.gguf", "-t", "q8_0", "-o", "d"])
        .current_dir(work.path())
        .output()
        .unwrap();
    assert_clean_error(&o, "--threads", None);
    for (kind, needle) in [
        ("complete-bash", "--answers"),
        ("complete-zsh", "--answers"),
        ("complete-fish", "answers"),
        ("man", ".TH gguf-trace 1"),
    ] {
        let o = ok(work.path(), &["generate", kind]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains(needle), "{kind}: no {needle:?}");
    }
    // bash accepts the completion script and registers it.
    let o = ok(work.path(), &["generate", "complete-bash"]);
    std::fs::write(work.path().join("c.bash"), &o.stdout).unwrap();
    let b = std::process::Command::new("bash")
        .args(["-c", "source c.bash && complete -p gguf-trace"])
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(
        b.status.success() && String::from_utf8_lossy(&b.stdout).contains("gguf-trace"),
        "{}",
        String::from_utf8_lossy(&b.stderr)
    );
}
