#!/usr/bin/env python3
"""PyTorch eager reference of motley's MoT forward + backward, for `motley bench trainer`.

Same algorithm as trainer/src/model.rs: tokens sorted by modality once per batch; per-modality
Q|K|V, O and SwiGLU matmuls on contiguous pieces (one autograd node per projection, as motley's
tower_linear: each tower's matmul writes its rows, forward and backward); the attention and FFN
norms as one weightless norm over all rows with each tower's weight folded into its projection;
QK-norm weights repeated per row; one parameter per site holding every tower's weights
(`[towers, q|k|v rows, in]`, as motley's `Stacked`); order restored around
scaled_dot_product_attention; causal + same-document mask, RoPE from positions, shared
embedding and LM head, cross-entropy in sorted order. Precision as in motley: fp32 master
weights, matmuls and attention in the compute dtype (bf16 on CUDA), norms and loss in fp32.

Input: a JSON file written by the bench (config + one batch). Output: one JSON line on stdout
with the median milliseconds of forward + backward per step (wall and thread-CPU time); with
`--serve`, one step per `step` line on stdin instead, each answered with its times, which is
how `motley bench trainer` interleaves these steps with its own.

    python scripts/bench/mot_torch.py batch.json --steps 10 --warmup 3 --device cpu
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F


class Linear(torch.nn.Module):
    def __init__(self, d_in, d_out, std):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d_out, d_in) * std)

    def forward(self, x, ck):
        return F.linear(x.to(ck), self.weight.to(ck))


class RmsNorm(torch.nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x.float(), (self.weight.shape[0],), self.weight, self.eps)


class TowerLinear(torch.autograd.Function):
    """motley's tower_linear (trainer/csrc/tower_linear.cpp): rows grouped by tower, each tower's
    matmul writing into its rows of the result, forward and backward; no split, cat or stack."""

    @staticmethod
    def forward(ctx, x, w, sizes):
        ctx.save_for_backward(x, w)
        ctx.sizes = sizes
        y = x.new_empty(x.shape[0], w.shape[1])
        s = 0
        for m, n in enumerate(sizes):
            if n:
                torch.mm(x[s:s + n], w[m].t(), out=y[s:s + n])
            s += n
        return y

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.contiguous()
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        s = 0
        for m, n in enumerate(ctx.sizes):
            if gw is not None:
                if n:
                    torch.mm(g[s:s + n].t(), x[s:s + n], out=gw[m])
                else:
                    gw[m].zero_()
            if gx is not None and n:
                torch.mm(g[s:s + n], w[m], out=gx[s:s + n])
            s += n
        return gx, gw, None


def stacked(t, parts, shape, std=None):
    """One parameter per site, as motley's `Stacked`: every tower's parts in `[t, parts * out, ...]`."""
    shape = (t, parts * shape[0], *shape[1:])
    return torch.nn.Parameter(torch.randn(*shape) * std if std is not None else torch.ones(*shape))


class Block(torch.nn.Module):
    def __init__(self, c, t):
        super().__init__()
        d, f, hd, std = c["d_model"], c["ffn_dim"], c["d_model"] // c["n_heads"], 0.02
        out_std = std / math.sqrt(2 * c["n_layers"])
        self.h, self.hd, self.f = c["n_heads"], hd, f
        self.attn_norm = stacked(t, 1, (d,))
        self.ffn_norm = stacked(t, 1, (d,))
        self.qkv = stacked(t, 3, (d, d), std)
        self.o = stacked(t, 1, (d, d), out_std)
        self.qk_norm = stacked(t, 2, (hd,)) if c["qk_norm"] else None
        self.gate_up = stacked(t, 2, (f, d), std)
        self.down = stacked(t, 1, (d, f), out_std)

    def forward(self, x, r, ck):
        """As motley's Block::forward (pre-norm): only the matmuls run per tower."""
        b, t, sizes = r["b"], r["t"], r["sizes"]
        h, hd = self.h, self.hd
        d = h * hd
        towers = self.qkv.shape[0]
        live = [m for m in range(towers) if towers == 1 or sizes[m] > 0]

        def weight(w, fold=None):  # [towers, sum(out), in], pre-norm weight folded in
            if fold is not None:
                w = w * fold.unsqueeze(1)
            return w.to(ck)

        def matmul(xs, w):  # per-tower rows of xs (sorted order) @ w[m].T
            if w.shape[0] == 1:
                return F.linear(xs, w.squeeze(0))
            if r.get("ends") is not None:  # model.grouped_mm: one grouped GEMM for all towers
                return torch._grouped_mm(xs, w.transpose(1, 2), offs=r["ends"])
            return TowerLinear.apply(xs, w, sizes)

        def per_row(w):  # [towers, ...] -> one row per token (sorted order)
            if w.shape[0] == 1:
                return w
            ws = w.unbind(0)
            return torch.cat([ws[m].unsqueeze(0).expand(sizes[m], *ws[m].shape) for m in live], 0)

        n = x.shape[0]
        qkv = matmul(F.rms_norm(x.float(), (d,), None, 1e-5).to(ck), weight(self.qkv, self.attn_norm))
        if self.qk_norm is not None:
            qk, v = qkv.split_with_sizes([2 * d, d], 1)
            g = self.qk_norm.view(-1, 2, 1, hd)
            qk = F.rms_norm(qk.reshape(n, 2, h, hd).float(), (hd,), None, 1e-5) * per_row(g)
            qkv = torch.cat([qk.reshape(n, 2 * d).to(ck), v], 1)
        if r["inv"] is not None:  # scatter into sequence order: its backward is a gather
            qkv = torch.empty_like(qkv).index_copy_(0, r["perm"], qkv)
        q, k, v = qkv.view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = rope(q, r), rope(k, r)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=r["mask"], is_causal=r["mask"] is None)
        a = a.transpose(1, 2).reshape(b * t, d)
        if r["perm"] is not None:
            a = torch.empty_like(a).index_copy_(0, r["inv"], a)
        x = x + matmul(a.to(ck), weight(self.o)).float()
        xn = F.rms_norm(x, (d,), None, 1e-5).to(ck)
        gate, up = matmul(xn, weight(self.gate_up, self.ffn_norm)).split(self.f, 1)
        return x + matmul(F.silu(gate) * up, weight(self.down)).float()


def rope(x, r):
    half = x.shape[3] // 2
    kind = x.dtype
    x = x.float()
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = r["cos"], r["sin"]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], 3).to(kind)


class Model(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        t = 3 if c["arch"] == "mot" else 1
        self.embed = torch.nn.Parameter(torch.randn(c["vocab_size"], c["d_model"]) * 0.02)
        self.layers = torch.nn.ModuleList([Block(c, t) for _ in range(c["n_layers"])])
        self.norm = RmsNorm(c["d_model"], 1e-5)
        self.head = Linear(c["d_model"], c["vocab_size"], 0.02)

    def forward(self, r, ck):
        x = F.embedding(r["tokens"], self.embed)
        for layer in self.layers:
            x = layer(x, r, ck)
        logits = self.head(self.norm(x), ck).float()
        tok = F.cross_entropy(logits, r["targets"], reduction="none")
        return (tok * r["weight"]).sum() / r["weight"].sum().clamp(min=1)


def prepare(batch, c, device):
    """Host-side layout, as motley's Prepared::new: stable sort by modality, RoPE, mask."""
    b, t = batch["batch_size"], batch["seq_len"]
    n = b * t
    mod = torch.tensor(batch["modality"], dtype=torch.long)
    if c["arch"] == "mot":
        perm = torch.argsort(mod, stable=True)
        counts = torch.bincount(mod, minlength=3).tolist()
        starts = [0, counts[0], counts[0] + counts[1]]
        spans = list(zip(starts, counts))
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n)
    else:
        perm, inv, spans = None, None, [(0, n)]
    lay = (lambda v: v[perm]) if perm is not None else (lambda v: v)
    tokens = lay(torch.tensor(batch["inputs"], dtype=torch.long))
    targets = lay(torch.tensor(batch["targets"], dtype=torch.long))
    weight = lay(torch.tensor(batch["loss_mask"], dtype=torch.float32))
    hd = c["d_model"] // c["n_heads"]
    pos = torch.tensor(batch["positions"], dtype=torch.float32).view(b, 1, t, 1)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd // 2, dtype=torch.float64) * 2 / hd)).float()
    ang = pos * inv_freq.view(1, 1, 1, -1)
    docs = torch.tensor(batch["doc_ids"], dtype=torch.long).view(b, t)
    packed = bool((docs[:, 1:] != docs[:, :-1]).any())
    mask = None
    if packed:
        mask = (docs.unsqueeze(2) == docs.unsqueeze(1)) & torch.ones(t, t, dtype=torch.bool).tril()
        mask = mask.unsqueeze(1).to(device)
    to = lambda x: None if x is None else x.to(device)
    return {
        "b": b, "t": t, "spans": spans, "sizes": [n for _, n in spans], "perm": to(perm), "inv": to(inv), "tokens": to(tokens),
        "targets": to(targets), "weight": to(weight), "cos": ang.cos().to(device), "sin": ang.sin().to(device), "mask": mask,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("batch")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--serve", action="store_true",
                    help="after set-up print one JSON line, then run one step per `step` line on stdin and "
                         "answer each with its times (so a caller can interleave its own steps with ours)")
    args = ap.parse_args()
    with open(args.batch) as f:
        spec = json.load(f)
    c, batch = spec["config"], spec["batch"]
    device = torch.device(args.device)
    ck = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Model(c).to(device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    r = prepare(batch, c, device)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}

    def step():
        sync()
        t0, c0 = time.perf_counter(), time.thread_time()
        loss = model(r, ck)
        loss.backward()
        sync()
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        model.zero_grad(set_to_none=True)
        return 1000 * wall, 1000 * cpu, float(loss.detach())

    if args.serve:
        print(json.dumps({"ready": True, **info}), flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            wall, cpu, loss = step()
            print(json.dumps({"wall_ms": wall, "cpu_ms": cpu, "loss": loss}), flush=True)
        return
    times, cpu = [], []
    for i in range(args.warmup + args.steps):
        w, c_ms, loss = step()
        if i >= args.warmup:
            times.append(w)
            cpu.append(c_ms)
    print(json.dumps({"ms_per_step": statistics.median(times), "cpu_ms_per_step": statistics.median(cpu),
                      "loss": loss, **info}))


if __name__ == "__main__":
    main()
