"""Flower 1.42 simulation of the task `cohort simulate` runs in benches/compare_flower.py.

Logistic regression on the breast-cancer table (examples/data/breast_cancer.csv), 5 clients,
3 rounds of FedAvg; client k holds rows i with i % 5 == k (cohort's `--partition roundrobin`),
holds out 20% of them, standardises with statistics of its own training rows, and runs 20
full-batch gradient steps of learning rate 0.1 per round, from a zero initial model.
Writes the final federated accuracy to the path given as the first argument.
"""
import csv
import json
import os
import sys

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

CLIENTS, ROUNDS, STEPS, LR = 5, 3, 20, 0.1
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else None


def load():
    with open(os.path.join(HERE, "..", "examples", "data", "breast_cancer.csv")) as f:
        rows = list(csv.reader(f))[1:]
    data = np.array(rows, dtype=np.float64)
    return data[:, :-1], data[:, -1]


def client_data(k):
    x, y = load()
    idx = np.arange(len(y))[k::CLIENTS]
    rng = np.random.default_rng(k)
    rng.shuffle(idx)
    n_test = round(len(idx) * 0.2)
    te, tr = idx[:n_test], idx[n_test:]
    mean, std = x[tr].mean(0), x[tr].std(0)
    std[std < 1e-12] = 1.0
    return (x[tr] - mean) / std, y[tr], (x[te] - mean) / std, y[te]


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class LogReg(NumPyClient):
    def __init__(self, k):
        self.xtr, self.ytr, self.xte, self.yte = client_data(k)

    def fit(self, parameters, config):
        w, b = parameters[0].copy(), parameters[1].copy()
        n = len(self.ytr)
        for _ in range(STEPS):
            err = sigmoid(self.xtr @ w + b) - self.ytr
            w -= LR * self.xtr.T @ err / n
            b -= LR * err.mean(keepdims=True)
        return [w, b], n, {}

    def evaluate(self, parameters, config):
        w, b = parameters
        p = np.clip(sigmoid(self.xte @ w + b), 1e-12, 1 - 1e-12)
        loss = float(-np.mean(self.yte * np.log(p) + (1 - self.yte) * np.log(1 - p)))
        acc = float(np.mean((p > 0.5) == (self.yte > 0.5)))
        return loss, len(self.yte), {"accuracy": acc}


def client_fn(context: Context):
    return LogReg(int(context.node_config["partition-id"])).to_client()


def weighted_accuracy(metrics):
    n = sum(m for m, _ in metrics)
    acc = sum(m * d["accuracy"] for m, d in metrics) / n
    if OUT:
        with open(OUT, "w") as f:
            json.dump({"federated_accuracy": acc}, f)
    return {"accuracy": acc}


def server_fn(context: Context):
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=CLIENTS,
        min_evaluate_clients=CLIENTS,
        min_available_clients=CLIENTS,
        initial_parameters=ndarrays_to_parameters([np.zeros(30), np.zeros(1)]),
        evaluate_metrics_aggregation_fn=weighted_accuracy,
    )
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))


if __name__ == "__main__":
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
