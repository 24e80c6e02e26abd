"""HF transformers' view of the inside of every block, for the architecture matrix's tap check.

    arch_taps.py --requests REQ.json     -> for each {"hf", "ids", "out"}: OUT.taps.npz holding, per
        block (float64, [n_layer, T, width]): resid (the block's input), attn (what attention adds
        to the residual stream), mlp (what the MLP adds), z (the input of attention's output
        projection), neurons (the input of the MLP's down projection), pattern (HF's attention
        probabilities, [n_layer, heads, T, T]), and for mixture-of-experts models router_logits
        ([n_layer, T, n_expert], HF's output_router_logits), router_experts and router_weights
        ([n_layer, T, k]: the top_k_index and top_k_weights HF's experts module is called with);
        and OUT.taps.json saying
        which of them the oracle could take apart for this architecture, and why not.

The split is found generically and proven by HF's own arithmetic: the attention and MLP modules of
each decoder layer are hooked, and of the readings of their outputs (as returned; times the
config's residual multiplier; minus the residual a module adds itself when it takes the residual
as an argument, as BLOOM's and MPT's MLP do) the one with input + attn + mlp == output (to 1e-9
relative, in float64) is kept. Post-norms (Gemma 2/3, OLMo 2,
EXAONE 4, AFMoE: a post_feedforward/post_mlp layernorm beside post_attention_layernorm) are part of
the terms; a shared MLP beside the experts (granitemoeshared) is part of the MLP term.
Models are the matrix's own (built by arch_models.py); nothing here changes its cache key.
"""
import inspect
import json
import sys
from pathlib import Path

PROJ_OUT = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o")
PROJ_DOWN = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "down")


def child(module, names):
    kids = dict(module.named_children())
    return next((kids[n] for n in names if n in kids), None)


def first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def decoder_layers(model, n_layer):
    import torch
    lists = [m for _, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n_layer]
    if not lists:
        raise RuntimeError("no list of decoder layers")
    return lists[0]


def split(layer):
    """(attention module, MLP module, attention post-norm, MLP post-norm) of a decoder layer."""
    kids = dict(layer.named_children())
    attn = next((m for n, m in kids.items()
                 if "attention" in type(m).__name__.lower() or n in ("self_attn", "attn")), None)
    mlp = next((m for n, m in kids.items() if n in ("mlp", "feed_forward", "ffn",
                                                      "block_sparse_moe", "moe")), None)
    if mlp is None:
        mlp = next((m for m in kids.values() if any(
            k in type(m).__name__.lower() for k in ("mlp", "moe", "feedforward", "expert"))), None)
    post = kids.get("post_feedforward_layernorm") or kids.get("post_mlp_layernorm")
    return attn, mlp, (kids.get("post_attention_layernorm") if post else None), post


def taps(req):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        req["hf"], attn_implementation="eager", experts_implementation="eager")
    model = model.double().eval()
    cfg = model.config
    n_layer = cfg.num_hidden_layers
    layers = decoder_layers(model, n_layer)
    rec = [dict() for _ in range(n_layer)]
    hooks = []

    def keep(i, key, pre=False):
        if pre:
            def f(mod, args, kwargs):
                x = args[0] if args else next(v for k, v in kwargs.items() if torch.is_tensor(v))
                rec[i].setdefault(key, x.detach().clone())
            return f

        def g(mod, inp, out):
            rec[i].setdefault(key, first(out).detach().clone())
        return g

    notes = {}
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(keep(i, "in", True), with_kwargs=True))
        hooks.append(layer.register_forward_hook(keep(i, "out")))
        attn, mlp, attn_post, mlp_post = split(layer)
        if attn is None or mlp is None:
            notes.setdefault("split", "no attention or MLP module found in the decoder layer")
            continue
        takes_residual = lambda mod: "residual" in inspect.signature(mod.forward).parameters  # noqa: E731
        rec[i]["attn_res"] = takes_residual(attn)
        rec[i]["mlp_res"] = takes_residual(mlp)
        hooks.append((attn_post or attn).register_forward_hook(keep(i, "attn")))
        hooks.append((mlp_post or mlp).register_forward_hook(keep(i, "mlp")))
        shared = dict(layer.named_children()).get("shared_mlp")
        if shared is not None:  # granitemoeshared: the MLP term is the experts' plus the shared
            hooks.append(shared.register_forward_hook(keep(i, "shared")))
        o = child(attn, PROJ_OUT)
        if o is not None:
            hooks.append(o.register_forward_pre_hook(keep(i, "z", True), with_kwargs=True))
        d = child(mlp, PROJ_DOWN)
        if d is not None:
            hooks.append(d.register_forward_pre_hook(keep(i, "neurons", True), with_kwargs=True))
        # The experts module of a mixture of experts is called with the chosen experts and their
        # weights (transformers' interface for MoE models; gpt-oss spells it its own way).
        for m in layer.modules():
            params = inspect.signature(m.forward).parameters
            pair = next((p for p in (("top_k_index", "top_k_weights"),
                                     ("router_indices", "routing_weights"))
                         if p[0] in params and p[1] in params), None)
            if pair is not None:
                names = list(params)

                def route(mod, args, kwargs, i=i, names=names, pair=pair):
                    bound = dict(zip(names, args)) | kwargs
                    rec[i].setdefault("router_experts", bound[pair[0]].detach().clone())
                    rec[i].setdefault("router_weights", bound[pair[1]].detach().clone())
                hooks.append(m.register_forward_pre_hook(route, with_kwargs=True))
                break
    ids = torch.tensor([req["ids"]], dtype=torch.long)
    moe = hasattr(cfg, "output_router_logits")
    extra = {"output_router_logits": True} if moe else {}
    res = model(input_ids=ids, use_cache=False, output_attentions=True, **extra)
    for h in hooks:
        h.remove()
    r = float(getattr(cfg, "residual_multiplier", 1.0) or 1.0)
    out = {k: [] for k in ("resid", "attn", "mlp", "z", "neurons")}
    for t in rec:
        # The projections' inputs need no split of the block.
        for k in ("z", "neurons"):
            if k in t and t[k].dim() == 3:
                out[k].append(t[k][0])
    for i, t in enumerate(rec):
        x, y = t["in"][0], t["out"][0]
        if "attn" not in t or "mlp" not in t:
            notes.setdefault("split", "the attention or MLP module did not run as a module")
            break
        a0, m0 = t["attn"][0], t["mlp"][0] + (t["shared"][0] if "shared" in t else 0)
        # A module that takes the residual as an argument returns it added (BLOOM's attention
        # and MLP, MPT's MLP): take it off. Granite scales both terms by its residual multiplier.
        # The reading must add up to the layer's output.
        a = a0 - x if t["attn_res"] else a0
        m = m0 - (x + a) if t["mlp_res"] else m0
        found = next(((a, m) for a, m in ((a, m), (r * a, r * m))
                      if a.shape == x.shape and m.shape == x.shape
                      and torch.linalg.norm(x + a + m - y) <= 1e-9 * torch.linalg.norm(y)), None)
        if found is None:
            notes.setdefault("split", f"block {i}: no reading of the module outputs adds up to "
                             "the layer's output")
            break
        out["resid"].append(x)
        out["attn"].append(found[0])
        out["mlp"].append(found[1])
    arrays = {}
    for k, v in out.items():
        if len(v) == n_layer and len({tuple(x.shape) for x in v}) == 1:
            arrays[k] = torch.stack(v).double().numpy()
        else:
            why = notes.get("split") if k in ("resid", "attn", "mlp") else None
            notes.setdefault(k, why or f"no module found for {k} (or not one per block)")
    # The router: per block, [T, n_expert] logits and [T, k] chosen experts and weights.
    if moe:
        logits = [x for x in (getattr(res, "router_logits", None) or ()) if x is not None]
        routed = [t for t in rec if "router_experts" in t]
        if len(logits) == n_layer and len(routed) == n_layer:
            arrays["router_logits"] = torch.stack(
                [x.reshape(-1, x.shape[-1]) for x in logits]).double().numpy()
            for k in ("router_experts", "router_weights"):
                arrays[k] = torch.stack(
                    [t[k].reshape(-1, t[k].shape[-1]) for t in routed]).double().numpy()
        else:
            notes["router"] = (f"{len(logits)} router logits and {len(routed)} expert calls for "
                               f"{n_layer} blocks")
    # Attention probabilities [n_layer, heads, query, key] (eager attention computes them).
    att = getattr(res, "attentions", None)
    if att is not None and len(att) == n_layer and all(a is not None for a in att) \
            and len({tuple(a.shape) for a in att}) == 1:
        arrays["pattern"] = torch.stack([a[0] for a in att]).double().numpy()
    else:
        notes.setdefault("pattern", "the model returned no attention probabilities per layer")
    np.savez(req["out"] + ".taps.npz", **arrays)
    Path(req["out"] + ".taps.json").write_text(json.dumps(notes))


def main():
    import argparse
    import os
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", required=True)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    failed = 0
    for req in json.loads(Path(args.requests).read_text()):
        try:
            taps(req)
        except Exception as e:  # noqa: BLE001  (report, go on with the others)
            failed += 1
            print(f"{req['hf']}: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
