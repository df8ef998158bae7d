"""Baseline for `motley bench tokenizers`: HF Python `tokenizers` encode_batch throughput.

Usage: .venv/bin/python scripts/bench/text_hf.py --tokenizer tokenizer.json --input corpus.txt
       [--batch-size 1024] [--repeat 3]
Encodes every non-empty line of the input (in batches, add_special_tokens=False) with the
same tokenizer.json the Rust side uses; thread count comes from RAYON_NUM_THREADS. Prints one
JSON object: best wall time over the repeats, sizes, and a checksum of the ids for parity.
"""

import argparse
import json
import time

from tokenizers import Tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

    tok = Tokenizer.from_file(a.tokenizer)
    with open(a.input, encoding="utf-8") as f:
        lines = [l.rstrip("\n") for l in f]
    lines = [l for l in lines if l]
    batches = [lines[i : i + a.batch_size] for i in range(0, len(lines), a.batch_size)]

    best = float("inf")
    tokens = 0
    checksum = 0
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        out = [tok.encode_batch(b, add_special_tokens=False) for b in batches]
        dt = time.perf_counter() - t0
        best = min(best, dt)
        tokens = sum(len(e.ids) for batch in out for e in batch)
        checksum = sum(sum(e.ids) for batch in out for e in batch)
    print(
        json.dumps(
            {
                "seconds": best,
                "lines": len(lines),
                "bytes": sum(len(l.encode("utf-8")) for l in lines),
                "tokens": tokens,
                "id_sum": checksum,
            }
        )
    )


if __name__ == "__main__":
    main()
