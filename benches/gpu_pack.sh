#!/usr/bin/env bash
# Builds what benches/gpu_check.sh needs on a GPU machine that has no Rust toolchain, into one
# folder (git-ignored if under target/; keep it under 64 MiB): the stripped medcnn binary, the
# stripped cuda_vs_cpu test binary, the scripts, and a MedNIST subset (PER images per class,
# default 1000) cut from the full archive.
#   bash benches/gpu_pack.sh DIR [ARCHIVE] [PER]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:?usage: gpu_pack.sh DIR [ARCHIVE] [PER]}"
ARCHIVE="${2:-../shared/data/MedNIST.tar.gz}"
PER="${3:-1000}"
mkdir -p "$DIR"
cargo build --release --features cuda --quiet
TEST=$(cargo test --release --features cuda --test cuda_vs_cpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([j["executable"] for j in map(json.loads, sys.stdin) if j.get("executable")][-1])')
cp target/release/medcnn "$DIR/medcnn"
cp "$TEST" "$DIR/cuda_vs_cpu"
strip "$DIR/medcnn" "$DIR/cuda_vs_cpu"
cp benches/gpu_check.sh benches/pytorch_reference.py "$DIR/"
python3 - "$ARCHIVE" "$DIR/MedNIST-subset.tar.gz" "$PER" <<'PY'
import sys, tarfile, collections
src, dst, per = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = collections.Counter()
with tarfile.open(src, "r:gz") as tin, tarfile.open(dst, "w:gz") as tout:
    for m in tin:
        parts = m.name.split("/")
        if m.isfile() and len(parts) >= 3:
            cls = parts[-2]
            if seen[cls] >= per:
                continue
            seen[cls] += 1
            tout.addfile(m, tin.extractfile(m))
print(f"subset: {sum(seen.values())} images, {dict(seen)}")
PY
du -sh "$DIR"
