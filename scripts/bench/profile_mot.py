#!/usr/bin/env python3
"""Where MoT's extra step time goes on CUDA: torch.profiler over the PyTorch reference model of
scripts/bench/mot_torch.py (the same algorithm as trainer/src/model.rs), dense vs MoT.

Prints per-step time, kernel time (CUDA) and the top ops. Variants: `mot` is motley's algorithm
(mot_torch.py: per-tower matmuls only, norms over all rows with folded weights);
`mot-pertower` the per-tower algorithm it replaced (every op per tower slice); `mot-grouped`
is `mot` with `model.grouped_mm`: every tower's projection as one `torch._grouped_mm` over the
sorted rows.

    python scripts/bench/profile_mot.py --d-model 512 --layers 8 --seq 2048 --batch 8
    python scripts/bench/profile_mot.py --device cpu --d-model 256 --layers 4 --seq 512 --batch 4
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mot_torch  # noqa: E402


def make_batch(b, t, text_vocab, seed=7):
    """Packed documents: caption (8-127 text), image (t/4 codes), utterance (32-255 units)."""
    rng = random.Random(seed)
    img_off, sp_off = text_vocab + 7, text_vocab + 7 + 8192
    out = {k: [] for k in ["inputs", "targets", "modality", "positions", "doc_ids", "loss_mask"]}
    for _ in range(b):
        row, doc = [], 0
        while len(row) < t + 1:
            parts = [(0, rng.randrange(8, 128)), (1, max(16, t // 4)), (2, rng.randrange(32, 256))]
            if rng.random() < 0.5:
                parts[1], parts[2] = parts[2], parts[1]
            d = [(1, 0)]
            for m, n in parts:
                off, size = [(0, text_vocab), (img_off, 8192), (sp_off, 500)][m]
                d += [(off + rng.randrange(size), m) for _ in range(n)]
            d.append((2, 0))
            row += [(i, m, doc, p) for p, (i, m) in enumerate(d)]
            doc += 1
        row = row[: t + 1]
        for i in range(t):
            x, y = row[i], row[i + 1]
            out["inputs"].append(x[0]); out["targets"].append(y[0]); out["modality"].append(x[1])
            out["positions"].append(x[3]); out["doc_ids"].append(x[2]); out["loss_mask"].append(int(x[2] == y[2]))
    out["batch_size"], out["seq_len"] = b, t
    return out


def pertower_forward(self, x, r, ck):
    """The per-tower Block.forward motley used before the fused towers of bfe0b55: each tower's
    slice runs its own norms, matmuls and elementwise ops; slices are narrowed (zero-filled full-size gradients
    in backward) and per-tower q/k/v matmuls are separate. Weights are sliced from the stacked
    parameters of mot_torch.Block."""
    spans, b, t = r["spans"], r["b"], r["t"]
    h, hd, f = self.h, self.hd, self.f
    d = h * hd
    towers = self.qkv.shape[0]

    def per_tower(x, fn):
        if towers == 1:
            return fn(0, x)
        return torch.cat([fn(m, x[s: s + n]) for m, (s, n) in enumerate(spans) if n > 0], 0)

    def norm(w, xs):
        return F.rms_norm(xs.float(), (w.shape[0],), w, 1e-5)

    def lin(w, xs):
        return F.linear(xs.to(ck), w.to(ck))

    def qkv(m, xs):
        xs = norm(self.attn_norm[m], xs)
        w = self.qkv[m]
        q, k, v = lin(w[:d], xs), lin(w[d:2 * d], xs), lin(w[2 * d:], xs)
        if self.qk_norm is not None:
            rows = xs.shape[0]
            q = norm(self.qk_norm[m, :hd], q.view(rows, h, hd)).view(rows, h * hd).to(ck)
            k = norm(self.qk_norm[m, hd:], k.view(rows, h, hd)).view(rows, h * hd).to(ck)
        return torch.cat([q, k, v], 1)

    y = per_tower(x, qkv).index_select(0, r["inv"])
    y = y.view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
    q, k, v = mot_torch.rope(y[0], r), mot_torch.rope(y[1], r), y[2]
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=r["mask"], is_causal=r["mask"] is None)
    a = a.transpose(1, 2).reshape(b * t, h * hd).index_select(0, r["perm"])
    x = x + per_tower(a, lambda m, s: lin(self.o[m], s)).float()

    def ffn(m, xs):
        xs = norm(self.ffn_norm[m], xs)
        gu = self.gate_up[m]
        return lin(self.down[m], F.silu(lin(gu[:f], xs)) * lin(gu[f:], xs))

    return x + per_tower(x, ffn).float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (fp32, one thread, thread-CPU time)")
    ap.add_argument("--variants", default="dense,mot,mot-pertower,mot-grouped")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    ck = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.thread_time
    if not cuda:
        torch.set_num_threads(1)
    batch = make_batch(args.batch, args.seq, 8192)
    vocab = 8192 + 7 + 8192 + 500
    d = args.d_model
    ffn = ((int(8 * d / 3) + 255) // 256) * 256
    orig_forward = mot_torch.Block.forward
    for name in args.variants.split(","):
        c = {"arch": "dense" if name == "dense" else "mot", "d_model": d, "n_layers": args.layers,
             "n_heads": args.heads, "ffn_dim": ffn, "vocab_size": vocab, "qk_norm": True}
        torch.manual_seed(0)
        model = mot_torch.Model(c).to(dev)
        r = mot_torch.prepare(batch, c, dev)
        if name == "mot-grouped":
            r["ends"] = torch.tensor(r["sizes"], device=dev).cumsum(0).to(torch.int32)
        if name == "mot-pertower":
            mot_torch.Block.forward = pertower_forward
        def step():
            loss = model(r, ck)
            loss.backward()
            model.zero_grad(set_to_none=True)
        try:
            for _ in range(3):
                step()
        except Exception as e:  # an unsupported op on this build: report and go on
            print(f"\n### {name}: failed: {e}")
            mot_torch.Block.forward = orig_forward
            continue
        sync()
        t0 = clock()
        for _ in range(args.steps):
            step()
        sync()
        wall = 1000 * (clock() - t0) / args.steps
        acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=acts) as prof:
            for _ in range(3):
                step()
            sync()
        ka = prof.key_averages()
        if cuda:
            gpu = sum(e.self_device_time_total for e in ka if e.key.startswith("aten::")) / 1000 / 3
            cpu_ops = sum(e.count for e in ka if e.self_device_time_total > 0) / 3
            print(f"\n### {name}: wall {wall:.2f} ms/step fwd+bwd, kernels {gpu:.2f} ms/step, "
                  f"ops with GPU work per step {cpu_ops:.0f}")
        else:
            ops = sum(e.count for e in ka if e.key.startswith("aten::")) / 3
            print(f"\n### {name}: thread-CPU {wall:.2f} ms/step fwd+bwd, aten ops per step {ops:.0f}")
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(ka.table(sort_by=sort, row_limit=args.rows, max_name_column_width=48))
        mot_torch.Block.forward = orig_forward


if __name__ == "__main__":
    main()
