"""What the PyTorch peers share with each other: cohort's Fashion-MNIST CNN in PyTorch, and a
reader for MNIST-style IDX files (raw or gzipped), as `cohort_model::data::load_idx` reads them.
Used by train_pytorch.py and flower_fashion.py."""
import gzip
import os

import numpy as np
from torch import nn
import torch


def read_idx(d, stem):
    """The array in `d`/`stem`[.gz] (an IDX file of unsigned bytes)."""
    for name in (stem + ".gz", stem):
        path = os.path.join(d, name)
        if os.path.exists(path):
            with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
                raw = f.read()
            ndim = raw[3]
            dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
            return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    raise SystemExit(f"{d} has no {stem}[.gz]: apt-get install dataset-fashion-mnist")


class Cnn(nn.Module):
    """`ModelSpec::Cnn` for 28x28 images: conv 3x3 (1->8, same padding), ReLU, 2x2 max-pool,
    conv 3x3 (8->16), ReLU, 2x2 max-pool, linear 784->64, ReLU, linear 64->10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))
