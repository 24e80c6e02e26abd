//! `--chat` renders the model's own Jinja template exactly as Python's jinja2 does.

use crate::common::*;
use crate::require;

/// Python oracle: read tokenizer.chat_template with the `gguf` package and render it with jinja2
/// configured as transformers' apply_chat_template (sandboxed, trim_blocks, lstrip_blocks).
const JINJA_ORACLE: &str = r#"
import sys, json
from gguf import GGUFReader
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.ext import loopcontrols
path, user, system, bos, eos = sys.argv[1:6]
r = GGUFReader(path)
f = r.fields["tokenizer.chat_template"]
tmpl = bytes(f.parts[f.data[0]]).decode("utf-8")
def raise_exception(msg):
    raise Exception(msg)
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
env.globals["raise_exception"] = raise_exception
msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
sys.stdout.write(json.dumps(env.from_string(tmpl).render(messages=msgs, add_generation_prompt=True, bos_token=bos, eos_token=eos)))
"#;

fn rendered_by_cli(model: &std::path::Path, user: &str, system: Option<&str>) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = vec![
        "trace",
        "-m",
        s(model),
        "--chat",
        "-p",
        user,
        "--positions",
        "last",
        "-o",
        s(&out),
    ];
    if let Some(sys) = system {
        args.extend(["--system", sys]);
    }
    let o = run_bin(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    m["prompts"][0].clone()
}

#[test]
fn chat_matches_python_jinja2_with_default_and_custom_system_prompt() {
    let path = require!(model_path(SMOL));
    let model = require!(smol());
    let bos = model.token_piece(model.bos());
    let eos = model.token_piece(model.eos());
    for system in [None, Some("You are a pirate. Answer in one sentence.")] {
        let user = "What is the capital of France?";
        let rec = rendered_by_cli(&path, user, system);
        let ours = rec["rendered"].as_str().unwrap();
        let theirs: String = serde_json::from_str(&run_python(
            JINJA_ORACLE,
            &[s(&path), user, system.unwrap_or(""), &bos, &eos],
        ))
        .unwrap();
        assert_eq!(ours, theirs, "minijinja and jinja2 render differently");
        if system.is_none() {
            // SmolLM2's own template adds a default system prompt (llama.cpp's built-in chatml does not).
            assert!(ours.contains("<|im_start|>system"), "{ours}");
        } else {
            assert!(ours.contains("pirate"));
        }
        // Special tokens were parsed, not spelled out; BOS never doubled.
        let toks: Vec<i64> = rec["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap())
            .collect();
        let im_start = model.tokenize("<|im_start|>", false, true).unwrap();
        assert_eq!(im_start.len(), 1);
        assert!(toks.contains(&(im_start[0] as i64)));
        assert!(
            !(toks.len() > 1 && toks[0] == model.bos() as i64 && toks[1] == model.bos() as i64),
            "BOS doubled"
        );
    }
}

#[test]
fn chat_on_a_model_without_template_is_a_clear_error() {
    let path = require!(model_path(GEMMA));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = run_bin(&["trace", "-m", s(&path), "--chat", "-p", "hi", "-o", s(&out)]);
    assert_clean_error(&o, "no chat template", Some(&out));
    assert!(!out.exists());
}

#[test]
fn raw_prompts_add_bos_per_metadata_once() {
    for model in [smol(), gemma()] {
        let model = require!(model);
        let bos_text = model.token_piece(model.bos());
        let plain = gguf_trace::chat::tokenize_prompt(model, "Hello world").unwrap();
        let with_bos =
            gguf_trace::chat::tokenize_prompt(model, &format!("{bos_text}Hello world")).unwrap();
        if model.add_bos() {
            assert_eq!(plain[0], model.bos());
            assert_eq!(plain, with_bos, "explicit BOS text must not double BOS");
        } else {
            assert_ne!(plain[0], model.bos());
        }
    }
}
