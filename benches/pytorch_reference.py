#!/usr/bin/env python3
"""A medcnn network in PyTorch, benchmarked the way `medcnn bench` benchmarks ours.

Same layers (built by `medcnn arch --pytorch` from the same --arch, --image-size and --channels),
same batch, same thread count: per-layer forward and backward times at the model's real shapes,
then whole training steps (Adam, cross-entropy) and inference, in images/s.

    python3 -m venv ~/torchenv && ~/torchenv/bin/pip install torch
    ~/torchenv/bin/python benches/pytorch_reference.py --threads 2 --batch-size 64
    ~/torchenv/bin/python benches/pytorch_reference.py --arch "Conv2d(32, 3, padding=1) ReLU MaxPool2d(2) ..."
    ~/torchenv/bin/python benches/pytorch_reference.py --device cuda

It measures; it does not train on data. `pytorch_load_model.py` beside it loads a medcnn
model.safetensors into this module.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
from torch import nn


class MedNISTNet(nn.Module):
    """Layer for layer the reference model medcnn trains (421,510 parameters for 6 classes).
    Kept for pytorch_load_model.py's old files; `build` below gets any spec from medcnn itself."""

    def __init__(self, num_classes=6, dropout=0.4):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 256, 3), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(256, 128), nn.Dropout(dropout), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.flatten(self.global_pool(self.conv_block(x))))


def medcnn_binary():
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("MEDCNN", os.path.join(here, "..", "target", "release", "medcnn"))


def build(arch="reference", image_size=64, channels=1, classes=6, dropout=None):
    """The network medcnn builds for this spec: `medcnn arch --pytorch` prints it as a module
    defining `model`, whose state_dict names and shapes are medcnn's saved tensors."""
    cmd = [medcnn_binary(), "arch", "--arch", arch, "--image-size", str(image_size), "--channels", str(channels),
           "--classes", str(classes), "--pytorch"]
    if dropout is not None:
        cmd += ["--dropout", str(dropout)]
    try:
        src = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        sys.exit(f"{cmd[0]} not found: build it first (cargo build --release) or set MEDCNN=path/to/medcnn")
    except subprocess.CalledProcessError as e:
        sys.exit(f"medcnn arch refused the spec: {e.stderr.strip()}")
    scope = {}
    exec(compile(src, "medcnn-arch", "exec"), scope)
    return scope["model"]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn, reps, sync):
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def flops(layer, x):
    if isinstance(layer, nn.Conv2d):
        n = x.shape[0]
        _, _, oh, ow = layer(x).shape
        kh, kw = layer.kernel_size
        return 2 * n * layer.out_channels * layer.in_channels * kh * kw * oh * ow
    if isinstance(layer, nn.Linear):
        return 2 * x.shape[0] * layer.in_features * layer.out_features
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--arch", default="reference", help="as medcnn's --arch")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=1)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build(a.arch, a.image_size, a.channels).to(dev)
    n = a.batch_size
    x = (torch.rand(n, a.channels, a.image_size, a.image_size, device=dev) * 2 - 1)
    y = torch.arange(n, device=dev) % 6

    layers = []
    h = x
    # The leaf modules in the order forward runs them (definition order, for both the reference
    # module and an nn.Sequential).
    named = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    first = named[0][0]
    model.train()
    for name, layer in named:
        inp = h.detach().requires_grad_(True)
        out = layer(inp)
        g = torch.randn_like(out)
        params = [p for p in layer.parameters()]
        fwd = timed(lambda: layer(inp), 5, sync)
        # Backward alone: one graph, its gradients taken repeatedly (retain_graph). Like medcnn's
        # first block, the first layer skips the gradient of the images (nobody needs it).
        wrt = ([inp] if name != first else []) + params
        bwd = timed(lambda: torch.autograd.grad(out, wrt, g, retain_graph=True), 5, sync) if wrt else 0.0
        with torch.no_grad():
            f = flops(layer, inp)
        bf = (2 if name != first else 1) * f
        layers.append({
            "name": name, "layer": layer.__class__.__name__, "input": list(inp.shape),
            "forward_ms": fwd, "backward_ms": bwd,
            "forward_gflops": f / (fwd * 1e6) if f else 0.0,
            "backward_gflops": bf / (bwd * 1e6) if f and bwd > 0 else 0.0,
        })
        h = out.detach()

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    step_ms = (time.perf_counter() - t) * 1e3 / a.steps

    model.eval()
    with torch.no_grad():
        model(x)
        sync()
        t = time.perf_counter()
        for _ in range(a.steps):
            model(x)
        sync()
        infer_ms = (time.perf_counter() - t) * 1e3 / a.steps

    with torch.no_grad():
        fwd_flops = sum(flops(l, torch.empty(1, *s["input"][1:], device=dev)) for (_, l), s in zip(named, layers))
    report = {
        "machine": {"cpu": cpu_name(), "cores": torch.get_num_threads() if a.device == "cpu" else None,
                    "threads": torch.get_num_threads()},
        "device": f"pytorch {torch.__version__} {a.device}" + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""),
        "batch_size": n,
        "arch": a.arch,
        "input": {"channels": a.channels, "size": a.image_size},
        "layers": layers,
        "train_step_ms": step_ms,
        "train_images_per_sec": n / (step_ms / 1e3),
        "train_gflops": 3 * fwd_flops * n / (step_ms * 1e6),
        "infer_images_per_sec": n / (infer_ms / 1e3),
        "flops_per_image_forward": fwd_flops,
    }
    if a.json:
        print(json.dumps(report, indent=2))
        return
    print(f"machine: {report['machine']['cpu']}, {report['machine']['threads']} threads; device: {report['device']}; batch {n}")
    print(f"model: {a.arch} on {a.image_size}x{a.image_size} {'gray' if a.channels == 1 else 'RGB'} images\n")
    print(f"{'layer':<14} {'':<18} {'input':<18} {'fwd ms':>10} {'GFLOP/s':>9} {'bwd ms':>10} {'GFLOP/s':>9}")
    for l in layers:
        g = lambda v: f"{v:.1f}" if v > 0 else "-"
        print(f"{l['name']:<14} {l['layer']:<18} {str(l['input']):<18} {l['forward_ms']:>10.3f} {g(l['forward_gflops']):>9} "
              f"{l['backward_ms']:>10.3f} {g(l['backward_gflops']):>9}")
    print(f"{'sum':<14} {'':<18} {'':<18} {sum(l['forward_ms'] for l in layers):>10.3f} {'':>9} "
          f"{sum(l['backward_ms'] for l in layers):>10.3f}\n")
    print(f"training step: {step_ms:.2f} ms = {report['train_images_per_sec']:.0f} images/s "
          f"({report['train_gflops']:.1f} GFLOP/s, {fwd_flops / 1e6:.1f} MFLOP per image forward)")
    print(f"inference: {report['infer_images_per_sec']:.0f} images/s")


if __name__ == "__main__":
    main()
