#!/usr/bin/env bash
# medcnn and PyTorch side by side: same machine, same network, same batch, same thread count,
# alternating in one run, ROUNDS times (these machines share their host, so a single pair of
# runs can be off by 2x). Prints each round, the medians and ranges of images/s, and each conv
# layer's forward and backward ms beside PyTorch's conv alone at the same place.
# Needs a Python with torch (see benches/pytorch_reference.py):
#
#   PYTHON=~/torchenv/bin/python bash benches/compare.sh [THREADS] [BATCH] [-- SPEC FLAGS]
#   PYTHON=~/torchenv/bin/python ROUNDS=5 bash benches/compare.sh 2 64 -- --arch "Conv2d(32, 3, padding=1) ReLU ..." --image-size 64
#
# SPEC FLAGS are --arch, --image-size and --channels, passed to both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
BATCH=${2:-64}
shift $(( $# < 2 ? $# : 2 ))
[ "${1:-}" = "--" ] && shift
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-1}
STEPS=${STEPS:-30}
cargo build --release --quiet
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  ./target/release/medcnn bench --threads "$THREADS" --batch-size "$BATCH" --steps "$STEPS" --json \
    --plot "$OUT/bench.png" "$@" > "$OUT/medcnn_$r.json"
  MEDCNN=./target/release/medcnn "$PYTHON" benches/pytorch_reference.py --threads "$THREADS" \
    --batch-size "$BATCH" --steps "$STEPS" --json "$@" > "$OUT/torch_$r.json"
  echo "round $r done" >&2
done
"$PYTHON" - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {k: [json.load(open(f"{out}/{k}_{r}.json")) for r in range(1, rounds + 1)] for k in ("medcnn", "torch")}
m0 = rows["medcnn"][0]
print(f"machine: {m0['machine']['cpu']}, {m0['machine']['threads']} threads; batch {m0['batch_size']}")
print(f"model: {m0['arch']} on {m0['input']['size']}x{m0['input']['size']} x{m0['input']['channels']}")
print(f"{'round':<6} {'medcnn train':>13} {'torch train':>12} {'ratio':>6} {'medcnn infer':>13} {'torch infer':>12} {'ratio':>6}")
tr, ir = [], []
for r in range(rounds):
    m, t = rows["medcnn"][r], rows["torch"][r]
    a, b = m["train_images_per_sec"], t["train_images_per_sec"]
    c, d = m["infer_images_per_sec"], t["infer_images_per_sec"]
    tr.append(a / b); ir.append(c / d)
    print(f"{r + 1:<6} {a:>13.0f} {b:>12.0f} {a / b:>5.2f}x {c:>13.0f} {d:>12.0f} {c / d:>5.2f}x")
def summary(key, who):
    v = [x[key] for x in rows[who]]
    return f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"
print(f"median (range) images/s: train medcnn {summary('train_images_per_sec', 'medcnn')}, "
      f"PyTorch {summary('train_images_per_sec', 'torch')}, ratio {statistics.median(tr):.2f}x ({min(tr):.2f}-{max(tr):.2f}); "
      f"inference medcnn {summary('infer_images_per_sec', 'medcnn')}, PyTorch {summary('infer_images_per_sec', 'torch')}, "
      f"ratio {statistics.median(ir):.2f}x ({min(ir):.2f}-{max(ir):.2f})")
# Each conv layer (medcnn's fused conv + ReLU + pool, or its plain conv) against PyTorch's conv
# alone at the same place: the layer names match, PyTorch's ReLU and pool are separate layers.
def ms(who, name, key):
    v = [l[key] for x in rows[who] for l in x["layers"] if l["name"] == name]
    return statistics.median(v), min(v), max(v)
convs = [l["name"] for l in rows["torch"][0]["layers"] if l["layer"] == "Conv2d"]
if convs:
    print("per conv layer, ms median (range): medcnn's layer against PyTorch's Conv2d alone")
    print(f"{'layer':<16} {'medcnn fwd':>20} {'torch conv fwd':>20} {'medcnn bwd':>20} {'torch conv bwd':>20}")
    fmt = lambda t: f"{t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f})"
    for name in convs:
        if not any(l["name"] == name for l in m0["layers"]):
            continue
        cells = [fmt(ms(who, name, key)) for key in ("forward_ms", "backward_ms") for who in ("medcnn", "torch")]
        print(f"{name:<16} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20} {cells[3]:>20}")
PY
