#!/usr/bin/env python3
"""The identical PyTorch run for rotvar's MNIST accuracy acceptance figures.

Same model (benches/torch_reference.py), same protocol as `rotvar train`: normalization with the
training set's mean/std, Adam lr 1e-3, batch 256, reshuffled every epoch, last partial batch kept,
PyTorch default init. Prints test accuracy after every epoch as JSON lines.

    python benches/torch_train_mnist.py --model simpleconv --epochs 5 --data ../shared/datasets/mnist
"""
import argparse, gzip, json, os, struct, time
import numpy as np
import torch
import torch.nn.functional as F
from torch_reference import MODELS


def idx(path):
    with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    rank = magic & 0xFF
    dims = struct.unpack(">" + "I" * rank, data[4:4 + 4 * rank])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(dims)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="simpleconv")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="../shared/datasets/mnist")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    p = lambda n: os.path.join(a.data, n)
    xtr = torch.tensor(idx(p("train-images-idx3-ubyte.gz")), dtype=torch.float32).div_(255).unsqueeze(1)
    ytr = torch.tensor(idx(p("train-labels-idx1-ubyte.gz")), dtype=torch.long)
    xte = torch.tensor(idx(p("t10k-images-idx3-ubyte.gz")), dtype=torch.float32).div_(255).unsqueeze(1)
    yte = torch.tensor(idx(p("t10k-labels-idx1-ubyte.gz")), dtype=torch.long)
    mean, std = xtr.mean().item(), xtr.std(unbiased=False).item()
    xtr, xte = ((xtr - mean) / std).to(dev), ((xte - mean) / std).to(dev)
    ytr, yte = ytr.to(dev), yte.to(dev)
    model = MODELS[a.model]().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(1, a.epochs + 1):
        model.train()
        t = time.perf_counter()
        perm = torch.randperm(len(xtr), device=dev)
        for i in range(0, len(xtr), 256):
            b = perm[i:i + 256]
            opt.zero_grad(set_to_none=True)
            F.nll_loss(model(xtr[b]), ytr[b]).backward()
            opt.step()
        secs = time.perf_counter() - t
        model.eval()
        with torch.no_grad():
            correct = sum((model(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum().item() for i in range(0, len(xte), 1000))
        print(json.dumps({"impl": "pytorch", "model": a.model, "seed": a.seed, "epoch": epoch,
                          "test_accuracy": correct / len(xte), "train_seconds": secs}), flush=True)


if __name__ == "__main__":
    main()
