"""PyTorch side of benches/compare_pytorch.sh: the same network, data and hyper-parameters as
`cargo bench --bench train_speed`, timed the same way (one warm-up pass over 4 batches, then
the timed epochs, then test accuracy). Prints one JSON line.

--model cnn: Fashion-MNIST IDX files (pixels / 255), conv 3x3 (1->8, same padding), ReLU,
2x2 max-pool, conv 3x3 (8->16), ReLU, 2x2 max-pool, linear 784->64, ReLU, linear 64->10.
--model mlp: the bundled breast-cancer table, 20% held out, standardised with the training
rows' statistics, linear 30->64, ReLU, 64->64, ReLU, 64->2.
Both: plain SGD (or Adam), cross-entropy, a fresh shuffle of the training rows every epoch,
each batch gathered from the shuffled indices (as cohort does).
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from torch import nn

from torch_cnn import Cnn, read_idx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def fashion(d):
    out = []
    for prefix in ("train", "t10k"):
        x = read_idx(d, f"{prefix}-images-idx3-ubyte").astype(np.float32) / 255.0
        y = read_idx(d, f"{prefix}-labels-idx1-ubyte").astype(np.int64)
        out += [torch.from_numpy(x.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(y.copy())]
    return out


def breast_cancer():
    path = os.path.join(ROOT, "examples", "data", "breast_cancer.csv")
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    x, y = data[:, :-1], data[:, -1].astype(np.int64)
    rng = np.random.default_rng(7)
    idx = rng.permutation(len(y))
    n_te = round(len(y) * 0.2)
    te, tr = idx[:n_te], idx[n_te:]
    mean, std = x[tr].mean(0), x[tr].std(0)
    std[std < 1e-12] = 1.0
    f = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))
    return f(x[tr]), torch.from_numpy(y[tr]), f(x[te]), torch.from_numpy(y[te])


def mlp():
    return nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


def train(model, x, y, epochs, bs, lr, optimizer, gen):
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for s in range(0, len(y), bs):
            i = order[s : s + bs]
            xb, yb = x[i], y[i]
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(i)
        losses.append(total / len(y))
    return losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model == "cnn":
        xtr, ytr, xte, yte = fashion(a.data)
        model = Cnn()
    else:
        xtr, ytr, xte, yte = breast_cancer()
        model = mlp()
    if a.limit:
        xtr, ytr = xtr[: a.limit], ytr[: a.limit]
    gen = torch.Generator().manual_seed(1)
    # Warm-up on 4 batches of a throw-away copy, as the cohort side does.
    warm = Cnn() if a.model == "cnn" else mlp()
    n = min(4 * a.batch_size, len(ytr))
    train(warm, xtr[:n], ytr[:n], 1, a.batch_size, a.lr, a.optimizer, gen)
    t0 = time.perf_counter()
    losses = train(model, xtr, ytr, a.epochs, a.batch_size, a.lr, a.optimizer, gen)
    dt = time.perf_counter() - t0
    with torch.no_grad():
        acc = sum((model(xte[s : s + 1024]).argmax(1) == yte[s : s + 1024]).sum().item()
                  for s in range(0, len(yte), 1024)) / len(yte)
    images = len(ytr) * a.epochs
    print(json.dumps({
        "system": f"pytorch {torch.__version__}", "model": a.model, "device": "cpu",
        "threads": a.threads, "images": images, "epochs": a.epochs, "seconds": dt,
        "ms_per_image": dt * 1e3 / images, "images_per_second": images / dt,
        "first_epoch_loss": losses[0], "last_epoch_loss": losses[-1], "test_accuracy": acc,
    }))


if __name__ == "__main__":
    main()
