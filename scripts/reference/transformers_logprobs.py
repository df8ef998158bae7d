#!/usr/bin/env python3
"""Log-probabilities of a sequence under a model folder `motley export` wrote, run by Hugging
Face transformers itself (`AutoModelForCausalLM`: Qwen3 or Llama), for comparison with
`motley sample --json`'s `logprobs` (tests/e2e.rs).

    python scripts/reference/transformers_logprobs.py hf/tiny-dense --ids 4097,65,482 --score-from 1

prints {"architecture": ..., "logprobs": [[log p(ids[i] | ids[:i]) for i >= score-from], …]},
one list per --ids.
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--ids", required=True, action="append",
                    help="comma-separated global ids, BOS first (repeat for several sequences)")
    ap.add_argument("--score-from", type=int, action="append",
                    help="first position whose id is scored, per --ids (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    out = []
    for k, text in enumerate(args.ids):
        ids = [int(t) for t in text.split(",")]
        start = args.score_from[k] if args.score_from and k < len(args.score_from) else 1
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        out.append([float(logp[i - 1, ids[i]]) for i in range(max(start, 1), len(ids))])
    print(json.dumps({"architecture": type(model).__name__, "logprobs": out}))


if __name__ == "__main__":
    main()
