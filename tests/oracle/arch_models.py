#!/usr/bin/env python3
"""Architecture matrix for gguf-trace: tiny random-weight HF models and their F32 GGUFs.

Every recipe below is a small (width 64, 3-4 blocks) decoder built locally from its `transformers`
config class -- nothing is downloaded -- converted with llama.cpp's own converter (the
`convert_hf_to_gguf` / `conversion` modules of the convert-hf-to-gguf package), so a test can run
the GGUF through gguf-trace and compare its residual stream with HF's `output_hidden_states`.

Usage (one process per command; torch is imported once):
    arch_models.py list                                  -> arch keys, one per line
    arch_models.py versions                              -> JSON: package versions, script sha256
    arch_models.py build --out DIR [--arch KEY ...]      -> DIR/KEY/{hf/,model.gguf,status.json},
                                                            DIR/versions.json, DIR/tokenizer.model
    arch_models.py hidden --requests REQ.json            -> for each {"hf","ids","out"}:
        OUT.hidden.npy (float64 [n_layer+1, T, width], HF hidden_states), OUT.last.npy (float64
        [T, width], the input of the final norm: the residual stream after the last block) and
        OUT.logits.npy (float64 [T, vocab]); the model runs in float64, eval mode, eager
        attention, no cache.
        HF's last hidden state is after the final norm (checked: it equals final_norm(point L)
        of the trace for every arch that matches), the others are the residual stream.

Choices:
  * Weights. HF's default init (std 0.02) barely moves a width-64 residual stream, so after init
    every parameter is re-drawn: >=2-D weights N(0, 1/sqrt(fan_in)) (fused expert tensors and
    other bare matrices: the smaller of their last two dims as fan_in), embeddings N(0, 1), every
    1-D parameter gets N(0, 0.1) added to its init value (biases become N(0, 0.1), norm weights
    1 + N(0, 0.1), or N(0, 0.1) for gemma-style norms that compute x * (1 + w)). Routers are
    ordinary weights, so MoE routing is random too. Each arch has its own fixed seed (crc32 of its
    key), so building a subset gives the same models as building all.
  * Tokenizer. One SentencePiece BPE model (byte fallback, ~384 pieces, ids unk=0 bos=1 eos=2)
    is trained per build from the inline text below and copied into every hf/ folder as
    tokenizer.model; HF vocab_size is its size. The converter is patched in-process so that EVERY
    architecture writes this SentencePiece vocab (set_vocab -> _set_vocab_sentencepiece): BPE
    converters (gpt2, falcon, ...) would otherwise need a tokenizer.json whose pre-tokenizer hash
    they know. Token ids are read back from the trace, so the GGUF tokenizer only has to load.
  * Real-checkpoint conventions llama.cpp assumes are set in the recipes (query_pre_attn_scalar =
    head_dim for gemma2/3, norm_topk_prob for qwen3moe, ...); sliding windows (128) are wider
    than any test prompt; tie_word_embeddings varies across archs.
  * Some converters read config.json keys that transformers 5 no longer writes (gpt2 "n_ctx",
    gpt_neox "rotary_pct", ...) or register another class name (MPTForCausalLM, PhiMoE...): the
    recipe option "hparams" is merged into the hyper-parameters handed to the converter (values
    equal to what HF really computes with; the saved config.json stays as transformers wrote it).
  * A converter failure does not stop the build: status.json says "refused" with the last line of
    the exception. status.json = {arch, hf_class, gguf_arch, converter, reason, known_issue}, where
    known_issue (null for most) says why HF and llama.cpp cannot agree on this arch, or why
    llama.cpp / gguf-trace cannot run it, for reasons outside gguf-trace's capture.
"""
import argparse
import hashlib
import importlib.metadata as md
import json
import logging
import os
import shutil
import sys
import traceback
import zlib
from pathlib import Path

WIDTH, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 3, 4, 2, 16, 128

# Text the tokenizer is trained on (it only needs to cover ordinary English prompts).
CORPUS = """The quick brown fox jumps over the lazy dog and then runs into the forest.
A language model reads a sequence of tokens and predicts the next one, one step at a time.
Every transformer block adds its attention and its feed forward output to the residual stream.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
It was the best of times, it was the worst of times, it was the age of wisdom and of foolishness.
In the beginning the weather was cold, but by the evening the sun had warmed the small town.
Numbers like 1, 2, 3, 10, 42 and 2024 appear in text; so do questions? Yes! And quotes: "hello".
The cat sat on the mat while the dog slept near the door of the old wooden house by the river.
We trace how the hidden state of each token changes as it moves through the layers of a model.
"""

# Settings shared by every recipe (the config classes map these names onto their own).
COMMON = dict(hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=None,
              tie_word_embeddings=False)
DROP = object()   # a config value that removes the COMMON key (e.g. a property without setter)
VOCAB = object()  # a config value replaced by the tokenizer's vocab size

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
LOCAL_MOE = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)
DS_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
              moe_intermediate_size=48, n_group=1, topk_group=1)
MLA = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
           num_key_value_heads=HEADS, first_k_dense_replace=1)
SWA = dict(sliding_window=128)    # wider than any test prompt: HF and llama.cpp both attend fully
MUL = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
           logits_scaling=4.0)    # granite's scalars, away from 1
ROPE_500K = dict(rope_type="default", rope_theta=500000.0)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=128)


def R(hf_class, hparams=None, known_issue=None, **cfg):
    """A recipe: HF class, config overrides (on COMMON), `hparams` merged into what the converter
    reads, and `known_issue` (one line) where HF and llama.cpp cannot agree or llama.cpp cannot
    run the converted file for reasons outside gguf-trace (written to status.json)."""
    return dict(hf_class=hf_class, cfg=cfg, hparams=hparams or {}, known_issue=known_issue)


ARCHS = {
    "llama": R("LlamaForCausalLM"),
    "llama3": R("LlamaForCausalLM", rope_parameters=LLAMA3_ROPE),
    "mistral": R("MistralForCausalLM", **SWA, tie_word_embeddings=True),
    "qwen2": R("Qwen2ForCausalLM", tie_word_embeddings=True),
    "qwen3": R("Qwen3ForCausalLM"),
    "qwen2moe": R("Qwen2MoeForCausalLM", **MOE, shared_expert_intermediate_size=96,
                  norm_topk_prob=False),
    "qwen3moe": R("Qwen3MoeForCausalLM", **MOE, norm_topk_prob=True),
    "mixtral": R("MixtralForCausalLM", **SWA, **LOCAL_MOE),
    "phi3": R("Phi3ForCausalLM", **SWA, num_key_value_heads=HEADS),
    "gemma": R("GemmaForCausalLM", tie_word_embeddings=True),
    "gemma2": R("Gemma2ForCausalLM", **SWA, tie_word_embeddings=True,
                query_pre_attn_scalar=HEAD_DIM, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0),
    "gemma3": R("Gemma3ForCausalLM", **SWA, tie_word_embeddings=True,
                query_pre_attn_scalar=HEAD_DIM),
    # transformers folds global_head_dim into per-layer settings; the converter wants the key
    "gemma4": R("Gemma4ForCausalLM", hparams={"global_head_dim": 32}, **SWA,
                tie_word_embeddings=True, global_head_dim=32, hidden_size_per_layer_input=16,
                vocab_size_per_layer_input=VOCAB, final_logit_softcapping=30.0),
    "olmo": R("OlmoForCausalLM"),
    "olmo2": R("Olmo2ForCausalLM"),
    "olmo3": R("Olmo3ForCausalLM", **SWA),
    "olmoe": R("OlmoeForCausalLM", **LOCAL_MOE, num_key_value_heads=HEADS),  # llama.cpp: MHA
    "granite": R("GraniteForCausalLM", **MUL, tie_word_embeddings=True),
    "granitemoe": R("GraniteMoeForCausalLM", **MUL, **LOCAL_MOE),
    "granitemoeshared": R("GraniteMoeSharedForCausalLM", **MUL, **LOCAL_MOE,
                          shared_intermediate_size=64),
    "stablelm": R("StableLmForCausalLM", num_key_value_heads=HEADS, use_qkv_bias=True),
    "starcoder2": R("Starcoder2ForCausalLM", **SWA, tie_word_embeddings=True),
    "smollm3": R("SmolLM3ForCausalLM", tie_word_embeddings=True),
    "gpt2": R("GPT2LMHeadModel", hparams={"n_ctx": 256}, n_positions=256,
              tie_word_embeddings=True),
    "gpt_bigcode": R("GPTBigCodeForCausalLM", n_positions=256, multi_query=True,
                     tie_word_embeddings=True),
    "gpt_neox": R("GPTNeoXForCausalLM", hparams={"rotary_pct": 0.25}, rotary_pct=0.25,
                  num_key_value_heads=HEADS),
    "phi": R("PhiForCausalLM", num_key_value_heads=HEADS,
             intermediate_size=4 * WIDTH),  # the converter writes n_ff = 4 * n_embd
    # falcon-7b style (multi_query, 1 KV head); transformers 5 saves num_kv_heads = n_head
    "falcon": R("FalconForCausalLM", hparams={"num_kv_heads": 1}, num_key_value_heads=DROP,
                head_dim=DROP, tie_word_embeddings=True),
    "bloom": R("BloomForCausalLM", tie_word_embeddings=True),
    "mpt": R("MptForCausalLM", hparams={"architectures": ["MPTForCausalLM"]},
             tie_word_embeddings=True),
    "cohere": R("CohereForCausalLM", tie_word_embeddings=True, logit_scale=0.5),
    "cohere2": R("Cohere2ForCausalLM", hparams={"rotary_pct": 1.0}, **SWA,
                 tie_word_embeddings=True, logit_scale=0.5),
    "cohere2moe": R("Cohere2MoeForCausalLM", **SWA, num_experts=4, num_experts_per_tok=2,
                    tie_word_embeddings=True, logit_scale=0.5),
    "deepseek2": R("DeepseekV2ForCausalLM", **DS_MOE, **MLA, q_lora_rank=None,
                   topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False),
    "deepseek3": R("DeepseekV3ForCausalLM", **DS_MOE, **MLA, q_lora_rank=32,
                   routed_scaling_factor=2.5, norm_topk_prob=True),
    "glm4": R("Glm4ForCausalLM"),
    "solar_open": R("SolarOpenForCausalLM", **DS_MOE),
    "nemotron": R("NemotronForCausalLM"),
    "exaone4": R("Exaone4ForCausalLM", **SWA, tie_word_embeddings=True),
    "exaone_moe": R("ExaoneMoeForCausalLM", **SWA, **MOE, num_shared_experts=1,
                    first_k_dense_replace=1, known_issue="the converter writes no "
                    "expert_gating_func, which this llama.cpp requires to load exaone-moe"),
    "arcee": R("ArceeForCausalLM"),
    "apertus": R("ApertusForCausalLM", rope_parameters=LLAMA3_ROPE),
    "ernie4_5": R("Ernie4_5ForCausalLM", tie_word_embeddings=True),
    # the converter takes the shared-expert width as intermediate_size // num_key_value_heads
    "ernie4_5_moe": R("Ernie4_5_MoeForCausalLM", moe_num_experts=4, moe_k=2,
                      moe_intermediate_size=48, moe_num_shared_experts=2,
                      intermediate_size=2 * 48 * KV_HEADS, moe_layer_start_index=1),
    "hunyuan_dense": R("HunYuanDenseV1ForCausalLM"),
    "seed_oss": R("SeedOssForCausalLM"),
    "jais2": R("Jais2ForCausalLM"),
    # gpt-oss's YaRN but truncate=True: llama.cpp always rounds YaRN's correction range (real
    # gpt-oss says truncate=false; then the two differ by ~1e-2 at 25 tokens)
    "gpt_oss": R("GptOssForCausalLM", **SWA, **LOCAL_MOE, rope_parameters=dict(
        rope_type="yarn", rope_theta=150000.0, factor=32.0, original_max_position_embeddings=4096,
        beta_fast=32.0, beta_slow=1.0, truncate=True)),
    "phimoe": R("PhimoeForCausalLM", hparams={"architectures": ["PhiMoEForCausalLM"],
                                              "original_max_position_embeddings": 256},
                **SWA, **LOCAL_MOE, lm_head_bias=True, attention_bias=True,
                known_issue="HF routes with sparsemixer (each chosen expert weighted ~1); "
                "llama.cpp phimoe uses softmax weights renormalised over the top 2"),
    "dots1": R("Dots1ForCausalLM", **DS_MOE, first_k_dense_replace=1, norm_topk_prob=True,
               num_key_value_heads=HEADS,  # llama.cpp: MHA
               known_issue="the converter writes no expert_gating_func: llama.cpp aborts "
               "(GGML_ABORT in build_moe_ffn) at the first decode"),
    # llama.cpp: muP input scale always, 3 sliding + 1 full (NoPE) layers, route_norm
    "afmoe": R("AfmoeForCausalLM", hparams={"route_norm": True}, **SWA, **MOE,
               num_shared_experts=1, num_dense_layers=1, mup_enabled=True, num_hidden_layers=4,
               global_attn_every_n_layers=4),
    # llama.cpp needs a SWA layer, and its mellum graph ropes SWA layers with the global base
    # (ignores rope.freq_base_swa; HF's default 10k there gives a ~0.2 mismatch): one theta
    "mellum": R("MellumForCausalLM", **SWA, num_local_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=48,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                rope_parameters=dict(full_attention=ROPE_500K, sliding_attention=ROPE_500K)),
    "minimax_m2": R("MiniMaxM2ForCausalLM", **LOCAL_MOE),
    "laguna": R("LagunaForCausalLM", **SWA, **MOE, shared_expert_intermediate_size=48),
    "bitnet": R("BitNetForCausalLM", tie_word_embeddings=True),
    "lfm2": R("Lfm2ForCausalLM", known_issue="hybrid (short conv + attention): gguf-trace "
              "refuses hybrid models"),
}


def seed_of(key):
    return zlib.crc32(key.encode())


def script_sha256():
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def versions():
    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None
    cv = v("convert-hf-to-gguf")
    return {"torch": v("torch"), "transformers": v("transformers"), "convert-hf-to-gguf": cv,
            # the gguf package ships inside convert-hf-to-gguf (no metadata of its own)
            "gguf": v("gguf") or f"bundled with convert-hf-to-gguf {cv}",
            "sentencepiece": v("sentencepiece"), "script_sha256": script_sha256(),
            # every distribution in the venv: a dependency that moved changes the cache key too
            "packages": sorted(f"{d.metadata['Name']}=={d.version}" for d in md.distributions())}


def train_tokenizer(out_dir):
    """Train the shared SentencePiece model into out_dir/tokenizer.model; return its vocab size.
    Trained in memory, so the model records no file paths (same bytes for every DIR)."""
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=buf, model_type="bpe",
        vocab_size=384, byte_fallback=True, character_coverage=1.0, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2, shuffle_input_sentence=False)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()


def make_model(key, vocab):
    """Tiny HF model for `key` with re-drawn weights (see module docstring)."""
    import torch
    import transformers
    recipe = ARCHS[key]
    cls = getattr(transformers, recipe["hf_class"])
    kw = {k: vocab if v is VOCAB else v
          for k, v in dict(COMMON, vocab_size=vocab, **recipe["cfg"]).items() if v is not DROP}
    cfg = cls.config_class(**kw)
    torch.manual_seed(seed_of(key))
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed_of(key) + 1)
    owner = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = mod
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            mod = owner[name]

            def rnd(std):
                return torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std
            if p.dim() == 1:
                p.add_(rnd(0.1))
            elif isinstance(mod, torch.nn.Embedding):
                p.copy_(rnd(1.0))
            else:
                if isinstance(mod, torch.nn.Linear):
                    fan_in = mod.in_features
                elif type(mod).__name__ == "Conv1D":  # gpt2-style: weight is [in, out]
                    fan_in = p.shape[0]
                else:  # fused experts [E, a, b] and other raw matrices: the smaller side
                    fan_in = min(p.shape[-2:])
                p.copy_(rnd(fan_in ** -0.5))
    return model


def spm_set_vocab(self):
    """Replacement for every converter's set_vocab: write the shared SentencePiece vocab."""
    self._set_vocab_sentencepiece()


def convert(hf_dir, out_path, patch):
    """Convert hf_dir to an F32 GGUF in-process; return general.architecture."""
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    hparams = {**ModelBase.load_hparams(hf_dir, False), **patch}
    arch = get_model_architecture(hparams, ModelType.TEXT)
    cls = get_model_class(arch, mmproj=False)
    cls.set_vocab = spm_set_vocab  # (this process converts nothing else)
    with torch.inference_mode():
        m = cls(hf_dir, gguf.LlamaFileType.ALL_F32, out_path, eager=True, hparams=hparams)
        m.write()
    return gguf.MODEL_ARCH_NAMES[cls.model_arch]


def build(out, keys):
    import torch  # noqa: F401  (imported once for the whole build)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING)
    for name in ("hf-to-gguf", "gguf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    out.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(out)
    for key in keys:
        d = out / key
        shutil.rmtree(d, ignore_errors=True)
        (d / "hf").mkdir(parents=True)
        recipe = ARCHS[key]
        status = {"arch": key, "hf_class": recipe["hf_class"], "gguf_arch": None,
                  "converter": "refused", "reason": None, "known_issue": recipe["known_issue"]}
        try:
            model = make_model(key, vocab)
            model.save_pretrained(d / "hf")
            shutil.copy(out / "tokenizer.model", d / "hf" / "tokenizer.model")
            status["gguf_arch"] = convert(d / "hf", d / "model.gguf", recipe["hparams"])
            status["converter"] = "ok"
        except BaseException as e:  # noqa: BLE001  (SystemExit too: record, go on)
            lines = traceback.format_exception_only(type(e), e)
            status["reason"] = (lines[-1].strip() if lines else repr(e)).splitlines()[-1][:500]
            (d / "model.gguf").unlink(missing_ok=True)
        (d / "status.json").write_text(json.dumps(status, indent=2) + "\n")
        print(f"{key:14s} {status['converter']:8s} {status['gguf_arch'] or ''} "
              f"{status['reason'] or ''}", flush=True)
    (out / "versions.json").write_text(json.dumps(versions(), indent=2) + "\n")


def hidden(requests):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    failed = 0
    for req in json.loads(Path(requests).read_text()):
        try:
            # eager attention and experts: exact (softcapping, ...) and float64-capable
            model = AutoModelForCausalLM.from_pretrained(
                req["hf"], attn_implementation="eager", experts_implementation="eager")
            model = model.double().eval()
            ids = torch.tensor([req["ids"]], dtype=torch.long)
            # HF's last hidden state is the final norm's *output*; gguf-trace's last point is
            # the residual stream before it. Record every module's input and output and take the
            # input of the module that produced hidden_states[-1] (the final norm).
            seen = []
            hooks = [m.register_forward_hook(
                lambda mod, inp, out: seen.append((inp, out)))
                for m in model.modules()]
            res = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            for h in hooks:
                h.remove()
            final = res.hidden_states[-1]

            def is_final_norm(inp, out):  # produces final (gpt2 reshapes it: compare values)
                return (inp and torch.is_tensor(inp[0]) and torch.is_tensor(out)
                        and out.shape == final.shape and torch.equal(out, final)
                        and not (inp[0].shape == out.shape and torch.equal(inp[0], out)))
            last = next((inp[0] for inp, out in reversed(seen) if is_final_norm(inp, out)), None)
            if last is None:
                raise RuntimeError("no module produces hidden_states[-1]: final norm not found")
            hs = torch.stack([h[0] for h in res.hidden_states]).double().numpy()
            np.save(req["out"] + ".hidden.npy", hs)
            np.save(req["out"] + ".last.npy", last[0].double().numpy())
            np.save(req["out"] + ".logits.npy", res.logits[0].double().numpy())
        except Exception as e:  # noqa: BLE001  (report, go on with the others)
            failed += 1
            print(f"{req['hf']}: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    sub.add_parser("versions")
    b = sub.add_parser("build")
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--arch", nargs="*", choices=list(ARCHS), default=None)
    h = sub.add_parser("hidden")
    h.add_argument("--requests", required=True)
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF writer's progress bars
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only, never a hub look-up
    if args.cmd == "list":
        print("\n".join(ARCHS))
    elif args.cmd == "versions":
        print(json.dumps(versions(), sort_keys=True))
    elif args.cmd == "build":
        build(args.out, args.arch or list(ARCHS))
    else:
        return hidden(args.requests)


if __name__ == "__main__":
    sys.exit(main())
