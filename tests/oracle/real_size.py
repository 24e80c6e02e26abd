"""Reference states of a real quantized GGUF, computed by HF transformers' own GGUF loader.

transformers reads the GGUF, dequantizes every weight (with the `gguf` package) and runs the model
in float64: the reference is the same weights as llama.cpp runs, without llama.cpp's activation
quantization (its quantized matmuls quantize the activations to 8 bits per block) and in float64.

Usage: real_size.py hidden --gguf MODEL.gguf --requests REQ.json
    REQ.json: [{"ids": [token ids], "out": PREFIX}, ...]; writes PREFIX.hidden.npy (float64
    [n_layer+1, T, width]: HF hidden_states, the last one replaced by the input of the final norm,
    which is gguf-trace's last point) and PREFIX.logits.npy (float64 [T, vocab]).

The `gguf` distribution and `accelerate` that transformers' loader needs are installed by
scripts/lib.sh (ensure_hf) into a folder of their own ($GGUF_TRACE_HF_EXTRA), put first on the
path here: the oracle venv's own `gguf` module is the one llama.cpp's converter package bundles,
without the distribution metadata transformers checks.
"""
import argparse
import json
import os
import sys
from pathlib import Path


def hidden(gguf, requests):
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    gguf = Path(gguf).resolve()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, attn_implementation="eager",
        dtype=torch.float64)
    model = model.double().eval()
    norm = model.model.norm
    for req in json.loads(Path(requests).read_text()):
        ids = torch.tensor([req["ids"]], dtype=torch.long)
        seen = []
        hook = norm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
        res = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        hook.remove()
        hs = list(res.hidden_states)
        hs[-1] = seen[-1]  # gguf-trace's point L is the final norm's input
        np.save(req["out"] + ".hidden.npy", torch.stack([h[0] for h in hs]).double().numpy())
        np.save(req["out"] + ".logits.npy", res.logits[0].double().numpy())
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hidden")
    h.add_argument("--gguf", required=True)
    h.add_argument("--requests", required=True)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, never a hub look-up
    os.environ.setdefault("TQDM_DISABLE", "1")
    extra = os.environ.get("GGUF_TRACE_HF_EXTRA")
    if extra:
        sys.path.insert(0, extra)
    return hidden(args.gguf, args.requests)


if __name__ == "__main__":
    sys.exit(main())
