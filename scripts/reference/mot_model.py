#!/usr/bin/env python3
"""A motley checkpoint in plain PyTorch, written from docs/MODEL.md alone (no motley code).

Loads `RUN/checkpoints/step-N/` (or a run folder: its latest checkpoint) — `meta.json` for the
config and vocabulary, `model.safetensors` or the shards its index names for the weights — and
computes the log-probability of each token of a sequence given the ones before it, for dense and
MoT checkpoints of the token (Chameleon) setting, both norm placements, with or without
QK-norm and untied heads. `tools/tests/reference_model.rs` scores what `motley sample`
generated with it and compares the log-probabilities, which keeps docs/MODEL.md true.

    python scripts/reference/mot_model.py RUN --ids 1001,17,42,1003 --score-from 3

prints {"step": N, "logprobs": [[log p(ids[i] | ids[:i]) for i >= score-from], …]} as one JSON
line, one list per --ids.
"""

import argparse
import glob
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

TOWERS = ("text", "image", "speech")


def resolve(path):
    """A checkpoint folder, or a run's latest one (checkpoints/step-*/ with a meta.json)."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    steps = sorted(glob.glob(os.path.join(path, "checkpoints", "step-*", "meta.json")))
    if not steps:
        sys.exit(f"{path}: no checkpoint (checkpoints/step-*/meta.json)")
    return os.path.dirname(steps[-1])


def load_weights(ckpt):
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for name in files:
            sd.update(load_file(os.path.join(ckpt, name)))
        return sd
    return load_file(os.path.join(ckpt, "model.safetensors"))


def tower_of(vocab, ids):
    """§2: the modality of the vocabulary block an input id lies in; everything else is text."""
    m = torch.zeros(len(ids), dtype=torch.long)
    for block in vocab["modalities"]:
        tower = TOWERS.index(block["modality"])
        lo, hi = block["offset"], block["offset"] + block["vocab_size"]
        for i, t in enumerate(ids):
            if lo <= t < hi:
                m[i] = tower
    return m


def rms(x, g, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def tower_linear(x, W, m):  # x [T, in], W [towers, out, in], m [T]
    return torch.einsum("ti,toi->to", x, W[m])


def rope_tables(pos, hd, theta):  # §11: frequencies in f64 rounded to f32, angles in f32
    inv = (1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)).float()
    ang = pos.float()[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def rope(x, cos, sin):  # x [H, T, hd], half-split
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Model:
    def __init__(self, ckpt):
        with open(os.path.join(ckpt, "meta.json")) as f:
            meta = json.load(f)
        self.step = meta["step"]
        self.cfg = meta["config"]["model"]
        self.vocab = meta["vocab"]
        if self.cfg.get("arch") == "moe" or self.cfg.get("latent_dim", 0) > 0:
            sys.exit("this reference covers dense and MoT token models (not MoE, not Transfusion)")
        sd = load_weights(ckpt)
        self.mot = any(".text." in k for k in sd)
        towers = TOWERS if self.mot else (None,)

        def stacked(name):  # "layers.0.attn.q_proj" -> [towers, ...]
            return torch.stack([sd[f"{name}.{t}.weight" if t else f"{name}.weight"] for t in towers])

        self.L = self.cfg["n_layers"]
        self.P = {}
        for l in range(self.L):
            for part in ("attn_norm", "ffn_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                         "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj"):
                self.P[f"layers.{l}.{part}"] = stacked(f"layers.{l}.{part}")
            if self.cfg["qk_norm"]:
                for part in ("attn.q_norm", "attn.k_norm"):
                    self.P[f"layers.{l}.{part}"] = stacked(f"layers.{l}.{part}")
        self.embed = sd["embed.weight"]
        untied = self.mot and "norm.text.weight" in sd
        self.norm = stacked("norm") if untied else sd["norm.weight"][None]
        self.head = stacked("lm_head") if untied else sd["lm_head.weight"][None]
        self.untied = untied

    def block(self, x, m, cos, sin, mask, l):
        T, D = x.shape
        H = self.cfg["n_heads"]
        hd = D // H
        eps = self.cfg["norm_eps"]
        p = lambda name: self.P[f"layers.{l}.{name}"]
        pre = self.cfg["norm"] == "pre"
        a = rms(x, p("attn_norm")[m], eps) if pre else x
        q, k, v = (tower_linear(a, p(f"attn.{n}"), m).view(T, H, hd) for n in ("q_proj", "k_proj", "v_proj"))
        if self.cfg["qk_norm"]:
            q = rms(q, p("attn.q_norm")[m][:, None, :], eps)
            k = rms(k, p("attn.k_norm")[m][:, None, :], eps)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = tower_linear(o.transpose(0, 1).reshape(T, D), p("attn.o_proj"), m)
        h = x + (o if pre else rms(o, p("attn_norm")[m], eps))
        f = rms(h, p("ffn_norm")[m], eps) if pre else h
        f = tower_linear(F.silu(tower_linear(f, p("ffn.gate_proj"), m)) * tower_linear(f, p("ffn.up_proj"), m),
                         p("ffn.down_proj"), m)
        return h + (f if pre else rms(f, p("ffn_norm")[m], eps))

    @torch.no_grad()
    def logits(self, ids):
        """[T, V] logits of one document that starts at position 0 (BOS)."""
        T = len(ids)
        m_in = tower_of(self.vocab, ids)
        m = m_in if self.mot else torch.zeros_like(m_in)
        x = self.embed[torch.tensor(ids)]
        hd = self.cfg["d_model"] // self.cfg["n_heads"]
        cos, sin = rope_tables(torch.arange(T), hd, self.cfg["rope_theta"])
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        for l in range(self.L):
            x = self.block(x, m, cos, sin, mask, l)
        h = m if self.untied else torch.zeros_like(m)
        x = rms(x, self.norm[h], self.cfg["norm_eps"])
        return torch.einsum("td,tvd->tv", x, self.head[h])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--ids", required=True, action="append",
                    help="comma-separated global ids, BOS first (repeat for several sequences)")
    ap.add_argument("--score-from", type=int, action="append",
                    help="first position whose id is scored, per --ids (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = Model(resolve(args.checkpoint))
    out = []
    for k, text in enumerate(args.ids):
        ids = [int(t) for t in text.split(",")]
        start = args.score_from[k] if args.score_from and k < len(args.score_from) else 1
        logp = torch.log_softmax(model.logits(ids).double(), dim=-1)
        out.append([float(logp[i - 1, ids[i]]) for i in range(max(start, 1), len(ids))])
    print(json.dumps({"step": model.step, "mot": model.mot, "untied_head": model.untied, "logprobs": out}))


if __name__ == "__main__":
    main()
