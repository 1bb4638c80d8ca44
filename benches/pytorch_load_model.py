#!/usr/bin/env python3
"""Loads a medcnn `model.safetensors` into PyTorch and classifies images.

The module comes from `medcnn arch --pytorch` for the spec stored in the file (the reference
for files without one); medcnn names and lays out its weights as that module's `state_dict`,
so the file loads with `load_state_dict(strict=True)`. Not run in CI (it needs torch and
safetensors):

    ~/torchenv/bin/pip install torch safetensors pillow
    ~/torchenv/bin/python benches/pytorch_load_model.py outputs/model.safetensors IMAGE.jpeg ...
"""
import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pytorch_reference import build


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path, images = sys.argv[1], sys.argv[2:]
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    classes = json.loads(meta["classes"])
    arch = meta.get("arch", "reference")
    size, channels = int(meta.get("image_size", 64)), int(meta.get("channels", 1))
    dropout = float(meta["dropout"]) if arch == "reference" and "dropout" in meta else None
    model = build(arch, size, channels, len(classes), dropout)
    model.load_state_dict(load_file(path), strict=True)
    model.eval()
    print(f"loaded {path}: {sum(p.numel() for p in model.parameters())} parameters, classes {classes}")
    if images:
        from PIL import Image
        import numpy as np
        for img in images:
            im = Image.open(img)
            im = im.convert("RGB" if channels == 3 and im.mode not in ("L", "I;16", "LA") else "L").resize((size, size))
            x = np.asarray(im, dtype=np.float32) / 255.0
            x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
            x = np.repeat(x, channels // x.shape[0], axis=0)
            x = torch.from_numpy((x - 0.5) / 0.5)[None]
            with torch.no_grad():
                p = torch.softmax(model(x), dim=1)[0]
            print(f"{img}: {classes[int(p.argmax())]} ({100 * float(p.max()):.2f}%)")


if __name__ == "__main__":
    main()
