#!/usr/bin/env python3
"""PyTorch eager reference for `rotvar bench conv`: the same convolution shapes and passes, fp32.
On CUDA: cuDNN, TF32 off, median of CUDA-event timings after warm-up. On the CPU (--device cpu):
oneDNN, median of wall-clock timings after warm-up. JSON lines in rotvar's format."""
import argparse, json, time
import torch

SHAPES = [  # (layer, N, C, H, K, kernel, stride, pad) at batch N, as in src/bench.rs conv_shapes
    ("simpleconv.conv1", 1, 28, 32, 3, 1, 1), ("simpleconv.conv2", 32, 28, 32, 3, 1, 1),
    ("simpleconv.conv3", 32, 14, 64, 3, 1, 1), ("simpleconv.conv4", 64, 14, 64, 3, 1, 1),
    ("simpleconv.conv5", 64, 7, 128, 3, 1, 1), ("lenet.conv1", 1, 28, 6, 5, 1, 2),
    ("lenet.conv2", 6, 14, 16, 5, 1, 2),
    ("lenet.conv3", 16, 7, 120, 5, 1, 2),
    ("resnet18.conv1", 3, 32, 64, 3, 1, 1), ("resnet18.layer1", 64, 32, 64, 3, 1, 1),
    ("resnet18.layer2.down", 64, 32, 128, 3, 2, 1), ("resnet18.layer2.shortcut", 64, 32, 128, 1, 2, 0),
    ("resnet18.layer2", 128, 16, 128, 3, 1, 1), ("resnet18.layer3", 256, 8, 256, 3, 1, 1),
    ("resnet18.layer4", 512, 4, 512, 3, 1, 1),
]


def median_ms_cpu(f, reps):
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); f(); times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def median_ms(f, reps):
    f(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--models", default="lenet,simpleconv", help="comma-separated models whose layers to time (lenet, simpleconv, resnet18), as rotvar bench conv --models")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                    help="as rotvar's --precision: fp32 with TF32 off (the default), TF32 on, or bf16 tensors")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = a.device
    timer = median_ms if dev == "cuda" else median_ms_cpu
    impl, device = ("cudnn", torch.cuda.get_device_name()) if dev == "cuda" else ("pytorch-cpu", f"cpu ({torch.get_num_threads()} threads)")
    torch.backends.cudnn.allow_tf32 = a.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = a.precision == "tf32"
    torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    n = a.batch_size
    for layer, c, h, k, r, s, p in SHAPES:
        if layer.split(".")[0] not in a.models.split(","):
            continue
        x = torch.randn(n, c, h, h, device=dev, dtype=dtype, requires_grad=True)
        w = torch.randn(k, c, r, r, device=dev, dtype=dtype, requires_grad=True)
        b = torch.randn(k, device=dev, dtype=dtype)
        y = torch.nn.functional.conv2d(x, w, b, s, p)
        dy = torch.randn_like(y)
        oh = y.shape[2]
        flops = 2.0 * n * k * oh * oh * c * r * r
        passes = {
            "forward": lambda: torch.nn.functional.conv2d(x, w, b, s, p),
            "backward_data": lambda: torch.ops.aten.convolution_backward(dy, x, w, [k], [s, s], [p, p], [1, 1], False, [0, 0], 1, [True, False, False]),
            "backward_weight": lambda: torch.ops.aten.convolution_backward(dy, x, w, [k], [s, s], [p, p], [1, 1], False, [0, 0], 1, [False, True, True]),
        }
        for name, f in passes.items():
            ms = timer(f, a.reps)
            print(json.dumps({"impl": impl, "precision": a.precision, "layer": layer, "pass": name, "median_ms": ms,
                              "gflops": flops / (ms * 1e-3) / 1e9, "device": device}), flush=True)


if __name__ == "__main__":
    main()
