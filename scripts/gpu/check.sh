#!/usr/bin/env bash
# The GPU check behind the CUDA figures in docs/BENCHMARKS.md. It runs on a CUDA machine whose
# python3 has torch==2.11.0 and that has no Rust toolchain, so build and stage here first:
#   cargo build --release -p motley-tools
#   mkdir -p runs/gpu && objcopy --strip-debug target/release/motley runs/gpu/motley
#   cp -r runs/demo/corpus runs/gpu/corpus          # the demo's ingested sample corpus
#   bash scripts/gpu/build-cuda && objcopy --strip-debug target/cuda/release/motley runs/gpu/motley-cuda  # optional:
#     the encoders on CUDA; ~45 min cold on 2 cores (29 MB gzipped), so before the device is started
#   gzip -9 runs/gpu/motley runs/gpu/motley-cuda   # the device tool carries 64 MiB in all; stripped,
#     motley is ~51 MB and the CUDA build more (candle's kernels; a stripped CUDA test binary of
#     motley-tokenizers was 76 MB, 19 MB gzipped); check `du -ch runs/gpu` before carrying
# then, on the GPU machine from the repository root:  bash scripts/gpu/check.sh
# Results (JSON, logs, metrics, plots) are packed after every stage into $OUT/gpu-results.tgz
# (default OUT=runs/gpu/out). Each stage has its own time limit so one failure cannot eat the
# machine time of the rest.
set -uo pipefail
for b in runs/gpu/motley runs/gpu/motley-cuda; do
  if [ -f "$b.gz" ] && [ ! -x "$b" ]; then gunzip -c "$b.gz" > "$b" && chmod +x "$b"; fi
done
bin=${MOTLEY_BIN:-runs/gpu/motley}
corpus=${CORPUS:-runs/gpu/corpus}
dest=${OUT:-runs/gpu/out}
out=$(mktemp -d)
mkdir -p "$dest"
pack() { tar czf "$dest/gpu-results.tgz" --exclude=checkpoints --exclude='*.pt.trace.json' -C "$out" . ; }
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
stage() { printf '\n== %s\n' "$*"; }
run() { # run NAME LIMIT_S CMD...: stdout to NAME.out, stderr to NAME.err, a status line
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.out" 2>"$out/$name.err"
  echo "[$name] rc=$? in $((SECONDS - t0)) s"
  pack
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader; nproc
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } 2>&1 | tee "$out/device.txt"

stage "bench trainer on CUDA (bf16 compute), default shapes: d512 x 8 layers, seq 2048, batch 8"
run bench_cuda 120 "$bin" --json bench trainer --device cuda --python python3 --steps 10 --warmup 3 --grouped-mm
cat "$out/bench_cuda.out"; tail -4 "$out/bench_cuda.err"
# A fallback (tower_linear or fused AdamW failing on this device) warns once: show it.
grep -i "warn" "$out/bench_cuda.err" | head -5

stage "bench trainer on CUDA, 443M-class shapes: d1024 x 24 layers, 16 heads, seq 2048, batch 4"
run bench_cuda_big 150 "$bin" --json bench trainer --device cuda --python python3 --d-model 1024 --layers 24 \
  --heads 16 --seq 2048 --batch 4 --steps 10 --warmup 3 --grouped-mm
cat "$out/bench_cuda_big.out"; tail -4 "$out/bench_cuda_big.err"

stage "where the time goes: torch.profiler over the PyTorch mirror (dense, mot, mot-pertower, mot-grouped)"
run profile 120 python3 scripts/bench/profile_mot.py --steps 5 --rows 12
grep '###' "$out/profile.out"

stage "CPU reference on this quiet host: one torch thread, thread-CPU-time ratios"
OMP_NUM_THREADS=1 run bench_cpu 120 "$bin" --json bench trainer --device cpu --python python3 --grouped-mm
cat "$out/bench_cpu.out"

stage "tiny MoT vs dense on the sample corpus, CUDA (the demo's comparison)"
run train_tiny 120 "$bin" train --compare --preset tiny --data "$corpus" --device cuda --out "$out/tiny" --overwrite
tail -12 "$out/train_tiny.err" "$out/train_tiny.out"

stage "94M MoT on the sample corpus, CUDA: tokens/s and MFU"
run train_94m 75 "$bin" train --preset 94m --data "$corpus" --device cuda --steps 40 --out "$out/m94" --overwrite \
  --set train.log_every=10 --set train.eval_every=0 --set train.checkpoint_every=0 --set optim.warmup_steps=10
tail -6 "$out/train_94m.err" "$out/train_94m.out"

stage "train.profile_steps on CUDA: Kineto with CUDA activities (kernels in the trace), 94M, steps 6-7"
run train_94m_profile 90 "$bin" train --preset 94m --data "$corpus" --device cuda --steps 8 --out "$out/m94-prof" \
  --overwrite --set train.eval_every=0 --set train.checkpoint_every=0 --set 'train.profile_steps=[6,7]'
run profile_94m 60 "$bin" profile "$out/m94-prof" --top 12
cat "$out/profile_94m.out"; tail -3 "$out/train_94m_profile.err"

stage "data parallel: NCCL in a world of one (the DP path, every collective) vs one plain process, 94M"
dp_common=(--preset 94m --data "$corpus" --steps 30 --set train.log_every=10 --set train.eval_every=0
  --set train.checkpoint_every=0 --set optim.warmup_steps=10 --overwrite)
run train_94m_plain 75 "$bin" train "${dp_common[@]}" --device cuda --out "$out/m94-plain"
run train_94m_nccl1 90 "$bin" train --nproc 1 "${dp_common[@]}" --device cuda --out "$out/m94-nccl1"
tail -3 "$out/train_94m_nccl1.err"
# Step time (after the first 5 steps) and the communication share, from each run's metrics.
python3 - "$out/m94-plain/metrics.jsonl" "$out/m94-nccl1/metrics.jsonl" <<'PY' | tee "$out/dp_overhead.txt"
import json, statistics, sys
def steps(p):
    rows = [json.loads(l) for l in open(p) if l.strip()]
    return [r for r in rows if r["step"] > 5]
plain, dp = (steps(p) for p in sys.argv[1:3])
t = lambda rows: statistics.median(r["tokens"] / r["tokens_per_s"] for r in rows)
print(f"step s: plain {t(plain):.4f}, NCCL world of 1 {t(dp):.4f}, overhead {t(dp) / t(plain) - 1:+.2%}")
print("comm share:", statistics.median(r.get("comm_s", 0) / (r["tokens"] / r["tokens_per_s"]) for r in dp))
PY

stage "memory plan vs the CUDA allocator: 443M MoT, micro-batch 2 x 4096, chunked loss, checkpointing, ZeRO-3 (world of 1)"
# The run logs the plan's bytes beside what its second step allocated; the JSON summary has both
# (planned_bytes, step_peak_bytes, state_bytes). The same with ZeRO-3 off, for the gathered part.
mem_common=(--preset 443m --data "$corpus" --steps 3 --set data.batch_size=2 --set data.seq_len=4096
  --set model.ce_chunk_rows=4096 --set train.activation_checkpointing=true --set train.eval_every=0
  --set train.checkpoint_every=0 --overwrite --device cuda)
run plan_443m_z3 150 "$bin" --json train "${mem_common[@]}" --set train.zero=3 --out "$out/plan-z3"
run plan_443m_z0 120 "$bin" --json train "${mem_common[@]}" --out "$out/plan-z0"
grep -h "memory plan" "$out/plan_443m_z3.err" "$out/plan_443m_z0.err"

if [ -n "${TRANSFUSION_CORPUS:-}" ]; then
  stage "tiny Transfusion MoT vs dense, CUDA"
  run train_transfusion 120 "$bin" train --compare --preset tiny --data "$TRANSFUSION_CORPUS" --device cuda \
    --out "$out/tf" --overwrite
  tail -12 "$out/train_transfusion.err" "$out/train_transfusion.out"
fi
cuda_bin=${MOTLEY_CUDA_BIN:-runs/gpu/motley-cuda}
if [ -x "$cuda_bin" ]; then
  stage "pretrained encoders on CUDA (scripts/gpu/build-cuda): the same binary on cuda vs cpu, parity fixtures"
  # The CUDA build links the torch wheel's cuBLAS / NVRTC / cuRAND and the driver's libcuda.
  nvlib=$torch_lib/../../nvidia/cu13/lib
  fx=tokenizers/tests/fixtures/pretrained
  img=data/sample/images/$(ls data/sample/images | head -1)
  clip=data/sample/speech/seven_t1_gb.wav
  for dev in cpu cuda; do
    for m in vae:$img vq:$img mimi:$clip; do
      run "enc_${m%%:*}_$dev" 60 env LD_LIBRARY_PATH="$nvlib:$LD_LIBRARY_PATH" "$cuda_bin" --json --encoder-device $dev \
        tokenizer encode --tokenizer "$fx/${m%%:*}" "${m#*:}" --preview "$out/enc_${m%%:*}_$dev"
    done
  done
  # Codes: the share equal between devices (near-ties may flip); VAE: decoded pixels' largest gap.
  python3 - "$out" <<'PY' | tee "$out/encoders_cuda_vs_cpu.txt"
import json, sys, os
o = sys.argv[1]
for m in ("vq", "mimi"):
    try:
        a, b = (json.load(open(f"{o}/enc_{m}_{d}.out"))["segment"]["ids"] for d in ("cpu", "cuda"))
        print(m, "ids equal:", sum(x == y for x, y in zip(a, b)), "/", len(a), "lengths", len(a), len(b))
    except Exception as e:
        print(m, "no comparison:", e)
try:
    from PIL import Image
    import numpy as np
    a, b = (np.asarray(Image.open(f"{o}/enc_vae_{d}/decoded.png"), dtype=np.int16) for d in ("cpu", "cuda"))
    print("vae decoded max |cuda - cpu| pixel:", int(np.abs(a - b).max()))
except Exception as e:
    print("vae no comparison:", e)
PY
  stage "pretrained encoders' speed on CUDA vs diffusers / transformers on the same GPU (needs both in python3)"
  if python3 -c 'import diffusers, transformers' 2>/dev/null; then
    run bench_encoders_cuda 240 env LD_LIBRARY_PATH="$nvlib:$LD_LIBRARY_PATH" "$cuda_bin" --json --encoder-device cuda \
      bench tokenizers --only vae,vq-model,mimi --python python3 --threads 16 --seconds 5
    cat "$out/bench_encoders_cuda.out"
  else
    echo "python3 has no diffusers/transformers: skipped (carry them, or pip install where a registry is reachable)"
  fi
fi
pack
ls -la "$dest"
