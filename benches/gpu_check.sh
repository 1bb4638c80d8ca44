#!/usr/bin/env bash
# Everything a GPU machine must show, in one run that needs no Rust toolchain there: the
# CUDA-vs-CPU test binary (MEDCNN_REQUIRE_GPU=1, so "no GPU" fails instead of skipping),
# `medcnn bench --device cuda` (per-layer times, images/s, our SGEMM at 1024^3), PyTorch's
# numbers for the same network when torch is there, and a 3-epoch training run on the archive.
# Every figure goes to OUT (the first argument); the summary is OUT/summary.txt.
#
# Build here (a machine with Rust), carry the folder benches/gpu_pack.sh makes:
#   bash benches/gpu_pack.sh gpu-carry              # stripped medcnn + the cuda_vs_cpu test binary
#                                                   # + a 1,000-per-class MedNIST subset, < 64 MiB
# Run there:
#   LD_LIBRARY_PATH=.../site-packages/nvidia/cu13/lib bash gpu-carry/gpu_check.sh OUT [PYTHON]
#
# The GPU engine runs the reference network only (other specs are refused, naming the reason);
# the other specs' lines say so in the summary rather than being left out.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:?usage: gpu_check.sh OUT [PYTHON]}"
PYTHON="${2:-python3}"
mkdir -p "$OUT"
BIN="$HERE/medcnn"
TEST="$HERE/cuda_vs_cpu"
ARCHIVE="$HERE/MedNIST-subset.tar.gz"
export MEDCNN_REQUIRE_GPU=1
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
step() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    summary "ok    $name ($((SECONDS - t0)) s)"
  else
    summary "FAIL  $name (exit $?, $((SECONDS - t0)) s): see $OUT/$name.log"
  fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
summary "gpu: $(tail -n +2 "$OUT/gpu.txt" | head -1)"
step cuda_vs_cpu 150 "$TEST" --nocapture --test-threads 1
step bench_reference 60 "$BIN" bench --device cuda --json --plot "$OUT/bench_reference.png"
for spec in "Conv2d(32, 3, padding=1) ReLU MaxPool2d(2) Conv2d(64, 3, padding=1) ReLU MaxPool2d(2) AdaptiveAvgPool2d(1) Flatten Linear" \
            "Conv2d(32, 5, stride=2, padding=2) ReLU Conv2d(64, 3, stride=2, padding=1) ReLU AvgPool2d(2) Flatten Linear"; do
  if "$BIN" bench --device cuda --arch "$spec" --steps 5 > "$OUT/bench_spec.log" 2>&1; then
    summary "ok    bench --arch \"$spec\""
  else
    summary "n/a   bench --arch \"$spec\": $(grep -m1 error "$OUT/bench_spec.log")"
  fi
done
if "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; then
  step pytorch_reference 90 env MEDCNN="$BIN" "$PYTHON" "$HERE/pytorch_reference.py" --device cuda --json
else
  summary "n/a   pytorch_reference: no torch with CUDA in $PYTHON"
fi
step train_3_epochs 240 "$BIN" train --device cuda --data "$ARCHIVE" --epochs 3 --out "$OUT/train"
# The numbers, in one place.
if [ -s "$OUT/bench_reference.log" ]; then
  "$PYTHON" - "$OUT" <<'PY' | tee -a "$OUT/summary.txt" || true
import json, sys
out = sys.argv[1]
b = json.load(open(f"{out}/bench_reference.log"))
print(f"medcnn cuda: train {b['train_images_per_sec']:.0f} img/s, inference {b['infer_images_per_sec']:.0f} img/s, "
      f"SGEMM 1024^3 {b.get('sgemm_1024_gflops') or 0:.0f} GFLOP/s")
try:
    t = json.load(open(f"{out}/pytorch_reference.log"))
    print(f"pytorch cuda: train {t['train_images_per_sec']:.0f} img/s, inference {t['infer_images_per_sec']:.0f} img/s")
except Exception:
    pass
try:
    s = json.load(open(f"{out}/train/summary.json"))
    print(f"3 epochs: test accuracy {100 * s['test_accuracy']:.2f}%, {s['train_images_per_sec']:.0f} img/s, {s['wall_seconds']:.0f} s")
except Exception:
    pass
PY
fi
grep -q FAIL "$OUT/summary.txt" && exit 1 || exit 0
