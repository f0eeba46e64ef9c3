"""Flower 1.42 + PyTorch simulation of the Fashion-MNIST task in benches/compare_flower.py.

Usage: python flower_fashion.py PARTITION_JSON OUT_JSON [--rounds 3] [--secagg] [--fraction F]

The shares are the ones `cohort simulate --export-partition` wrote for its own run (each
client's training and test rows of /usr/share/datasets/fashion-mnist), so both systems train
on identical data. Each client trains the same CNN as cohort (conv 3x3 1->8, ReLU, 2x2
max-pool, conv 3x3 8->16, ReLU, 2x2 max-pool, linear 784->64, ReLU, linear 64->10) for one
local epoch of plain SGD, lr 0.05, batch 32, on one thread; FedAvg weights by example count;
every round ends with federated evaluation on each client's test rows. Writes the final
round's example-weighted test accuracy to OUT_JSON.
"""
import json
import os
import sys

import numpy as np
import torch
from torch import nn
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

from torch_cnn import Cnn, read_idx  # beside this file; compare_flower.py puts it on PYTHONPATH

PARTITION, OUT = sys.argv[1], sys.argv[2]
ROUNDS = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
SECAGG = "--secagg" in sys.argv
# Fraction of the clients trained each round (evaluation asks every client, as cohort does).
FRACTION = float(sys.argv[sys.argv.index("--fraction") + 1]) if "--fraction" in sys.argv else 1.0
DATA = os.environ.get("FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
EPOCHS, BATCH, LR = 1, 32, 0.05

with open(PARTITION) as f:
    SHARES = json.load(f)
CLIENTS = len(SHARES["train"])


_FILES = {}


def load(prefix, rows):
    # Each Ray worker reads the files once (Flower builds a client per message).
    if prefix not in _FILES:
        _FILES[prefix] = (read_idx(DATA, f"{prefix}-images-idx3-ubyte"), read_idx(DATA, f"{prefix}-labels-idx1-ubyte"))
    images, labels = _FILES[prefix]
    x = images[rows].astype(np.float32) / 255.0
    y = labels[rows].astype(np.int64)
    return torch.from_numpy(x.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(y.copy())


def get_weights(model):
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model, weights):
    model.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(model.state_dict(), weights)})


class FashionClient(NumPyClient):
    def __init__(self, k):
        torch.set_num_threads(1)
        self.k = k
        self.xtr, self.ytr = load("train", SHARES["train"][k])
        self.xte, self.yte = load("t10k", SHARES["test"][k])
        self.model = Cnn()

    def fit(self, parameters, config):
        set_weights(self.model, parameters)
        opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(int(config.get("server_round", 0)) * 1000 + self.k)
        for _ in range(EPOCHS):
            order = torch.randperm(len(self.ytr), generator=gen)
            for s in range(0, len(order), BATCH):
                i = order[s : s + BATCH]
                loss = loss_fn(self.model(self.xtr[i]), self.ytr[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return get_weights(self.model), len(self.ytr), {}

    def evaluate(self, parameters, config):
        set_weights(self.model, parameters)
        with torch.no_grad():
            logits = self.model(self.xte)
            loss = float(nn.functional.cross_entropy(logits, self.yte))
            acc = float((logits.argmax(1) == self.yte).float().mean())
        return loss, len(self.yte), {"accuracy": acc}


def client_fn(context: Context):
    return FashionClient(int(context.node_config["partition-id"])).to_client()


def weighted_accuracy(metrics):
    n = sum(m for m, _ in metrics)
    acc = sum(m * d["accuracy"] for m, d in metrics) / n
    with open(OUT, "w") as f:
        json.dump({"federated_accuracy": acc}, f)
    return {"accuracy": acc}


def strategy():
    torch.manual_seed(0)
    return FedAvg(
        fraction_fit=FRACTION,
        fraction_evaluate=1.0,
        min_fit_clients=max(1, int(FRACTION * CLIENTS)),
        min_evaluate_clients=CLIENTS,
        min_available_clients=CLIENTS,
        initial_parameters=ndarrays_to_parameters(get_weights(Cnn())),
        on_fit_config_fn=lambda r: {"server_round": r},
        evaluate_metrics_aggregation_fn=weighted_accuracy,
    )


def server_fn(context: Context):
    return ServerAppComponents(strategy=strategy(), config=ServerConfig(num_rounds=ROUNDS))


def secagg_server():
    # SecAgg+ (Flower's secure aggregation): every client is a share holder here, as every
    # cohort participant can be drawn into its committee; reconstruction needs a majority.
    from flwr.common import Context as Ctx
    from flwr.server import Driver, LegacyContext
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    app = ServerApp()

    @app.main()
    def main(driver: Driver, context: Ctx) -> None:
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=ROUNDS),
                            strategy=strategy())
        shares = CLIENTS if CLIENTS % 2 == 1 else CLIENTS - 1
        DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
            num_shares=shares, reconstruction_threshold=shares // 2 + 1))(driver, ctx)

    return app


if __name__ == "__main__":
    if SECAGG:
        from flwr.client.mod import secaggplus_mod
        server, client = secagg_server(), ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    else:
        server, client = ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
