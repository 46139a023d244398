"""The README's fedit experiment as a plain Flower 1.42 app: run by ``fleetlora bench sim --train``.

Runs inside ``.venv-flower`` (Flower pins another Ray), never imported by fleetlora. One virtual
client (supernode) per fleet client; Ray runs them on ``--actors`` actors of one CPU each; each actor
builds the model once. Each round the server sends the global adapter to the clients the schedule
names (the ones fleetlora trained that round) and aggregates their replies (bench/flower_fedit_work.py).
Prints one JSON line: ``{"rounds_s", "total_s", "val_accuracy", "test_accuracy"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.update(
    {"FLWR_TELEMETRY_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
)

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from bench.flower_fedit_work import run_rounds, work_for

client_app = ClientApp()
server_app = ServerApp()
settings: dict[str, object] = {}
outcome: dict[str, object] = {}


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    work = work_for(str(config["folder"]))
    state = msg.content["arrays"].to_torch_state_dict()
    trained, examples, loss = work.train(state, int(config["round"]), int(config["cid"]))
    content = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=trained),
            "metrics": MetricRecord({"num-examples": examples, "train-loss": loss}),
        }
    )
    return Message(content=content, reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    folder, clients = str(settings["folder"]), int(settings["clients"])  # type: ignore[call-overload]
    work = work_for(folder)
    while len(list(grid.get_node_ids())) < clients:  # the supernodes register as the simulation starts
        time.sleep(0.1)
    nodes = sorted(grid.get_node_ids())

    def train_round(rnd: int, glob: dict[str, Any]) -> list[tuple[dict[str, Any], int]]:
        messages = [
            Message(
                content=RecordDict(
                    {
                        "arrays": ArrayRecord(torch_state_dict=glob),
                        "config": ConfigRecord({"folder": folder, "round": rnd, "cid": job["cid"]}),
                    }
                ),
                dst_node_id=nodes[job["cid"]],
                message_type=MessageType.TRAIN,
            )
            for job in work.schedule[rnd]
        ]
        replies = list(grid.send_and_receive(messages))
        bad = [r.error for r in replies if r.has_error()]
        if bad:
            raise RuntimeError(f"round {rnd + 1}: {len(bad)} client(s) failed: {bad[0]}")
        return [
            (r.content["arrays"].to_torch_state_dict(), int(r.content["metrics"]["num-examples"]))
            for r in replies
        ]

    start = time.perf_counter()
    outcome.update(run_rounds(work, train_round))
    outcome["rounds_s"] = time.perf_counter() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", help="the experiment folder bench sim --train wrote")
    parser.add_argument("--clients", type=int, required=True, help="virtual clients (supernodes)")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors of one CPU each")
    args = parser.parse_args()
    settings.update(folder=args.folder, clients=args.clients)
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.clients,
        backend_config={
            "client_resources": {"num_cpus": 1},
            "init_args": {"include_dashboard": False, "num_cpus": args.actors},
        },
    )
    if "rounds_s" not in outcome:
        raise SystemExit("the Flower run ended without finishing its rounds (see the log above)")
    print(json.dumps({**outcome, "total_s": time.perf_counter() - t0}), flush=True)
