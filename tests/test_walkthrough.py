"""The README's deployment walkthrough, run as written: its bash blocks as one script in an empty folder
(with ``MODEL=tiny-bert`` and a free port, the two choices its first line documents), then its python
block, against the real mosquitto, ExecuTorch programs and data files it makes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from broker.child import free_port
from broker.mosquitto import mosquitto_available
from coordinator.metrics import read_metrics

pytestmark = [pytest.mark.mqtt, pytest.mark.executorch]
pytest.importorskip("executorch.extension.training", reason="executorch is not installed")

ROOT = Path(__file__).resolve().parent.parent
CHOICES = "MODEL=minilm PORT=8883"  # the walkthrough's first line: what a user may change
TIMEOUT_S = 1200


def walkthrough() -> tuple[str, str]:
    """The bash blocks (joined) and the python block between the README's walkthrough markers."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- walkthrough") : text.index("<!-- /walkthrough -->")]
    bash = "".join(re.findall(r"```bash\n(.*?)```", block, re.S))
    python = "".join(re.findall(r"```python\n(.*?)```", block, re.S))
    return bash, python


def test_the_walkthrough_is_what_this_test_runs() -> None:
    bash, python = walkthrough()
    steps = [
        "broker init-ca", "devices enroll", "broker run", "data split", "export", "flash",
        "coordinator serve", "export-adapter", "predict",
    ]  # fmt: skip
    found = re.findall(r"fleetlora ([a-z-]+(?: (?:init-ca|enroll|run|split|serve))?)", bash)
    assert bash.startswith(CHOICES) and found == steps and "PeftModel.from_pretrained" in python


@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
def test_the_readme_walkthrough_runs_as_written(broker_dir: Path) -> None:
    bash, python = walkthrough()
    script = bash.replace(CHOICES, f"MODEL=tiny-bert PORT={free_port()}", 1)
    folder = broker_dir / "walk"  # mosquitto (dropping to its own user) must reach pki/ in it
    folder.mkdir(mode=0o755)
    env = {
        **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None or proc.returncode != 0:  # leave no broker or device behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    logs = {p.name: p.read_text(errors="replace")[-3000:] for p in folder.glob("*.log")}
    assert proc.returncode == 0, output[-6000:] + "\n".join(f"--- {k}\n{v}" for k, v in logs.items())
    labels = (folder / "data" / "labels.txt").read_text().split()
    rounds = [r for r in read_metrics(folder / "state" / "metrics.jsonl") if r["event"] == "round"]
    assert [(r["round"], r["participants"], r["rejected"]) for r in rounds] == [
        (n, 3, {}) for n in range(1, 6)
    ]
    assert all(r["fed_eval_clients"] == 3 and r["eval_examples"] == 2189 for r in rounds)
    assert "round 5/5: 3/3 updates" in output
    for d in ("dev1", "dev2", "dev3"):
        assert f"{d} (executorch): last round 6, outcome final" in logs[f"{d}.log"]
    label, prob, text = output.strip().splitlines()[-1].split("\t")
    assert (
        label in labels and 0 < float(prob) <= 1 and text == "Oil prices rose sharply after OPEC cut output"
    )
    assert json.loads((folder / "my-adapter" / "fleetlora.json").read_text())["labels"] == labels
    used = subprocess.run(
        [sys.executable, "-c", python], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    assert used.returncode == 0, used.stderr[-3000:]
    named, probability = used.stdout.split()
    assert named == label and float(probability) == pytest.approx(float(prob), abs=1e-3)  # both round to 3
