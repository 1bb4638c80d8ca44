#!/usr/bin/env bash
# medcnn and PyTorch side by side, same machine, same batch, same thread count, one after the
# other in one run. Needs a Python with torch (see benches/pytorch_reference.py):
#
#   PYTHON=~/torchenv/bin/python bash benches/compare.sh [THREADS] [BATCH]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
BATCH=${2:-64}
PYTHON=${PYTHON:-python3}
cargo build --release --quiet
echo "== medcnn =="
./target/release/medcnn bench --threads "$THREADS" --batch-size "$BATCH" --steps 30
echo
echo "== PyTorch =="
"$PYTHON" benches/pytorch_reference.py --threads "$THREADS" --batch-size "$BATCH" --steps 30
