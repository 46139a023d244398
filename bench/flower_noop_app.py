"""Flower's simulation engine doing no-work rounds: run by ``fleetlora bench sim --flower``.

Runs inside ``.venv-flower`` (Flower pins another Ray), never imported by fleetlora. Every client
returns the arrays it received; FedAvg samples every client each round. Prints one JSON line:
``{"rounds_s": ..., "total_s": ...}`` (the rounds alone, and with Ray and the app starting).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.update(
    {"FLWR_TELEMETRY_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
)

import numpy as np  # imported after the environment is set: Flower and Ray read it
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

ADAPTER_SCALARS = 1_222  # about the tiny-bert LoRA adapter fleetlora's bench moves
client_app = ClientApp()
server_app = ServerApp()
timing: dict[str, float] = {}
settings = {"clients": 1000, "rounds": 3}


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """No work: send the arrays back."""
    content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    n = settings["clients"]
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    start = time.perf_counter()
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(ADAPTER_SCALARS, dtype=np.float32)]),
        num_rounds=settings["rounds"],
    )
    timing["rounds_s"] = time.perf_counter() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings.update(clients=args.clients, rounds=args.rounds)
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"include_dashboard": False}},
    )
    print(json.dumps({"rounds_s": timing["rounds_s"], "total_s": time.perf_counter() - t0}), flush=True)
