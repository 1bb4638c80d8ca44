#!/usr/bin/env python3
"""Loads a medcnn `model.safetensors` into the reference PyTorch module and classifies images.

medcnn names and lays out its weights as this module's `state_dict`, so the file loads with
`load_state_dict(strict=True)`. Not run in CI (it needs torch and safetensors):

    ~/torchenv/bin/pip install torch safetensors pillow
    ~/torchenv/bin/python benches/pytorch_load_model.py outputs/model.safetensors IMAGE.jpeg ...
"""
import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pytorch_reference import MedNISTNet


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path, images = sys.argv[1], sys.argv[2:]
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    classes = json.loads(meta["classes"])
    model = MedNISTNet(num_classes=len(classes), dropout=float(meta.get("dropout", 0.4)))
    model.load_state_dict(load_file(path), strict=True)
    model.eval()
    print(f"loaded {path}: {sum(p.numel() for p in model.parameters())} parameters, classes {classes}")
    if images:
        from PIL import Image
        import numpy as np
        for img in images:
            x = np.asarray(Image.open(img).convert("L").resize((64, 64)), dtype=np.float32) / 255.0
            x = torch.from_numpy((x - 0.5) / 0.5)[None, None]
            with torch.no_grad():
                p = torch.softmax(model(x), dim=1)[0]
            print(f"{img}: {classes[int(p.argmax())]} ({100 * float(p.max()):.2f}%)")


if __name__ == "__main__":
    main()
