#!/usr/bin/env python3
"""PyTorch baseline of rotvar's variance measure (`rotvar bench measure`): forward hooks on every
layer of the identical model, Welford running moments in torch on the device: per (sample,
unit) over rotations for V_t, per (class, rotation, unit) over samples for V_x (merged across
batches with Chan's formula), in float64, stratified by class; per feature map (mean over H x W)
or per element. Reports seconds and peak GPU memory; one JSON line per model.
"""
import argparse, json, math, time
import torch
from torch_rotated_eval import rotate
from torch_reference import MODELS


class Acc:
    def __init__(self, units, batch, classes, m, dev):
        z = lambda *s: torch.zeros(*s, device=dev, dtype=torch.float64)
        self.vx_n, self.vx_mean, self.vx_m2 = z(classes, m, 1), z(classes, m, units), z(classes, m, units)
        self.vt_mean, self.vt_m2 = z(batch, units), z(batch, units)
        self.sum_std = z(classes, units)
        self.classes, self.m = classes, m

    def update(self, a, y, j):
        a = a.double()
        k = a.shape[0]
        # V_t: Welford over rotations per (sample, unit).
        if j == 0:
            self.vt_mean[:k] = a
            self.vt_m2[:k] = 0
        else:
            d = a - self.vt_mean[:k]
            self.vt_mean[:k] += d / (j + 1)
            self.vt_m2[:k] += d * (a - self.vt_mean[:k])
        if j == self.m - 1:
            std = (self.vt_m2[:k] / max(self.m - 1, 1)).sqrt() if self.m > 1 else torch.zeros_like(a)
            self.sum_std.index_add_(0, y, std)
        # V_x: this batch's per-class moments, merged with Chan's formula.
        onehot = torch.nn.functional.one_hot(y, self.classes).double()
        nb = onehot.sum(0)[:, None]
        mb = (onehot.T @ a) / nb.clamp(min=1)
        m2b = onehot.T @ (a * a) - nb * mb * mb
        na, ma, m2a = self.vx_n[:, j], self.vx_mean[:, j], self.vx_m2[:, j]
        n = na + nb
        delta = mb - ma
        self.vx_mean[:, j] = torch.where(n > 0, ma + delta * nb / n.clamp(min=1), ma)
        self.vx_m2[:, j] = m2a + m2b + torch.where(n > 0, delta * delta * na * nb / n.clamp(min=1), 0)
        self.vx_n[:, j] = n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="simpleconv")
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--rotations", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--per", default="map", choices=["map", "element"])
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(a.device)
    torch.manual_seed(0)
    x = (torch.randint(0, 256, (a.images, 1, 28, 28), device=dev).float() / 255 - 0.1307) / 0.3081
    y = torch.arange(a.images, device=dev) % 10
    angles = [-180.0 + 360.0 * j / a.rotations for j in range(a.rotations)]
    for name in a.models.split(","):
        model = MODELS[name]().to(dev).eval()
        accs, current = {}, {}

        def hook(mod, inp, out, key=None):
            v = out.mean(dim=(2, 3)) if (out.dim() == 4 and a.per == "map") else out.flatten(1)
            if key not in accs:
                accs[key] = Acc(v.shape[1], a.batch_size, 10, a.rotations, dev)
            accs[key].update(v, current["y"], current["j"])

        for i, layer in enumerate(model):
            if not isinstance(layer, torch.nn.Flatten):
                layer.register_forward_hook(lambda m, i_, o, key=i: hook(m, i_, o, key))
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with torch.no_grad():
            for s in range(0, a.images, a.batch_size):
                xb, yb = x[s:s + a.batch_size], y[s:s + a.batch_size]
                current["y"] = yb
                for j, ang in enumerate(angles):
                    current["j"] = j
                    model(rotate(xb, torch.full((xb.shape[0],), ang, device=dev), -0.4242))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
        print(json.dumps({"impl": "pytorch-hooks-welford", "model": name, "device": str(dev), "images": a.images,
                          "rotations": a.rotations, "per": a.per, "measure_seconds": secs,
                          "peak_gpu_mib": peak}), flush=True)


if __name__ == "__main__":
    main()
