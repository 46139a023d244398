"""``fleetlora flash`` as a user types it: every value it used to get wrong quietly is right or refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from devices.flash import RUN_SCRIPT
from devices.profiles import list_profiles
from export.bundle import BundleInfo, write_bundle
from export.spec import AdapterSpec
from fleetlora.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    info = BundleInfo(
        model="tiny-bert", num_classes=2, seq_len=8, batch_min=2, batch_max=4,
        trainable={"classifier.weight": [2, 32]}, labels=("neg", "pos"),
    )  # fmt: skip
    write_bundle(
        tmp_path / "b", train_pte=b"pte", adapter_ptd=b"ptd", infer_pte=b"inf", spec=AdapterSpec(), info=info
    )
    return tmp_path / "b"


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A credentials folder laid out as init-ca + devices enroll write it (contents are not checked)."""
    root = tmp_path / "pki"
    (root / "clients").mkdir(parents=True)
    for name in ("ca.crt", "clients/dev7.password", "clients/coordinator.announce.key"):
        (root / name).write_text("x\n")
    return root


def flash(bundle: Path, tmp_path: Path, *extra: str) -> int:
    """Flash the Python client (these tests are about its folder; tests/test_native.py has the native one)."""
    args = ["flash", "--profile", "pixel_8", "--run", "demo", "--runtime", "python", "--bundle", str(bundle)]
    return cli_main([*args, "--target", f"local:{tmp_path / 'dev'}", *extra])


def client_toml(tmp_path: Path) -> dict:
    return tomllib.loads((tmp_path / "dev" / "client.toml").read_text())


def test_the_client_id_is_the_enrolled_name_of_the_password_file(
    bundle: Path, pki: Path, tmp_path: Path
) -> None:
    password = pki / "clients" / "dev7.password"
    assert flash(bundle, tmp_path, "--password-file", str(password), "--dataset", "trec6") == 0
    cfg = client_toml(tmp_path)
    assert cfg["id"] == "dev7" and cfg["password_file"] == "credentials/dev7.password"
    assert cfg["run"] == "demo" and cfg["dataset"] == "trec6"


def test_a_client_id_that_is_not_the_password_files_is_refused(
    bundle: Path, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    password = pki / "clients" / "dev7.password"
    args = ("--client-id", "dev1", "--password-file", str(password), "--dataset", "trec6")
    assert flash(bundle, tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert f"--client-id dev1 but the password file {password} is dev7's" in err
    assert not (tmp_path / "dev").exists()
    assert flash(bundle, tmp_path, "--dataset", "trec6") == 2
    assert "give --client-id (the device's enrolled name) or --password-file" in capsys.readouterr().err


def test_a_ca_means_mqtts_on_the_port_the_broker_recorded(
    bundle: Path, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ("--pki", str(pki), "--client-id", "dev7", "--dataset", "trec6")
    assert flash(bundle, tmp_path, *common) == 0
    assert client_toml(tmp_path)["broker"] == "mqtts://127.0.0.1:8883"  # broker run --dir's default
    (pki / "broker.json").write_text(
        json.dumps({"url": "mqtts://127.0.0.1:18883"})
    )  # broker run --port 18883
    assert flash(bundle, tmp_path, *common) == 0
    cfg = client_toml(tmp_path)
    assert cfg["broker"] == "mqtts://127.0.0.1:18883" and cfg["ca"] == "credentials/ca.crt"
    assert cfg["coordinator_key"] == "credentials/coordinator.announce.key"
    assert flash(bundle, tmp_path, *common, "--broker", "mqtt://127.0.0.1:1883") == 2
    assert "--broker mqtt://127.0.0.1:1883 is plain MQTT but a CA" in capsys.readouterr().err


def test_a_wss_broker_is_flashed_as_given_with_the_python_client(
    bundle: Path, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "wss://broker.example.org/fleet/mqtt"  # a device behind a firewall that passes only HTTPS
    common = ("--pki", str(pki), "--client-id", "dev7", "--dataset", "trec6", "--broker", url)
    assert flash(bundle, tmp_path, *common, "--runtime", "auto") == 0
    assert "runtime: python (MQTT over WebSockets" in capsys.readouterr().out
    assert client_toml(tmp_path)["broker"] == url and client_toml(tmp_path)["ca"] == "credentials/ca.crt"
    assert flash(bundle, tmp_path, *common, "--runtime", "native") == 2
    assert "the native client (libmosquitto) speaks MQTT over TCP only" in capsys.readouterr().err


def test_a_device_that_is_not_enrolled_is_named_with_the_command_to_enrol_it(
    bundle: Path, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert flash(bundle, tmp_path, "--pki", str(pki), "--client-id", "dev9", "--dataset", "trec6") == 2
    err = capsys.readouterr().err
    assert f"{pki}/clients/dev9.password not found: is dev9 enrolled? `fleetlora devices enroll dev9" in err


def test_profile_names_are_checked(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["flash", "--profile", "rpi5", "--run", "demo", "--bundle", str(bundle), "--client-id", "d"]
    assert cli_main([*args, "--dataset", "trec6", "--target", f"local:{tmp_path / 'dev'}"]) == 2
    err = capsys.readouterr().err
    assert "unknown device profile 'rpi5'; known profiles: " in err and "raspberry_pi_5_8gb" in err


def test_every_example_in_help_names_a_shipped_profile() -> None:
    from fleetlora.cli import flash as flash_cli

    named = re.findall(r"--profile (\S+)", flash_cli.EXAMPLES)
    assert named and all(n in list_profiles() or n.endswith(".toml") for n in named)


def test_data_is_copied_and_named_in_client_toml(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "a", "label": "pos"}\n')
    assert flash(bundle, tmp_path, "--client-id", "d", "--data", str(data)) == 0
    assert client_toml(tmp_path)["data"] == "data/mine.jsonl"
    assert (tmp_path / "dev" / "data" / "mine.jsonl").read_text() == data.read_text()
    assert flash(bundle, tmp_path, "--client-id", "d") == 2
    assert "give --data (the device's own examples) or --dataset" in capsys.readouterr().err
    assert flash(bundle, tmp_path, "--client-id", "d", "--data", str(tmp_path / "nope.csv")) == 2
    assert "--data: not found" in capsys.readouterr().err


def test_run_client_finds_the_interpreter_it_was_flashed_with(bundle: Path, tmp_path: Path) -> None:
    assert flash(bundle, tmp_path, "--client-id", "d", "--dataset", "trec6") == 0
    script = tmp_path / "dev" / RUN_SCRIPT
    assert sys.executable in script.read_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(script), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "fleetlora client" in done.stdout


@pytest.mark.skipif(shutil.which("false") is None, reason="needs coreutils")
def test_run_client_says_in_one_line_what_to_install(bundle: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-python")
    assert flash(bundle, tmp_path, "--client-id", "d", "--dataset", "trec6", "--python", missing) == 0
    script = tmp_path / "dev" / RUN_SCRIPT
    # An interpreter that cannot import fleetlora (`false` stands in: it runs, and fails the check).
    done = subprocess.run(
        [str(script)],
        env={**os.environ, "PYTHON": shutil.which("false") or ""},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 127
    assert (
        done.stderr.count("\n") == 1
        and "cannot import fleetlora: install it for that interpreter" in done.stderr
    )
