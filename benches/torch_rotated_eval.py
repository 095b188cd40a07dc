#!/usr/bin/env python3
"""PyTorch baseline of `rotvar bench eval-angles`: the test set (random MNIST-shaped images,
balanced labels) evaluated at N evenly spaced angles with affine_grid + grid_sample (bilinear,
fill = normalized black) and the identical model, per-angle loss and accuracy accumulated on the
device, class x angle counts and group accuracy as rotvar reports them. One JSON line per model.
"""
import argparse, json, math, time
import torch
import torch.nn.functional as F
from torch_reference import MODELS


def rotate(x, angles_deg, fill):
    # Inverse map of a counter-clockwise (as displayed) rotation, align_corners=True so the
    # centre is ((w-1)/2, (h-1)/2) as in rotvar. grid_sample pads with zeros: shift by the fill.
    t = angles_deg * math.pi / 180.0
    c, s = torch.cos(t), torch.sin(t)
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = c, -s, s, c
    grid = F.affine_grid(theta, x.shape, align_corners=True)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + fill


@torch.no_grad()
def run(model, x, y, angles, batch, classes=10):
    n, a = x.shape[0], len(angles)
    per = max(1, batch // a)
    loss = torch.zeros(a, device=x.device, dtype=torch.float64)
    correct = torch.zeros(a, classes, device=x.device, dtype=torch.int64)
    image_correct = torch.zeros(n, device=x.device, dtype=torch.int64)
    ang = torch.tensor(angles, device=x.device)
    for i in range(0, n, per):
        xb, yb = x[i:i + per], y[i:i + per]
        k = xb.shape[0]
        xr = rotate(xb.repeat(a, 1, 1, 1), ang.repeat_interleave(k), -0.4242)
        logp = model(xr)
        yr = yb.repeat(a)
        nll = -logp.gather(1, yr[:, None])[:, 0]
        loss += nll.view(a, k).double().sum(1)
        hit = (logp.argmax(1) == yr).view(a, k)
        correct.index_put_((torch.arange(a, device=x.device).repeat_interleave(k), yr), hit.flatten().long(), accumulate=True)
        image_correct[i:i + k] += hit.sum(0)
    return loss.cpu(), correct.cpu(), image_correct.cpu()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="lenet,simpleconv")
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--angles", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(a.device)
    torch.manual_seed(0)
    x = (torch.randint(0, 256, (a.images, 1, 28, 28), device=dev).float() / 255 - 0.1307) / 0.3081
    y = torch.arange(a.images, device=dev) % 10
    angles = [360.0 * i / a.angles for i in range(a.angles)]
    for name in a.models.split(","):
        model = MODELS[name]().to(dev).eval()
        run(model, x[:a.batch_size], y[:a.batch_size], angles, a.batch_size)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        run(model, x, y, angles, a.batch_size)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        print(json.dumps({"impl": "pytorch", "model": name, "device": str(dev), "images": a.images,
                          "angles": a.angles, "seconds": secs,
                          "rotated_images_per_second": a.images * a.angles / secs}), flush=True)


if __name__ == "__main__":
    main()
