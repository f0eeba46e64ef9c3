"""Flower 1.42 with its central-DP wrapper on the task benches/compare_dp.py gives cohort.

Usage: flower_dp.py SHARES_JSON ROUNDS NOISE_MULTIPLIER CLIP_NORM SEED OUT_JSON
(NOISE_MULTIPLIER 0: no DP wrapper, plain FedAvg.)

Logistic regression with two logits (cohort's `logistic` model: 30 × 2 weights and 2
biases) on the bundled breast-cancer table; client k trains on the rows cohort's simulation
gave participant k (`--export-partition`: the same training and held-out rows) and
standardises with statistics of its own training rows; 2 epochs of mini-batch SGD (batch 16,
learning rate 0.1) a round, every client every round. FedAvg wrapped in
`DifferentialPrivacyServerSideFixedClipping` (each update clipped to CLIP_NORM in L2, Gaussian
noise of NOISE_MULTIPLIER · CLIP_NORM / clients on the mean), the clients reporting one
example each so that the mean is unweighted, as the mechanism's sensitivity assumes. Flower
has no accountant: NOISE_MULTIPLIER comes from cohort's, for the same (ε, δ).
Writes {"federated_accuracy": …} (the example-weighted held-out accuracy of the last round).
"""
import csv
import json
import os
import sys

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import (DifferentialPrivacyServerSideFixedClipping,
                                  FedAvg)
from flwr.simulation import run_simulation

SHARES, ROUNDS, Z, CLIP, SEED, OUT = (
    sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]),
    int(sys.argv[5]), sys.argv[6])
EPOCHS, BATCH, LR = 2, 16, 0.1
HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(HERE, "..", "examples", "data", "breast_cancer.csv")) as f:
    header, *rows = list(csv.reader(f))
DATA = np.array(rows, dtype=np.float64)
LABEL = header.index("diagnosis")
X = np.delete(DATA, LABEL, axis=1)
Y = DATA[:, LABEL].astype(int)
with open(SHARES) as f:
    SPLIT = json.load(f)
CLIENTS = len(SPLIT["train"])


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class LogReg(NumPyClient):
    def __init__(self, k):
        tr, te = SPLIT["train"][k], SPLIT["test"][k]
        mean, std = X[tr].mean(0), X[tr].std(0)
        std[std < 1e-12] = 1.0
        self.xtr, self.ytr = (X[tr] - mean) / std, Y[tr]
        self.xte, self.yte = (X[te] - mean) / std, Y[te]
        self.rng = np.random.default_rng(SEED * 1000 + k)

    def fit(self, parameters, config):
        w, b = parameters[0].copy(), parameters[1].copy()
        n = len(self.ytr)
        for _ in range(EPOCHS):
            order = self.rng.permutation(n)
            for s in range(0, n, BATCH):
                i = order[s:s + BATCH]
                p = softmax(self.xtr[i] @ w + b)
                p[np.arange(len(i)), self.ytr[i]] -= 1.0
                w -= LR * self.xtr[i].T @ p / len(i)
                b -= LR * p.mean(0)
        return [w, b], 1, {}

    def evaluate(self, parameters, config):
        w, b = parameters
        if len(self.yte) == 0:
            return 0.0, 0, {"accuracy": 0.0}
        p = softmax(self.xte @ w + b)
        loss = float(-np.mean(np.log(np.clip(p[np.arange(len(self.yte)), self.yte], 1e-12, 1))))
        acc = float(np.mean(p.argmax(1) == self.yte))
        return loss, len(self.yte), {"accuracy": acc}


def client_fn(context: Context):
    return LogReg(int(context.node_config["partition-id"])).to_client()


def weighted_accuracy(metrics):
    n = sum(m for m, _ in metrics)
    acc = sum(m * d["accuracy"] for m, d in metrics) / max(n, 1)
    with open(OUT, "w") as f:
        json.dump({"federated_accuracy": acc}, f)
    return {"accuracy": acc}


def server_fn(context: Context):
    rng = np.random.default_rng(SEED)
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=CLIENTS,
        min_evaluate_clients=CLIENTS,
        min_available_clients=CLIENTS,
        initial_parameters=ndarrays_to_parameters(
            [rng.normal(0, 0.01, (X.shape[1], 2)), np.zeros(2)]),
        evaluate_metrics_aggregation_fn=weighted_accuracy,
    )
    if Z > 0:
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=Z, clipping_norm=CLIP, num_sampled_clients=CLIENTS)
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))


if __name__ == "__main__":
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
