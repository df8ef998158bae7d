#!/usr/bin/env python3
"""numpy.memmap baseline for `motley bench loader`.

Reads a motley shard corpus (raw compression, text-only single-segment documents, u16 ids)
straight from the byte layout in docs/FORMAT.md with numpy.memmap, and packs documents into
the same fixed-shape batch fields as the Rust loader, single-threaded:
inputs/targets (u32 global ids), modality/target_modality (u8), positions, doc_ids,
segment_ids (u32) and loss_mask (u8). Each document flattens to BOS, ids + text offset, EOS;
rows hold seq_len + 1 positions; a document cut at a row end continues in the next row from
its last placed token; documents follow a seeded permutation.

Usage: loader_numpy.py CORPUS_DIR --seq-len 2048 --batch-size 8 --tokens 50000000 [--json]
Prints one JSON object: tokens, seconds, tokens_per_s, batches, padding_fraction.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

FOOTER_LEN = 160
CHUNK = np.dtype([("file_offset", "<u8"), ("stored_len", "<u4"), ("raw_len", "<u4"), ("crc", "<u4"), ("reserved", "<u4"), ("first_doc", "<u8")])
INDEX = np.dtype([("chunk", "<u4"), ("offset", "<u4"), ("len", "<u4"), ("positions", "<u4")])


def read_u32(mm, offs):
    """Little-endian u32 at each byte offset in `offs` (vectorized gather)."""
    b = [mm[offs + k].astype(np.uint32) for k in range(4)]
    return b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)


def open_shard(path):
    """Returns (u16 view of the file, payload start in u16 units, token count) per document."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    foot = np.asarray(mm[-FOOTER_LEN:])
    if bytes(foot[:8]) != b"MOTSFOOT" or bytes(mm[:8]) != b"MOTSHARD":
        raise ValueError(f"{path}: not a motley shard")
    if mm[16] != 0:
        raise ValueError(f"{path}: the numpy baseline reads raw shards only")
    num_docs, num_chunks, table, index = (int(x) for x in np.frombuffer(foot[16:48].tobytes(), "<u8"))
    chunks = np.frombuffer(np.asarray(mm[table : table + 32 * num_chunks]).tobytes(), CHUNK)
    idx = np.frombuffer(np.asarray(mm[index : index + 16 * num_docs]).tobytes(), INDEX)
    rec = chunks["file_offset"][idx["chunk"]] + idx["offset"].astype(np.uint64)
    rec = rec.astype(np.int64)
    nseg = read_u32(mm, rec)
    desc = rec + 8
    modality, kind, width = mm[desc], mm[desc + 1], mm[desc + 2]
    if not (np.all(nseg == 1) and np.all(modality == 0) and np.all(kind == 0) and np.all(width == 2)):
        raise ValueError(f"{path}: the numpy baseline needs text-only, single-segment, u16 documents")
    length = read_u32(mm, desc + 4).astype(np.int64)
    payload = rec + read_u32(mm, desc + 20).astype(np.int64)
    mm16 = np.memmap(path, dtype="<u2", mode="r", shape=(len(mm) // 2,))
    return mm16, payload // 2, length


def stream_reference(views, starts, lengths, which, T, B, tokens, text_offset):
    """Upper-bound reference, not the same work: every field of the batch filled from one flat
    slice of shard 0's payload per batch, ignoring document structure (no BOS/EOS, constant
    doc ids, positions 0..T). Shows what numpy reaches with no per-document work at all."""
    mm = views[0]
    first = int(starts[which == 0].min())
    last = int((starts + lengths)[which == 0].max())
    span = last - first - (B * T + 1)
    ar = np.arange(T, dtype=np.uint32)
    i, done = 0, 0
    t0, c0 = time.perf_counter(), time.thread_time()
    while done < tokens:
        x = mm[first + i : first + i + B * T + 1].astype(np.uint32)
        x += text_offset
        inputs = x[:-1].reshape(B, T).copy()
        targets = x[1:].reshape(B, T).copy()
        modality = np.zeros((B, T), np.uint8)
        target_modality = np.zeros((B, T), np.uint8)
        positions = np.broadcast_to(ar, (B, T)).copy()
        doc_ids = np.zeros((B, T), np.uint32)
        segment_ids = np.zeros((B, T), np.uint32)
        loss_mask = np.ones((B, T), np.uint8)
        i = (i + B * T) % max(span, 1)
        done += B * T
    dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return {"stream_tokens_per_s": done / dt, "stream_tokens_per_cpu_s": done / cpu}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    manifest = json.load(open(os.path.join(a.corpus, "manifest.json")))
    vocab = manifest["vocab"]
    bos, eos, pad = vocab["specials"]["bos"], vocab["specials"]["eos"], vocab["specials"]["pad"]
    text_offset = next(m["offset"] for m in vocab["modalities"] if m["modality"] == "text")
    views, starts, lengths, which = [], [], [], []
    for i, s in enumerate(manifest["shards"]):
        mm16, st, ln = open_shard(os.path.join(a.corpus, s["name"]))
        views.append(mm16)
        starts.append(st)
        lengths.append(ln)
        which.append(np.full(len(st), i, np.int64))
    starts, lengths, which = np.concatenate(starts), np.concatenate(lengths), np.concatenate(which)
    order = np.random.default_rng(a.seed).permutation(len(starts))

    T, B = a.seq_len, a.batch_size
    L = T + 1
    arange = np.arange(L, dtype=np.uint32)
    row = np.empty(L, np.uint32)
    rdoc = np.empty(L, np.uint32)
    rseg = np.empty(L, np.uint32)
    rpos = np.empty(L, np.uint32)
    rpad = np.empty(L, bool)
    pos, off = 0, 0  # position in the order, flattened offset inside the current document
    delivered, batches, pads = 0, 0, 0
    t0, c0 = time.perf_counter(), time.thread_time()
    while delivered < a.tokens:
        inputs = np.empty((B, T), np.uint32)
        targets = np.empty((B, T), np.uint32)
        modality = np.zeros((B, T), np.uint8)
        target_modality = np.zeros((B, T), np.uint8)
        positions = np.empty((B, T), np.uint32)
        doc_ids = np.empty((B, T), np.uint32)
        segment_ids = np.empty((B, T), np.uint32)
        loss_mask = np.empty((B, T), np.uint8)
        for b in range(B):
            p, d, seg = 0, 0, 0
            while p < L:
                if pos >= len(order):
                    pos, off = 0, 0
                doc = order[pos]
                n = int(lengths[doc]) + 2
                take = min(n - off, L - p)
                if p > 0 and off == 0 and take == 1 and n > 1:
                    break  # only BOS would fit: the document starts the next row (as the Rust loader)
                lo, hi = max(off, 1), min(off + take, n - 1)
                if hi > lo:
                    st = int(starts[doc])
                    row[p + lo - off : p + hi - off] = views[which[doc]][st + lo - 1 : st + hi - 1]
                    row[p + lo - off : p + hi - off] += text_offset
                    rseg[p + lo - off : p + hi - off] = seg + 1
                if off == 0:
                    row[p] = bos
                    rseg[p] = seg
                if off + take == n:
                    row[p + take - 1] = eos
                    rseg[p + take - 1] = seg + 2
                rdoc[p : p + take] = d
                rpos[p : p + take] = arange[:take]
                rpad[p : p + take] = False
                seg += 3
                d += 1
                p += take
                if off + take == n:
                    pos, off = pos + 1, 0
                else:
                    off = off + take - 1
                    break
            if p < L:
                row[p:] = pad
                rdoc[p:] = d
                rseg[p:] = seg
                rpos[p:] = arange[: L - p]
                rpad[p:] = True
                pads += max(0, T - p)
            inputs[b] = row[:T]
            targets[b] = row[1:]
            positions[b] = rpos[:T]
            doc_ids[b] = rdoc[:T]
            segment_ids[b] = rseg[:T]
            loss_mask[b] = (rdoc[:T] == rdoc[1:]) & ~rpad[1:]
        delivered += B * T
        batches += 1
    dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
    out = {
        "tokens": delivered,
        "seconds": dt,
        "cpu_seconds": cpu,
        "tokens_per_s": delivered / dt,
        "tokens_per_cpu_s": delivered / cpu,
        "batches": batches,
        "padding_fraction": pads / delivered,
        "numpy": np.__version__,
    }
    out.update(stream_reference(views, starts, lengths, which, T, B, a.tokens, text_offset))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
