"""Flashing a bundle + client config to a local folder, and the ssh/adb command lines."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from devices.flash import (
    CREDENTIAL_KEYS,
    RUN_SCRIPT,
    ClientConfig,
    FlashError,
    Target,
    commands,
    flash,
    stage,
)
from export.bundle import BundleError, BundleInfo, load_bundle, write_bundle
from export.spec import AdapterSpec


@pytest.fixture
def bundle(tmp_path: Path):
    info = BundleInfo(
        model="tiny-bert",
        num_classes=2,
        seq_len=8,
        batch_min=2,
        batch_max=4,
        trainable={"classifier.weight": [2, 32]},
        labels=("neg", "pos"),
    )
    return write_bundle(
        tmp_path / "b", train_pte=b"pte", adapter_ptd=b"ptd", infer_pte=b"inf", spec=AdapterSpec(), info=info
    )


def config(tmp_path: Path) -> ClientConfig:
    pw = tmp_path / "pw.txt"
    pw.write_text("secret\n")
    return ClientConfig(
        broker="mqtts://broker:8883",
        run_id="r1",
        client_id="dev1",
        device="rpi5",
        credentials={"password_file": str(pw)},
    )


def test_bundle_round_trip_and_labels(bundle) -> None:
    again = load_bundle(bundle.path)
    assert again.info == bundle.info and again.spec == AdapterSpec()
    assert again.info.labels == ("neg", "pos")


def test_flash_local_makes_a_runnable_folder(bundle, tmp_path: Path) -> None:
    dest = tmp_path / "device"
    assert flash(bundle, config(tmp_path), Target.parse(f"local:{dest}"), log=lambda _: None) == []
    load_bundle(dest / "bundle")  # the copy verifies against its manifest
    cfg = tomllib.loads((dest / "client.toml").read_text())
    assert cfg["broker"] == "mqtts://broker:8883" and cfg["id"] == "dev1" and cfg["bundle"] == "bundle"
    assert cfg["run"] == "r1" and cfg["profile"] == "rpi5" and cfg["backend"] == "executorch"
    assert (dest / cfg["password_file"]).read_text() == "secret\n"
    script = dest / RUN_SCRIPT
    assert os.access(script, os.X_OK)
    assert "-m fleetlora client --config client.toml" in script.read_text()


def test_dry_run_writes_nothing(bundle, tmp_path: Path) -> None:
    dest = tmp_path / "device"
    lines: list[str] = []
    flash(bundle, config(tmp_path), Target.parse(f"local:{dest}"), dry_run=True, log=lines.append)
    assert not dest.exists() and lines
    cmds = flash(
        bundle, config(tmp_path), Target.parse("adb:/data/local/tmp/fl"), dry_run=True, log=lines.append
    )
    assert cmds[1][:2] == ["adb", "push"] and cmds[1][-1] == "/data/local/tmp/fl/"


def test_ssh_command_lines(bundle, tmp_path: Path) -> None:
    staged = stage(bundle, config(tmp_path), tmp_path / "stage")
    ssh, scp = commands(Target.parse("ssh:pi@10.0.0.7:/opt/fl"), staged)
    assert ssh == ["ssh", "pi@10.0.0.7", "mkdir", "-p", "/opt/fl"]
    assert scp[0] == "scp" and scp[-1] == "pi@10.0.0.7:/opt/fl/"
    assert {Path(p).name for p in scp[3:-1]} == {"bundle", "client.toml", "credentials", RUN_SCRIPT}


@pytest.mark.parametrize("text", ["local", "ftp:/x", "ssh:host-without-path", "adb:relative/path", "local:"])
def test_bad_targets(text: str) -> None:
    with pytest.raises(FlashError):
        Target.parse(text)


def test_missing_credential_file(bundle, tmp_path: Path) -> None:
    cfg = ClientConfig(
        broker="mqtt://x",
        run_id="r",
        client_id="c",
        device="d",
        credentials={"ca_file": str(tmp_path / "nope.pem")},
    )
    with pytest.raises(FlashError, match="not found"):
        flash(bundle, cfg, Target.parse(f"local:{tmp_path / 'd'}"), log=lambda _: None)


def test_tampered_bundle_is_refused(bundle) -> None:
    (bundle.path / "train.pte").write_bytes(b"pwned")
    with pytest.raises(BundleError, match="bytes"):
        load_bundle(bundle.path)


def test_client_toml_keys_are_client_flags(bundle, tmp_path: Path) -> None:
    """``fleetlora client --config client.toml`` accepts every key flash writes (it rejects unknown keys)."""
    from fleetlora.cli import parse

    creds = {}
    for key in CREDENTIAL_KEYS:
        (tmp_path / key).write_text("x")
        creds[key] = str(tmp_path / key)
    cfg = ClientConfig(
        "mqtt://127.0.0.1:1", "r1", "dev1", "pixel_8", "eager", creds,
        state_file="state/p.json", batch_size=4, local_steps=3,
    )  # fmt: skip
    dest = tmp_path / "device"
    flash(bundle, cfg, Target.parse(f"local:{dest}"), log=lambda _: None)
    args = parse(["client", "--config", str(dest / "client.toml")])
    assert (args.run, args.id, args.profile, args.backend) == ("r1", "dev1", "pixel_8", "eager")
    assert (args.state_file, args.batch_size, args.local_steps) == ("state/p.json", 4, 3)
    assert (args.bundle, args.broker) == ("bundle", "mqtt://127.0.0.1:1")
    flags = (args.password_file, args.ca, args.cert, args.key_file, args.key, args.coordinator_key)
    assert flags == tuple(f"credentials/{k}" for k in CREDENTIAL_KEYS)
    assert parse(["client", "--config", str(dest / "client.toml"), "--id", "other"]).id == "other"


def test_client_backend_choices_match_the_registry() -> None:
    from edge_client.backends import BACKENDS
    from fleetlora.cli import client

    assert client.BACKENDS == BACKENDS
