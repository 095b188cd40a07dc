#!/usr/bin/env python3
"""PyTorch reference for rotvar's training-throughput benchmark.

Runs the identical model (same layers, same init scheme, Adam, batch 256, fp32) on random
MNIST-shaped data and prints one JSON line per model: images/s over timed steps after warm-up.
Used side by side with `rotvar bench train` in benches/run_train_throughput.sh.
"""
import argparse, json, sys, time
import torch
import torch.nn as nn
import torch.nn.functional as F


def lenet(c=1, hw=28, classes=10):
    s = hw // 4
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 120, 5, padding=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(120 * s * s, 84), nn.ReLU(), nn.Linear(84, classes), nn.LogSoftmax(dim=1))


def simpleconv(c=1, hw=28, classes=10):
    f, fc = (32, 64) if c == 1 else (64, 128)
    s = hw // 4
    return nn.Sequential(
        nn.Conv2d(c, f, 3, padding=1), nn.ReLU(),
        nn.Conv2d(f, f, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(f, 2 * f, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * f, 2 * f, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * f, 4 * f, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * f * s * s, fc), nn.ReLU(), nn.Linear(fc, classes), nn.LogSoftmax(dim=1))


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), as rotvar's nn::BasicBlock."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet20(c=1, hw=28, classes=10):
    """CIFAR ResNet-20 (16/32/64 channels, 3 blocks a stage), as rotvar's models/resnet.rs."""
    layers, c_in = [nn.Conv2d(c, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, width in enumerate([16, 32, 64]):
        for i in range(3):
            layers.append(BasicBlock(c_in, width, 2 if stage > 0 and i == 0 else 1))
            c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes), nn.LogSoftmax(dim=1)]
    return nn.Sequential(*layers)


MODELS = {"lenet": lenet, "simpleconv": simpleconv, "resnet20": resnet20}


def kernels_per_step(step, steps=5):
    """GPU kernels (and memsets) per training step, from the profiler's device-side events; after
    the timed run, so the profiler costs the timing nothing. None if the profiler fails."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(1 for e in events if "memcpy" not in e.name.lower()) / steps
    except Exception as e:  # the timing above stands without this figure
        print(f"kernel count unavailable: {e}", file=sys.stderr)
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="lenet,simpleconv")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(a.device)
    torch.manual_seed(0)
    for name in a.models.split(","):
        model = MODELS[name]().to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(a.batch_size, 1, 28, 28, device=dev)
        y = torch.randint(0, 10, (a.batch_size,), device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.nll_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        for _ in range(a.warmup):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        print(json.dumps({
            "impl": "pytorch", "torch": torch.__version__, "model": name, "device": a.device,
            "cpu_capability": torch.backends.cpu.get_cpu_capability() if dev.type == "cpu" else None,
            "threads": torch.get_num_threads(), "batch_size": a.batch_size, "steps": a.steps,
            "images_per_second": a.batch_size * a.steps / secs,
            "kernel_launches_per_step": kernels_per_step(step) if dev.type == "cuda" else None,
        }), flush=True)


if __name__ == "__main__":
    main()
