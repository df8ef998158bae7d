"""The PyTorch side of `motley bench tokenizers --only mimi`: builds a randomly initialized
transformers MimiModel of the released kyutai/mimi geometry (MimiConfig's defaults: 512
channels, 8+8 transformer layers, 32 codebooks of 2048; no download), saves it where motley
loads it from, and times transformers' own encode of the same 24 kHz clips, one clip per call
(as ingest encodes one record's audio), keeping the same number of codebooks, on the same
thread count. Prints one JSON line.

    python scripts/bench/mimi_transformers.py --out DIR --clips a.wav b.wav --codebooks 8 \
        --threads 1 --seconds 5 [--device cuda] [--save]
"""

import argparse
import json
import time
import wave

import numpy as np
import torch

from transformers import MimiConfig, MimiModel


def read_wav(path):
    with wave.open(path) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2 and w.getframerate() == 24000, path
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--clips", nargs="+", required=True, help="mono 16-bit WAV at 24 kHz")
    ap.add_argument("--codebooks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N], as motley's --encoder-device")
    ap.add_argument("--save", action="store_true", help="build and save the model first")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.save:
        torch.manual_seed(0)
        MimiModel(MimiConfig()).save_pretrained(a.out, safe_serialization=True)
    dev = torch.device(a.device)
    model = MimiModel.from_pretrained(a.out).eval().to(dev)
    clips = [torch.from_numpy(read_wav(p))[None, None].to(dev) for p in a.clips]
    audio_s = sum(c.shape[-1] for c in clips) / 24000
    n = 0
    with torch.no_grad():
        model.encode(clips[0], num_quantizers=a.codebooks)  # warm-up
        start = time.perf_counter()
        while True:
            for c in clips:
                # Codes come back to the host, as motley's do.
                codes = model.encode(c, num_quantizers=a.codebooks).audio_codes.cpu()
            n += 1
            if time.perf_counter() - start >= a.seconds:
                break
        secs = time.perf_counter() - start
    print(json.dumps({"passes": n, "seconds": secs, "audio_seconds": n * audio_s,
                      "rtf": secs / (n * audio_s), "codes_shape": list(codes.shape),
                      "torch": torch.__version__, "device": str(dev)}))


if __name__ == "__main__":
    main()
