#!/usr/bin/env python3
"""Where MoT's extra step time goes on CUDA: torch.profiler over the PyTorch reference model of
scripts/bench/mot_torch.py (the same algorithm as trainer/src/model.rs), dense vs MoT.

Prints per-step wall time, kernel time, and the top ops by GPU time. Variants:
`mot-icopy` restores sequence order with index_copy (forward scatter, backward gather) instead
of index_select (backward atomic index_add); `mot-grouped` runs every tower's projection as one
`torch._grouped_mm` over the sorted rows (tch 0.24 binds it as `f_internal_grouped_mm`), with
each tower's RMSNorm weight folded into the projection after a weightless norm over all rows.

    python scripts/bench/profile_mot.py --d-model 512 --layers 8 --seq 2048 --batch 8
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


def grouped_forward(self, x, r, ck):
    """Block.forward of mot_torch with one grouped GEMM per projection instead of per-tower slices."""
    b, t, offs, counts = r["b"], r["t"], r["offs"], r["counts"]
    h, hd = self.h, self.hd
    d = h * hd

    def gmm(xs, ws):  # xs [N, K] sorted rows; ws: per-tower [out, K] weights
        w = torch.stack([w.to(ck) for w in ws]).transpose(1, 2)  # [G, K, out], K-major
        return torch._grouped_mm(xs.to(ck), w, offs=offs)

    def rows(ws):  # per-tower vectors -> one row per token (sorted order)
        return torch.repeat_interleave(torch.stack(ws), counts, dim=0, output_size=x.shape[0])

    xn = F.rms_norm(x.float(), (d,), None, 1e-5)
    wqkv = [torch.cat([self.q[m].weight, self.k[m].weight, self.v[m].weight], 0) * self.attn_norm[m].weight
            for m in range(3)]
    y = gmm(xn, wqkv)
    q, k, v = y[:, :d], y[:, d:2 * d], y[:, 2 * d:]
    if self.qn is not None:
        n = x.shape[0]
        gq = rows([self.qn[m].weight for m in range(3)]).unsqueeze(1)
        gk = rows([self.kn[m].weight for m in range(3)]).unsqueeze(1)
        q = (F.rms_norm(q.float().view(n, h, hd), (hd,), None, 1e-5) * gq).view(n, d).to(ck)
        k = (F.rms_norm(k.float().view(n, h, hd), (hd,), None, 1e-5) * gk).view(n, d).to(ck)
    y = torch.cat([q, k, v], 1).index_select(0, r["inv"])
    y = y.view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
    q, k, v = mot_torch.rope(y[0], r), mot_torch.rope(y[1], r), y[2]
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=r["mask"], is_causal=r["mask"] is None)
    a = a.transpose(1, 2).reshape(b * t, d).index_select(0, r["perm"])
    x = x + gmm(a, [self.o[m].weight for m in range(3)]).float()
    xn = F.rms_norm(x, (d,), None, 1e-5)
    f = self.gate[0].weight.shape[0]
    gu = gmm(xn, [torch.cat([self.gate[m].weight, self.up[m].weight], 0) * self.ffn_norm[m].weight for m in range(3)])
    return x + gmm(F.silu(gu[:, :f]) * gu[:, f:], [self.down[m].weight for m in range(3)]).float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=18)
    args = ap.parse_args()
    dev = torch.device("cuda")
    batch = make_batch(args.batch, args.seq, 8192)
    vocab = 8192 + 7 + 8192 + 500
    d = args.d_model
    ffn = ((int(8 * d / 3) + 255) // 256) * 256
    icopy = lambda x, perm, inv: torch.zeros_like(x).index_copy(0, perm, x)  # y[j] = x[inv^-1..]
    orig_forward = mot_torch.Block.forward
    for name in ["dense", "mot", "mot-icopy", "mot-grouped"]:
        c = {"arch": "dense" if name == "dense" else "mot", "d_model": d, "n_layers": args.layers,
             "n_heads": args.heads, "ffn_dim": ffn, "vocab_size": vocab, "qk_norm": True}
        torch.manual_seed(0)
        model = mot_torch.Model(c).to(dev)
        r = mot_torch.prepare(batch, c, dev)
        if name == "mot-grouped":
            sizes = [n for _, n in r["spans"]]
            r["counts"] = torch.tensor(sizes, device=dev)
            r["offs"] = torch.tensor(sizes, device=dev).cumsum(0).to(torch.int32)
            mot_torch.Block.forward = grouped_forward
        if name == "mot-icopy":
            # index_select(0, inv) == zeros.index_copy(0, perm, .) for a permutation; its
            # backward is a gather instead of an atomic index_add.
            perm, inv = r["perm"], r["inv"]
            orig = torch.Tensor.index_select

            def patched(self, dim, index):
                if dim == 0 and index is inv:
                    return icopy(self, perm, inv)
                if dim == 0 and index is perm:
                    return icopy(self, inv, perm)
                return orig(self, dim, index)
            torch.Tensor.index_select = patched
        def step():
            loss = model(r, torch.bfloat16)
            loss.backward()
            model.zero_grad(set_to_none=True)
        try:
            for _ in range(3):
                step()
        except Exception as e:  # an unsupported op on this build: report and go on
            print(f"\n### {name}: failed: {e}")
            mot_torch.Block.forward = orig_forward
            continue
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall = 1000 * (time.perf_counter() - t0) / args.steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in ka if e.key.startswith("aten::")) / 1000 / 3
        cpu_ops = sum(e.count for e in ka if e.self_device_time_total > 0) / 3
        print(f"\n### {name}: wall {wall:.2f} ms/step fwd+bwd, kernels {gpu:.2f} ms/step, "
              f"ops with GPU work per step {cpu_ops:.0f}")
        print(ka.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=48))
        if name == "mot-icopy":
            torch.Tensor.index_select = orig
        mot_torch.Block.forward = orig_forward


if __name__ == "__main__":
    main()
