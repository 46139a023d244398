"""Benchmark (not a test: it trains the real MiniLM for many minutes): the README's deployment walkthrough
with MODEL=minilm against the simulator on the same split, rounds and budgets.

    PYTHONPATH=. .venv/bin/python scripts/bench_walkthrough.py [--model minilm] [--steps 8] [--out runs/walk]

1. Runs the README's walkthrough as written (tests/test_walkthrough.py extracts the same lines), but
   with MODEL set and one change for comparability: every device does a fixed ``--steps`` local steps
   (``run-client.sh --local-steps N``) instead of what its profile affords in the deadline.
2. Loads the exported adapter with ``PeftModel.from_pretrained`` as the README shows and measures its
   accuracy on the whole Reuters-R8 test split (2,189 examples).
3. Runs ``fleetlora sim``'s engine with the same model, method, split (3 clients, Dirichlet alpha and
   seed of ``fleetlora data split``), rounds, steps, batch size, SGD learning rate and momentum, adapter
   (rank 8 on query/value of the top block, MiniLM's 5), sequence length, without dropouts or deadlines, and
   evaluates on the same test split.
Prints both accuracies and their difference, and writes them to OUT/result.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_walkthrough import CHOICES, walkthrough  # noqa: E402  (the same lines the test runs)


def run_walkthrough(model: str, steps: int, folder: Path) -> float:
    from broker.child import free_port

    bash, _ = walkthrough()
    script = bash.replace(CHOICES, f"MODEL={model} PORT={free_port()}", 1)
    fixed = script.replace("run-client.sh >", f"run-client.sh --local-steps {steps} >")
    assert fixed != script, "the walkthrough no longer starts run-client.sh as this benchmark expects"
    env = {
        **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    start = time.perf_counter()
    with open(folder / "walkthrough.out", "w") as out:
        done = subprocess.run(
            ["bash", "-e", "-c", fixed], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    if done.returncode:
        raise SystemExit(f"the walkthrough failed; see {folder / 'walkthrough.out'}")
    return time.perf_counter() - start


def adapter_accuracy(folder: Path) -> float:
    """The README's few lines (PeftModel.from_pretrained), on every example of the R8 test split."""
    import torch
    from peft import PeftModel

    from export.data import load_text_dataset
    from export.models import build_model

    info = json.loads((folder / "my-adapter" / "fleetlora.json").read_text())
    base, tokenizer = build_model(info["model"], len(info["labels"]), seed=info["model_seed"])
    model = PeftModel.from_pretrained(base, str(folder / "my-adapter")).eval()
    data = load_text_dataset("reuters8")
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data.test_texts), 64):
            texts = data.test_texts[start : start + 64]
            batch = tokenizer(
                texts, max_length=info["seq_len"], truncation=True, padding="max_length", return_tensors="pt"
            )
            predicted = model(batch["input_ids"], batch["attention_mask"]).argmax(-1)
            names = [info["labels"][int(i)] for i in predicted]
            truth = [data.classes[int(i)] for i in data.test_labels[start : start + 64]]
            correct += sum(a == b for a, b in zip(names, truth, strict=True))
    return correct / len(data.test_texts)


def simulator_accuracy(model: str, steps: int, rounds: int, alpha: float, seed: int = 0) -> list[float]:
    from sim.config import SimConfig
    from sim.engine import build_world, run_method

    config = SimConfig(
        methods=("fedrpca",), model=model, dataset="reuters8", clients=3, clients_per_round=3, rounds=rounds,
        partition="dirichlet", alpha=alpha, seed=seed, local_steps=steps, batch_size=16, lr=0.05,
        optimizer="sgd", rank=8, lora_alpha=16.0, target_modules=("query", "value"), layers=(5,),
        max_len=64, eval_examples=0, deadline_s=1e9,
    )  # fmt: skip
    world = build_world(config)
    # The walkthrough's devices never drop out: neither do the simulator's.
    world.clients = [
        dataclasses.replace(c, profile=dataclasses.replace(c.profile, dropout=0.0)) for c in world.clients
    ]
    return [r["accuracy"] for r in run_method(world, "fedrpca")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--steps", type=int, default=8, help="local steps of every device and virtual client")
    p.add_argument("--out", default="runs/walkthrough")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="fleetlora-walk-"))
    os.chmod(folder, 0o755)  # mosquitto, dropping to its own user, must reach pki/ in it
    walk_s = run_walkthrough(args.model, args.steps, folder)
    deployed = adapter_accuracy(folder)
    rounds = [json.loads(line) for line in (folder / "state" / "metrics.jsonl").read_text().splitlines()]
    per_round = [r.get("eval_accuracy") for r in rounds if r["event"] == "round"]
    sim_start = time.perf_counter()
    simulated = simulator_accuracy(args.model, args.steps, len(per_round), 0.5)
    result = {
        "model": args.model, "steps": args.steps, "rounds": len(per_round), "folder": str(folder),
        "deployed_accuracy": deployed, "deployed_eval_data_per_round": per_round,
        "simulated_accuracy": simulated[-1], "simulated_per_round": simulated,
        "difference_points": 100 * (deployed - simulated[-1]),
        "walkthrough_s": walk_s, "simulator_s": time.perf_counter() - sim_start,
    }  # fmt: skip
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
