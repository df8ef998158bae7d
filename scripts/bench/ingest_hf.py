"""Baseline for `motley bench ingest`: HF Python `tokenizers` encode_batch alone.

Reads a JSONL file of {"text": ...} documents (not timed), then times
Tokenizer.encode_batch over all of them (no special tokens added), in batches, on the
cores given by --threads (rayon inside `tokenizers`). Prints one JSON object on stdout.

    /work/main/.venv/bin/python scripts/bench/ingest_hf.py --tokenizer tok.json --input docs.jsonl --threads 2
"""

import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    args = ap.parse_args()
    # Must be set before the rayon pool inside `tokenizers` starts.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["RAYON_RS_NUM_CPUS"] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    texts = []
    with open(args.input, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["text"])
    best = None
    tokens = 0
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        n = 0
        for i in range(0, len(texts), args.batch):
            for enc in tok.encode_batch(texts[i : i + args.batch], add_special_tokens=False):
                n += len(enc.ids)
        dt = time.perf_counter() - t0
        tokens = n
        best = dt if best is None else min(best, dt)
    json.dump(
        {"documents": len(texts), "tokens": tokens, "seconds": best, "tokens_per_s": tokens / best, "threads": args.threads},
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
