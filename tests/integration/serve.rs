//! `gguf-trace serve` on SmolLM2: OpenAI clients (curl, the `openai` Python package), states and
//! interventions equal to `trace`'s bit for bit (alone and decoded together), bad input, a full
//! queue, a client that leaves, shutdown, and the live page in Chromium.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ndarray::ArrayD;
use ndarray_npy::ReadNpyExt;
use serde_json::{json, Value};

use crate::common::*;
use crate::require;

/// A running `serve` on a free port; killed when dropped.
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        let mut child = bin()
            .args(["serve", s(model), "--port", "0", "--threads", "1"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| {
                panic!(
                    "serve printed no address: {line:?}; log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .to_string();
        Server {
            child,
            url,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// curl with a JSON body (None: GET); the status and the body.
    fn curl(&self, route: &str, body: Option<&str>, extra: &[&str]) -> (u16, String) {
        let o = self.curl_cmd(route, body, extra).output().unwrap();
        parse_curl(&o.stdout)
    }

    fn curl_cmd(&self, route: &str, body: Option<&str>, extra: &[&str]) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "-N", "--max-time", "300", "-w", "\n%{http_code}"]);
        c.args(extra);
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        c.arg(format!("{}{}", self.url, route.trim_start_matches('/')));
        c
    }

    fn post(&self, route: &str, body: &Value) -> (u16, Value) {
        let (code, text) = self.curl(route, Some(&body.to_string()), &[]);
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn ok(&self, route: &str, body: &Value) -> Value {
        let (code, v) = self.post(route, body);
        assert_eq!(code, 200, "{route} {body}: {v}");
        v
    }

    fn health(&self) -> Value {
        let (code, text) = self.curl("health", None, &[]);
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_curl(stdout: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The data lines of a server-sent event stream.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn npy(v: &Value) -> ArrayD<f32> {
    let b64 = v["npy"].as_str().unwrap_or_else(|| panic!("no npy in {v}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    ArrayD::<f32>::read_npy(&bytes[..]).unwrap()
}

fn same_bits(a: &ArrayD<f32>, b: &ArrayD<f32>) -> bool {
    a.shape() == b.shape() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// A control vector of random unit directions (seeded) for every SmolLM2 layer: what
/// `direction` writes, without its trace.
fn random_direction(path: &Path, width: usize, seed: u64) {
    let code = r#"
import sys, numpy as np
from gguf import GGUFWriter
path, width, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(seed)
w = GGUFWriter(path, "controlvector")
w.add_string("controlvector.model_hint", "llama")
w.add_int32("controlvector.layer_count", 29)
for il in range(1, 30):
    d = rng.standard_normal(width).astype(np.float32)
    w.add_tensor(f"direction.{il}", (d / np.linalg.norm(d) * 8).astype(np.float32))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"#;
    run_python(code, &[s(path), &width.to_string(), &seed.to_string()]);
}

fn trace_cli(model: &Path, prompt: &str, generate: usize, extra: &[&str], out: &Path) -> Value {
    let g = generate.to_string();
    let mut a = vec![
        "trace",
        "-m",
        s(model),
        "-p",
        prompt,
        "--generate",
        &g,
        "--ctx",
        "2048",
        "--threads",
        "1",
        "-o",
        s(out),
    ];
    a.extend(extra);
    let o = run_bin(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap()
}

fn states_file(run: &Path) -> ArrayD<f32> {
    ndarray_npy::read_npy(run.join("states/00000.npy")).unwrap()
}

/// curl and the `openai` Python client talk to `serve` unchanged; the answers are `trace`'s
/// greedy generations; streamed and whole answers agree; the lens rides along per token.
#[test]
fn serve_speaks_openai_to_curl_and_the_python_client() {
    let model = require!(model_path(SMOL));
    let srv = Server::start(&model, &[]);
    let h = srv.health();
    assert_eq!(h["status"], "ok");
    let models = srv.curl("v1/models", None, &[]);
    assert_eq!(models.0, 200);
    let prompt = "The capital of France is";
    let whole = srv.ok(
        "v1/completions",
        &json!({"prompt": prompt, "max_tokens": 8}),
    );
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(whole["usage"]["completion_tokens"], 8);
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    let dir = tempfile::tempdir().unwrap();
    let run = trace_cli(&model, prompt, 8, &[], &dir.path().join("plain"));
    assert_eq!(
        run["prompts"][0]["generated_text"].as_str().unwrap(),
        text,
        "serve's completion is trace's generation"
    );
    // Streaming with curl: the pieces add up to the whole answer; [DONE] ends it.
    let (code, body) = srv.curl(
        "v1/completions",
        Some(&json!({"prompt": prompt, "max_tokens": 8, "stream": true}).to_string()),
        &[],
    );
    assert_eq!(code, 200);
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );

    // Streamed rows are [points, n_embd] per token; a character the token limit cuts off
    // arrives with the last chunk, so streamed and whole answers are the same text.
    let body = json!({"prompt": "日本語の文章を書きます。日本", "max_tokens": 12,
        "trace": {"states": "inline", "points": "28-30", "positions": "last"}});
    let whole_jp = srv.ok("v1/completions", &body);
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let (code, sse_body) = srv.curl("v1/completions", Some(&streamed_body.to_string()), &[]);
    assert_eq!(code, 200);
    let data = sse_data(&sse_body);
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let joined: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(joined, whole_jp["choices"][0]["text"].as_str().unwrap());
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(c["trace"]["rows"]["shape"], json!([3, 576]), "{c:.300}");
    }

    // The openai package, as a user would write it (the trace extension through extra_body).
    let code = r#"
import sys, json, openai
c = openai.OpenAI(base_url=sys.argv[1] + "v1", api_key="unused", max_retries=0)
name = [m.id for m in c.models.list()][0]
r = c.completions.create(model=name, prompt=sys.argv[2], max_tokens=8)
q = "What is the capital of France?"
msgs = [{"role": "user", "content": q}]
ext = {"trace": {"lens_top_k": 2, "points": "28-30"}}
chunks = list(c.chat.completions.create(model=name, messages=msgs, max_tokens=8, stream=True, extra_body=ext))
w = c.chat.completions.create(model=name, messages=msgs, max_tokens=8, extra_body=ext)
print(json.dumps({
  "completion": r.choices[0].text,
  "stream": "".join((ch.choices[0].delta.content or "") for ch in chunks if ch.choices),
  "chunk_traces": [(ch.model_extra or {}).get("trace") for ch in chunks],
  "whole": w.choices[0].message.content,
  "whole_trace": (w.model_extra or {}).get("trace"),
  "finish": w.choices[0].finish_reason,
}))
"#;
    let out: Value = serde_json::from_str(run_python(code, &[&srv.url, prompt]).trim()).unwrap();
    assert_eq!(out["completion"].as_str().unwrap(), text);
    assert_eq!(
        out["stream"], out["whole"],
        "streamed and whole chat answers"
    );
    let chat_run = trace_cli(
        &model,
        "What is the capital of France?",
        8,
        &["--chat"],
        &dir.path().join("chat"),
    );
    assert_eq!(
        chat_run["prompts"][0]["generated_text"], out["whole"],
        "the chat answer is trace --chat's generation"
    );
    // Every generated token's chunk carries the lens at points 28-30, top 2; at the last point
    // the lens reads the model's own logits, so its top token is the token written.
    let traces: Vec<&Value> = out["chunk_traces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t.get("token").is_some())
        .collect();
    assert_eq!(traces.len(), 8);
    for t in &traces {
        let lens = t["lens"].as_array().unwrap();
        assert_eq!(
            lens.iter()
                .map(|r| r["point"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            [28, 29, 30]
        );
        assert!(lens.iter().all(|r| r["top"].as_array().unwrap().len() == 2));
        assert_eq!(lens[2]["top"][0]["id"], t["token"], "{t}");
    }
    assert_eq!(
        out["whole_trace"]["lens"].as_array().unwrap().len(),
        8,
        "the whole answer's trace has one lens reading per token"
    );
}

/// What `serve` hands back per request — tokens, inline states, a run directory — is what
/// `trace` computes for the same prompt and options, bit for bit: plain, steered and ablated
/// requests, each alone and all sent at once (decoded together where they share settings).
#[test]
fn serve_matches_trace_bit_for_bit_alone_and_together() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let vectors = dir.path().join("vectors");
    std::fs::create_dir(&vectors).unwrap();
    random_direction(&vectors.join("random.gguf"), 576, 7);
    let runs = dir.path().join("runs");
    let srv = Server::start(
        &model,
        &[
            "--vectors",
            s(&vectors),
            "--parallel",
            "4",
            "--runs",
            s(&runs),
        ],
    );
    let prompts = [
        "The capital of France is",
        "Once upon a time there was",
        "The best way to learn Rust is",
        "My favourite fruit is",
        "In 1492 Columbus",
        "Water boils at",
    ];
    let steer = json!({"vector": "random.gguf", "scale": 4.0, "points": "10-12"});
    let ablate = json!({"vector": "random.gguf", "points": "5-20", "direction": "each"});
    let kinds = ["plain", "plain", "steer", "steer", "ablate", "ablate"];
    let body = |i: usize| {
        let mut trace = json!({"states": "inline"});
        match kinds[i] {
            "steer" => trace["steer"] = steer.clone(),
            "ablate" => trace["ablate"] = ablate.clone(),
            _ => {}
        }
        json!({"prompt": prompts[i], "max_tokens": 6, "trace": trace})
    };
    // Alone, one after another.
    let alone: Vec<Value> = (0..6).map(|i| srv.ok("v1/completions", &body(i))).collect();
    // All at once, behind a long request of other settings, so that they queue and share
    // batches. Not left to timing: the six are sent while the blocker decodes, in order, then the
    // blocker is let go (a client that leaves ends its generation at the next token) and the
    // six start, two of each kind together.
    let mut blocker = srv
        .curl_cmd(
            "v1/completions",
            Some(
                &json!({"prompt": "Count to five hundred: 1, 2, 3,", "max_tokens": 400})
                    .to_string(),
            ),
            &[],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while srv.health()["decoding"].as_u64().unwrap() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the blocking request never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // One at a time, each waiting before the next is sent: arrival order is sending order, so
    // the two requests of each kind are next to each other in the queue.
    let children: Vec<Child> = (0..6)
        .map(|i| {
            let child = srv
                .curl_cmd("v1/completions", Some(&body(i).to_string()), &[])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            loop {
                let h = srv.health();
                if h["waiting"].as_u64().unwrap() == i as u64 + 1 {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline && h["decoding"].as_u64().unwrap() >= 1,
                    "request {i} did not wait behind the blocking one: {h}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            child
        })
        .collect();
    blocker.kill().unwrap();
    blocker.wait().unwrap();
    let together: Vec<Value> = children
        .into_iter()
        .map(|c| {
            let (code, text) = parse_curl(&c.wait_with_output().unwrap().stdout);
            assert_eq!(code, 200, "{text}");
            serde_json::from_str(&text).unwrap()
        })
        .collect();
    let h = srv.health();
    eprintln!("health after the concurrent requests: {h}");
    assert!(
        h["largest_batch"].as_u64().unwrap() >= 2,
        "requests that share settings were decoded together: {h}"
    );
    for i in 0..6 {
        let (a, t) = (&alone[i]["trace"], &together[i]["trace"]);
        assert_eq!(a["tokens"], t["tokens"], "request {i} ({})", kinds[i]);
        assert!(
            same_bits(&npy(&a["states"]), &npy(&t["states"])),
            "request {i} ({}): states alone vs together",
            kinds[i]
        );
        // The same request through `trace`.
        let mut extra: Vec<String> = Vec::new();
        let v = vectors.join("random.gguf");
        match kinds[i] {
            "steer" => extra.extend(
                [
                    "--control-vector",
                    s(&v),
                    "--control-scale",
                    "4",
                    "--control-points",
                    "10-12",
                ]
                .map(String::from),
            ),
            "ablate" => extra.extend(
                [
                    "--ablate",
                    s(&v),
                    "--ablate-points",
                    "5-20",
                    "--ablate-direction",
                    "each",
                ]
                .map(String::from),
            ),
            _ => {}
        }
        let out = dir.path().join(format!("cli-{i}"));
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let run = trace_cli(&model, prompts[i], 6, &extra, &out);
        assert_eq!(
            alone[i]["choices"][0]["text"].as_str().unwrap(),
            run["prompts"][0]["generated_text"].as_str().unwrap(),
            "request {i} ({})",
            kinds[i]
        );
        assert!(
            same_bits(&npy(&a["states"]), &states_file(&out)),
            "request {i} ({}): serve's states vs trace's",
            kinds[i]
        );
        if i % 2 == 0 {
            // states: "run" — a run directory on the server, served over HTTP.
            let mut b = body(i);
            b["trace"]["states"] = json!("run");
            let r = srv.ok("v1/completions", &b);
            assert_eq!(r["trace"]["tokens"], a["tokens"]);
            let id = r["trace"]["run"].as_str().expect("a run id");
            let (code, list) = srv.curl(&format!("runs/{id}"), None, &[]);
            assert_eq!(code, 200, "{list}");
            assert!(list.contains("states/00000.npy"), "{list}");
            let got = dir.path().join(format!("got-{i}.npy"));
            let (code, _) = srv.curl(
                &format!("runs/{id}/states/00000.npy"),
                None,
                &["-o", s(&got)],
            );
            assert_eq!(code, 200);
            let served: ArrayD<f32> = ndarray_npy::read_npy(&got).unwrap();
            assert!(
                same_bits(&served, &states_file(&out)),
                "request {i}: the run directory's states vs trace's"
            );
            // It is a normal run: `report` reads it from --runs.
            let html = dir.path().join(format!("report-{i}.html"));
            let o = run_bin(&["report", s(&runs.join(id)), "-o", s(&html)]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }
    // Continuous batching: a short request joins a long one that is generating, and is
    // answered while the long one goes on — with the bits it gets alone.
    let long_body = json!({"prompt": "Count from 1 to 1000: 1, 2, 3, 4,", "max_tokens": 300,
        "stream": true, "trace": {"states": "inline", "points": "0,15,30", "positions": "last"}});
    let short_body = json!({"prompt": prompts[1], "max_tokens": 4,
        "trace": {"states": "inline", "points": "0,15,30", "positions": "last"}});
    let short_alone = srv.ok("v1/completions", &short_body);
    let mut long = srv
        .curl_cmd("v1/completions", Some(&long_body.to_string()), &[])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let before = srv.health()["generated_tokens"].as_u64().unwrap();
    while srv.health()["generated_tokens"].as_u64().unwrap() < before + 5 {
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    let short_joined = srv.ok("v1/completions", &short_body);
    let h = srv.health();
    assert!(
        long.try_wait().unwrap().is_none() && h["decoding"] == 1,
        "the short request was answered while the long one still generates: {h}"
    );
    assert_eq!(
        short_joined["trace"]["tokens"],
        short_alone["trace"]["tokens"]
    );
    assert!(same_bits(
        &npy(&short_joined["trace"]["states"]),
        &npy(&short_alone["trace"]["states"])
    ));
    let (code, _) = parse_curl(&long.wait_with_output().unwrap().stdout);
    assert_eq!(code, 200);

    // An uploaded control vector steers as the same file named from --vectors.
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(vectors.join("random.gguf")).unwrap());
    let mut up_steer = steer.clone();
    up_steer.as_object_mut().unwrap().remove("vector");
    up_steer["data"] = json!(b64);
    let up = srv.ok(
        "v1/completions",
        &json!({"prompt": prompts[2], "max_tokens": 6, "trace": {"states": "inline", "steer": up_steer}}),
    );
    assert!(same_bits(
        &npy(&up["trace"]["states"]),
        &npy(&alone[2]["trace"]["states"])
    ));
    // Taps inside blocks and f16, as `trace --taps attn_out,mlp_out --dtype f16` writes them.
    let tapped = srv.ok(
        "v1/completions",
        &json!({"prompt": prompts[0], "max_tokens": 6,
            "trace": {"states": "inline", "taps": "attn_out,mlp_out", "dtype": "f16"}}),
    );
    let out = dir.path().join("cli-taps");
    let run = trace_cli(
        &model,
        prompts[0],
        6,
        &["--taps", "attn_out,mlp_out", "--dtype", "f16"],
        &out,
    );
    let f16 = |v: &Value| -> Vec<u16> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v["npy"].as_str().unwrap())
            .unwrap();
        ArrayD::<gguf_trace::run::npy::F16>::read_npy(&bytes[..])
            .unwrap()
            .iter()
            .map(|x| x.0.to_bits())
            .collect()
    };
    let f16_file = |rel: &str| -> Vec<u16> {
        let a: ArrayD<gguf_trace::run::npy::F16> = ndarray_npy::read_npy(out.join(rel)).unwrap();
        a.iter().map(|x| x.0.to_bits()).collect()
    };
    let t = &tapped["trace"];
    assert_eq!(t["states"]["dtype"], "f16");
    assert_eq!(
        f16(&t["states"]),
        f16_file(run["prompts"][0]["states_file"].as_str().unwrap())
    );
    for tap in ["attn_out", "mlp_out"] {
        let rel = run["prompts"][0]["tap_files"][tap].as_str().unwrap();
        let served = f16(&t["taps"][tap]);
        assert_eq!(
            served.len(),
            30 * 11 * 576,
            "{tap}: 30 blocks × 11 positions × 576"
        );
        assert!(served == f16_file(rel), "tap {tap}: serve vs trace");
    }
    // The interventions changed something (so the comparisons above can fail).
    let (p, st, ab) = (
        npy(&alone[0]["trace"]["states"]),
        npy(&alone[2]["trace"]["states"]),
        npy(&alone[4]["trace"]["states"]),
    );
    assert_eq!(p.shape()[0], 31);
    let plain_steered = srv.ok(
        "v1/completions",
        &json!({"prompt": prompts[2], "max_tokens": 6, "trace": {"states": "inline"}}),
    );
    assert!(!same_bits(&npy(&plain_steered["trace"]["states"]), &st));
    let plain_ablated = srv.ok(
        "v1/completions",
        &json!({"prompt": prompts[4], "max_tokens": 6, "trace": {"states": "inline"}}),
    );
    assert!(!same_bits(&npy(&plain_ablated["trace"]["states"]), &ab));
}

/// Bad requests get a 4xx with a JSON error that says what to fix; the server keeps serving.
#[test]
fn serve_refuses_bad_requests_clearly() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let vectors = dir.path().join("vectors");
    std::fs::create_dir(&vectors).unwrap();
    random_direction(&vectors.join("wide.gguf"), 640, 1);
    random_direction(&vectors.join("big.gguf"), 576, 2);
    let srv = Server::start(
        &model,
        &[
            "--vectors",
            s(&vectors),
            "--ctx",
            "64",
            "--max-body",
            "20000",
            "--api-key",
            "sesame",
        ],
    );
    let auth = ["-H", "Authorization: Bearer sesame"];
    let post = |body: &str| srv.curl("v1/completions", Some(body), &auth);
    let cases: Vec<(String, u16, &str)> = vec![
        ("{\"prompt\": \"Hi\", ".into(), 400, "parse"),
        ("[1, 2]".into(), 400, "invalid type"),
        (
            json!({"prompt": "Hi", "trace": {"pointz": "1"}}).to_string(),
            400,
            "trace.pointz",
        ),
        (
            json!({"prompt": "Hi", "trace": {"points": "0-99"}}).to_string(),
            400,
            "out of range",
        ),
        (
            json!({"prompt": "Hi", "trace": {"taps": "attn_oot"}}).to_string(),
            400,
            "trace.taps",
        ),
        (
            json!({"prompt": "Hi", "trace": {"steer": {"vector": "wide.gguf"}}}).to_string(),
            400,
            "width",
        ),
        (
            json!({"prompt": "Hi", "trace": {"steer": {"vector": "../etc/passwd"}}}).to_string(),
            400,
            "--vectors",
        ),
        (
            json!({"prompt": "Hi", "trace": {"ablate": {"data": "!!!"}}}).to_string(),
            400,
            "base64",
        ),
        (
            json!({"prompt": "word ".repeat(80)}).to_string(),
            400,
            "--ctx 64",
        ),
        (
            json!({"prompt": "Hi", "max_tokens": 100}).to_string(),
            400,
            "max_tokens 100",
        ),
        (json!({"prompt": "Hi", "n": 3}).to_string(), 400, "n: 3"),
        (json!({"prompt": "Hi", "echo": true}).to_string(), 400, "echo"),
        (json!({"prompt": "Hi", "logprobs": 2}).to_string(), 400, "logprobs"),
        (
            json!({"prompt": [504, 3575]}).to_string(),
            400,
            "token ids are not accepted",
        ),
        (
            json!({"prompt": "Hi", "max_tokens": 2, "trace": {"steer": {"vector": "big.gguf", "scale": 1e30}}}).to_string(),
            400,
            "lower trace.steer.scale",
        ),
        (
            json!({"prompt": "Hi", "max_tokens": 2, "trace": {"states": "inline", "dtype": "f16",
                "points": "29-30", "steer": {"vector": "big.gguf", "scale": 20000}}}).to_string(),
            400,
            "beyond f16's range",
        ),
        (
            json!({"prompt": "Hi", "stop": ["\n"]}).to_string(),
            400,
            "stop sequences are not supported",
        ),
        (
            json!({"prompt": ["a", "b"]}).to_string(),
            400,
            "one per request",
        ),
        (
            json!({"prompt": "x".repeat(30000)}).to_string(),
            413,
            "--max-body",
        ),
    ];
    for (body, want, needle) in &cases {
        let (code, text) = post(body);
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("not JSON for {body:.80}: {text}"));
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        eprintln!("{code} {msg}");
        assert_eq!(code, *want, "{body:.80}: {text}");
        assert!(msg.contains(needle), "{body:.80}: {msg:?} lacks {needle:?}");
    }
    // Chat: a role the template does not know.
    let (code, text) = srv.curl(
        "v1/chat/completions",
        Some(&json!({"messages": [{"role": "robot", "content": "hi"}]}).to_string()),
        &auth,
    );
    assert_eq!(code, 400, "{text}");
    // The API key: every route but /health.
    let (code, text) = srv.curl("v1/models", None, &[]);
    assert_eq!(code, 401, "{text}");
    assert!(text.contains("Authorization: Bearer"), "{text}");
    let (code, _) = srv.curl("v1/models", None, &["-H", "Authorization: Bearer nope"]);
    assert_eq!(code, 401);
    let (code, _) = srv.curl("", None, &[]);
    assert_eq!(code, 401, "the page too");
    assert_eq!(srv.curl("health", None, &[]).0, 200);
    let (code, text) = srv.curl("nowhere", None, &auth);
    assert_eq!(code, 404, "{text}");
    // A route with the wrong method: 405, as JSON.
    let (code, text) = srv.curl("v1/completions", None, &auth);
    assert_eq!(code, 405, "{text}");
    assert!(text.contains("take POST"), "{text}");
    // The scheme of the Authorization header is case-insensitive (RFC 7235).
    let (code, _) = srv.curl("v1/models", None, &["-H", "Authorization: bearer sesame"]);
    assert_eq!(code, 200);
    // After all that, the server still answers.
    let (code, text) = post(&json!({"prompt": "Hi", "max_tokens": 3}).to_string());
    assert_eq!(code, 200, "{text}");
    assert!(!srv.log().contains("panicked"), "{}", srv.log());
}

/// A full queue answers 503 with Retry-After; a client that leaves stops its generation at once;
/// SIGTERM finishes in-flight requests within the bound and exits cleanly.
#[test]
fn serve_queue_disconnect_and_shutdown() {
    let model = require!(model_path(SMOL));
    let srv = Server::start(&model, &["--parallel", "1", "--queue", "1"]);
    let long =
        json!({"prompt": "Count from 1 to 1000: 1, 2, 3, 4,", "max_tokens": 400, "stream": true})
            .to_string();
    // One decoding, two waiting (--parallel + --queue): the next ones are turned away.
    let busy: Vec<Child> = (0..3)
        .map(|_| {
            let c = srv
                .curl_cmd("v1/completions", Some(&long), &[])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(400));
            c
        })
        .collect();
    let (code, text) = srv.curl(
        "v1/completions",
        Some(&json!({"prompt": "Hi", "max_tokens": 2}).to_string()),
        &["-i"],
    );
    assert_eq!(code, 503, "{text}");
    assert!(text.to_lowercase().contains("retry-after: 1"), "{text}");
    for mut c in busy {
        // Both clients leave: their generations stop at the next token.
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let t0 = Instant::now();
    let h = loop {
        let h = srv.health();
        if h["decoding"] == 0 && h["waiting"] == 0 {
            break h;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "still decoding for clients that left: {h}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{h}");
    let generated = h["generated_tokens"].as_u64().unwrap();
    assert!(
        generated < 400,
        "the generations stopped when their clients left ({generated} tokens of 3 × 400)"
    );
    assert!(h["abandoned"].as_u64().unwrap() >= 1, "{h}");
    // The slot is free: a new request is served.
    let (code, text) = srv.curl(
        "v1/completions",
        Some(&json!({"prompt": "Hi", "max_tokens": 2}).to_string()),
        &[],
    );
    assert_eq!(code, 200, "{text}");

    // A client waiting for a whole (not streamed) answer that leaves stops it too.
    let before = srv.health();
    let whole =
        json!({"prompt": "Count from 1 to 1000: 1, 2, 3, 4,", "max_tokens": 400}).to_string();
    let mut c = srv
        .curl_cmd("v1/completions", Some(&whole), &[])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while srv.health()["generated_tokens"] == before["generated_tokens"] {
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
    }
    c.kill().unwrap();
    c.wait().unwrap();
    let t0 = Instant::now();
    let after = loop {
        let h = srv.health();
        if h["decoding"] == 0 {
            break h;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{h}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let n =
        after["generated_tokens"].as_u64().unwrap() - before["generated_tokens"].as_u64().unwrap();
    assert!(n < 400, "{n} tokens generated for a client that left");
    assert_eq!(
        after["abandoned"].as_u64().unwrap(),
        before["abandoned"].as_u64().unwrap() + 1,
        "{after}"
    );

    // Shutdown: SIGTERM while a request streams; it ends (cut at the bound) and the process
    // exits 0.
    drop(srv);
    let mut srv = Server::start(&model, &["--shutdown-timeout", "1"]);
    let streaming = srv
        .curl_cmd("v1/completions", Some(&long), &[])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it streams.
    let t0 = Instant::now();
    while srv.health()["generated_tokens"].as_u64().unwrap() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = srv.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit {status:?}: {}", srv.log());
    let (code, body) = parse_curl(&streaming.wait_with_output().unwrap().stdout);
    assert_eq!(code, 200);
    let data = sse_data(&body);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{body:.300}"
    );
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "cancelled", "{last}");
    assert!(srv.log().contains("shutting down"), "{}", srv.log());
}

/// The live page in a real headless Chromium (driven through the DevTools protocol): typed
/// prompt, tokens with their lens strips, the trajectory plot, and the steering controls that
/// apply to the next request — read back from the page and checked against the API's answer.
#[test]
fn serve_page_in_chromium() {
    let model = require!(model_path(SMOL));
    let node_modules = std::env::var_os("GGUF_TRACE_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("node/node_modules"));
    assert!(
        node_modules.join("puppeteer-core").is_dir(),
        "puppeteer-core is missing from {}; scripts/test installs it",
        node_modules.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let vectors = dir.path().join("vectors");
    std::fs::create_dir(&vectors).unwrap();
    random_direction(&vectors.join("random.gguf"), 576, 7);
    let srv = Server::start(&model, &["--vectors", s(&vectors)]);
    let drive = |actions: Value| -> Value {
        let o = Command::new("node")
            .arg(repo_root().join("tests/integration/drive_page.js"))
            .arg(&srv.url)
            .arg(actions.to_string())
            .env("NODE_PATH", &node_modules)
            .output()
            .expect("node runs");
        assert!(
            o.status.success(),
            "page driver: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let prompt = "The capital of France is";
    let page = drive(json!({"prompt": prompt, "max_tokens": 8}));
    eprintln!("{page:.400}");
    assert!(page["page_errors"].as_array().unwrap().is_empty(), "{page}");
    assert_eq!(page["error"], Value::Null, "{page}");
    // What the page shows is what the API answers for the same request.
    let api = srv.ok(
        "v1/completions",
        &json!({"prompt": prompt, "max_tokens": 8, "trace": {"lens_top_k": 1}}),
    );
    let tokens = page["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 8);
    let shown: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(shown, api["choices"][0]["text"].as_str().unwrap());
    // One lens strip per token, one cell per point (31), drawn; the last point's top token is
    // the token written, as the API's lens says.
    assert_eq!(page["strips"], 8);
    assert_eq!(page["cells"], 8 * 31);
    let api_lens = api["trace"]["lens"].as_array().unwrap();
    for (k, strip) in page["lens_top"].as_array().unwrap().iter().enumerate() {
        let api_top: Vec<&Value> = api_lens[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["top"][0]["id"])
            .collect();
        assert_eq!(
            strip.as_array().unwrap().iter().collect::<Vec<_>>(),
            api_top,
            "token {k}"
        );
    }
    // The trajectory: one path per token, through all 31 points.
    assert_eq!(page["drawn"], 8);
    assert_eq!(page["plot_points"].as_array().unwrap().len(), 8);
    assert!(page["plot_points"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n == 31));
    assert_eq!(page["plot_type"], "scatter");
    // The steering slider applies to the next request (drawn in 3-D), then the ablation
    // checkbox: what the page sends, and what it shows is the API's answer to that request.
    for actions in [
        json!({"prompt": prompt, "max_tokens": 8, "vector": "random.gguf", "scale": 6, "threed": true}),
        json!({"prompt": prompt, "max_tokens": 8, "vector": "random.gguf", "ablate": true}),
    ] {
        let p = drive(actions.clone());
        assert!(p["page_errors"].as_array().unwrap().is_empty(), "{p}");
        assert_eq!(p["error"], Value::Null, "{p}");
        let sent = &p["sent"]["trace"];
        if actions.get("scale").is_some() {
            assert_eq!(sent["steer"]["scale"], 6.0, "{p}");
            assert_eq!(p["scale_shown"], "6");
            assert_eq!(p["plot_type"], "scatter3d");
            assert!(sent.get("ablate").is_none());
        } else {
            assert_eq!(sent["ablate"]["vector"], "random.gguf", "{p}");
            assert!(sent.get("steer").is_none(), "scale 0 steers nothing: {p}");
        }
        let mut body = p["sent"].clone();
        body["stream"] = json!(false);
        let api = srv.ok("v1/completions", &body);
        let shown: String = p["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(shown, api["choices"][0]["text"].as_str().unwrap());
        assert_ne!(
            api["trace"]["states"],
            Value::Null,
            "the page asks for the states it draws"
        );
    }
}

/// Where llama.cpp's kernels make a request among others differ from alone (Gemma-3 on the CPU:
/// see "Exactness"), the start-up check finds it and requests are decoded one at a time, so
/// concurrent answers still equal the request alone bit for bit.
#[test]
fn serve_decodes_one_at_a_time_where_batching_changes_bits() {
    let model = require!(model_path(GEMMA));
    let srv = Server::start(&model, &["--parallel", "4"]);
    let (code, text) = srv.curl("v1/models", None, &[]);
    assert_eq!(code, 200);
    let meta = &serde_json::from_str::<Value>(&text).unwrap()["data"][0]["meta"];
    assert_eq!(meta["batched_exactly"], false, "{meta}");
    assert_eq!(meta["parallel"], 1, "{meta}");
    assert!(srv.log().contains("one at a time"), "{}", srv.log());
    let prompts = [
        "Once upon a time, in a kingdom by the sea, there lived",
        "The mitochondria is the powerhouse of the cell, and the ribosome",
        "Water boils at",
    ];
    let body = |p: &str| json!({"prompt": p, "max_tokens": 12, "trace": {"states": "inline", "positions": "last"}});
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| srv.ok("v1/completions", &body(p)))
        .collect();
    let children: Vec<Child> = prompts
        .iter()
        .map(|p| {
            srv.curl_cmd("v1/completions", Some(&body(p).to_string()), &[])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let (code, text) = parse_curl(&c.wait_with_output().unwrap().stdout);
        assert_eq!(code, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["trace"]["tokens"], alone[i]["trace"]["tokens"]);
        assert!(same_bits(
            &npy(&v["trace"]["states"]),
            &npy(&alone[i]["trace"]["states"])
        ));
    }
    assert_eq!(srv.health()["largest_batch"], 1);
}
