"""``fleetlora client`` and ``coordinator serve`` refuse what would go wrong quietly, naming the value
(all of it before any broker is contacted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deploy_helpers import make_service, spec_for

from coordinator.store import StoreError
from export.bundle import BundleInfo, write_bundle
from export.data import tokenizer_settings
from export.local_data import write_jsonl
from export.models import load_tokenizer
from export.spec import AdapterSpec
from fleetlora.cli import main as cli_main

LABELS = ("neg", "pos")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle folder of tiny-bert with 2 labelled classes (its programs are not needed here)."""
    folder = tmp_path_factory.mktemp("bundle") / "b"
    info = BundleInfo(
        model="tiny-bert", num_classes=2, seq_len=8, batch_min=2, batch_max=4, trainable={}, labels=LABELS,
        tokenizer=tokenizer_settings(load_tokenizer(), 8),
    )  # fmt: skip
    write_bundle(folder, train_pte=b"p", adapter_ptd=b"a", infer_pte=b"i", spec=AdapterSpec(), info=info)
    return folder


def client(bundle: Path, *extra: str) -> int:
    return cli_main(
        ["client", "--run", "r", "--id", "d1", "--bundle", str(bundle), "--backend", "eager", *extra]
    )


def err(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


def test_labels_outside_the_bundles_are_refused_at_start(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", ["good", "bad", "worse"], ["pos", "neutral", "neg"])
    assert client(bundle, "--data", str(data)) == 2
    message = err(capsys)
    assert "labels the bundle does not have: 'neutral' (1 examples, first at" in message
    assert "the bundle's labels are ['neg', 'pos']" in message


def test_a_builtin_data_set_of_other_classes_is_refused(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert client(bundle, "--dataset", "trec6") == 2
    classes = "['ABBR', 'DESC', 'ENTY', 'HUM', 'LOC', 'NUM']"
    assert f"--dataset trec6 has the classes {classes}, the task ['neg', 'pos']" in err(capsys)


def test_flags_that_disagree_with_the_bundle_are_refused(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", ["good", "bad"], ["pos", "neg"])
    assert client(bundle, "--data", str(data), "--model", "minilm") == 2
    assert f"--model minilm conflicts with {bundle}, which has tiny-bert" in err(capsys)
    assert client(bundle, "--data", str(data), "--max-len", "64") == 2
    assert f"--max-len 64 conflicts with {bundle}, which has 8" in err(capsys)
    assert client(bundle) == 2
    assert "give --data (this device's examples) or --dataset" in err(capsys)
    args = ["client", "--run", "r", "--id", "d1", "--dataset", "trec6", "--backend", "executorch"]
    assert cli_main(args) == 2
    assert "--backend executorch needs --bundle" in err(capsys)


def test_a_device_whose_tokenizer_differs_from_the_bundles_is_refused(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    info = json.loads((bundle / "bundle.json").read_text())
    info["tokenizer"]["fingerprint"] = "0" * 64
    spec = AdapterSpec.from_json((bundle / "adapter_spec.json").read_text())
    write_bundle(
        other, train_pte=b"p", adapter_ptd=b"a", infer_pte=b"i", spec=spec, info=BundleInfo.from_dict(info)
    )
    data = write_jsonl(tmp_path / "d.jsonl", ["good", "bad"], ["pos", "neg"])
    assert client(other, "--data", str(data)) == 2
    assert f"{other}: this device's tokenizer is not the one the bundle was exported with" in err(capsys)


def serve(*extra: str) -> int:
    return cli_main(["coordinator", "serve", "--run", "r", "--rounds", "1", *extra])


def test_the_coordinator_needs_to_know_what_it_trains(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve("--state-dir", str(tmp_path / "s")) == 2
    assert "give --bundle (the bundle the devices train), or --model and --num-classes" in err(capsys)
    assert serve("--bundle", str(bundle), "--method", "ravan") == 2
    assert f"--method ravan trains ravan adapters; {bundle} has lora" in err(capsys)
    args = ("--model", "tiny-bert", "--num-classes", "2", "--eval-data", str(tmp_path / "t.jsonl"))
    assert serve(*args, "--state-dir", str(tmp_path / "s")) == 2
    assert "--eval-data needs --bundle with label names" in err(capsys)
    assert (
        serve("--bundle", str(bundle), "--method", "fedrpca", "--method-params", '{"fedrpca": {"bta": 4}}')
        == 2
    )
    assert (
        "--method-params: method 'fedrpca' has no option 'bta' (its options: lam, beta, tol, max_iter)"
        in err(capsys)
    )
    assert serve("--bundle", str(bundle), "--method-params", '{"fedrpca": {"beta": 4}}') == 2
    assert "--method-params names 'fedrpca', but --method is 'fedit'" in err(capsys)


def test_the_coordinators_credentials_come_from_the_pki_or_it_says_how(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = tmp_path / "pki"
    (pki / "clients").mkdir(parents=True)
    (pki / "ca.crt").write_text("x")
    assert serve("--bundle", str(bundle), "--pki", str(pki), "--state-dir", str(tmp_path / "s")) == 2
    assert f"{pki}/clients/coordinator.password not found; enrolling the first device creates" in err(capsys)
    assert (
        serve("--bundle", str(bundle), "--ca", str(pki / "ca.crt"), "--broker", "mqtt://127.0.0.1:1883") == 2
    )
    assert "--broker mqtt://127.0.0.1:1883 is plain MQTT but a CA" in err(capsys)


def test_a_state_folder_of_another_model_or_class_count_is_refused_naming_both(tmp_path: Path) -> None:
    first = make_service("fedit", tmp_path, ("d1",), rounds=1, model="tiny-bert", num_classes=6)
    first.start()
    other = make_service("fedit", tmp_path, ("d1",), rounds=1, model="tiny-bert", num_classes=8)
    with pytest.raises(StoreError) as info:
        other.start()
    message = str(info.value)
    assert f"{tmp_path} holds run 't', method fedit, model tiny-bert with 6 classes, lora rank 4" in message
    assert "this coordinator serves run 't', method fedit, model tiny-bert with 8 classes" in message
    spec = spec_for("fedit")
    make_service("fedit", tmp_path / "b", ("d1",), rounds=1, model="tiny-bert", num_classes=6).start()
    other = make_service("fedit", tmp_path / "b", ("d1",), rounds=1, model="tiny-bert", num_classes=6)
    other.spec = spec.with_(alpha=32.0)  # the same model and classes, another adapter
    with pytest.raises(StoreError, match=r"\(adapter spec: alpha 16.0, here 32.0\)"):
        other.start()
