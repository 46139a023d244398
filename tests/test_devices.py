"""Device profiles, mixes, the budget function and ``fleetlora devices``."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import devices.profiles as profiles_mod
from devices.profiles import (
    ProfileError,
    list_mixes,
    list_profiles,
    load_mix,
    load_profile,
    parse_profile,
    sample_devices,
)
from edge_client.budget import (
    Budget,
    BudgetError,
    BudgetPolicy,
    DeviceProfile,
    ModelCost,
    compute_budget,
)
from fleetlora.cli import main

FIGURES = ("train_gflops", "train_memory_mb", "uplink_mbps", "downlink_mbps", "availability", "dropout")

# all-MiniLM-L6-v2: 22.7M parameters, embeddings (30522 + 512 + 2) x 384, 6 layers of 384, 12 heads,
# LoRA on query/key/value (18 modules of 384 x 384), 64 tokens.
MINILM = ModelCost.estimate(
    22_700_000, 64, 384, 6, 18 * 768, attention_heads=12, embedding_params=(30522 + 512 + 2) * 384
)

VALID = {
    "name": "my_phone",
    "kind": "phone",
    "train_gflops": 30.0,
    "train_memory_mb": 2000,
    "uplink_mbps": 10.0,
    "downlink_mbps": 50.0,
    "availability": 0.3,
    "dropout": 0.1,
}


def _toml(values: dict[str, object]) -> str:
    def literal(value: object) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return f'"{value}"' if isinstance(value, str) else str(value)

    return "".join(f"{key} = {literal(value)}\n" for key, value in values.items())


def _write(tmp_path: Path, values: dict[str, object], stem: str = "my_phone") -> Path:
    path = tmp_path / f"{stem}.toml"
    path.write_text(_toml(values))
    return path


# ---------------------------------------------------------------------------------------- profiles


def test_at_least_eight_real_profiles_ship() -> None:
    names = list_profiles()
    assert len(names) >= 8
    for required in ("jetson_orin_nano_8gb", "jetson_agx_orin_64gb", "raspberry_pi_5_8gb", "pixel_8"):
        assert required in names
    assert {load_profile(n).kind for n in names} >= {"jetson", "sbc", "phone", "laptop"}


@pytest.mark.parametrize("name", list_profiles())
def test_every_shipped_profile_loads_and_cites_every_figure(name: str) -> None:
    p = load_profile(name)
    assert p.name == name
    assert p.description
    assert p.train_gflops > 0 and p.train_memory_mb > 0
    cited = set(p.sources)
    expected = set(FIGURES) | ({"energy_j_per_gflop"} if p.energy_j_per_gflop is not None else set())
    assert expected <= cited, f"{name}: figures without a source: {sorted(expected - cited)}"


def test_profile_is_frozen_hashable_and_its_sources_read_only() -> None:
    p = load_profile("pixel_8")
    assert hash(p) == hash(load_profile("pixel_8"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train_gflops = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.sources["train_gflops"] = "x"  # type: ignore[index]


def test_load_profile_by_path_and_ints_become_floats(tmp_path: Path) -> None:
    p = load_profile(_write(tmp_path, VALID))
    assert p.name == "my_phone" and p.train_memory_mb == 2000.0 and isinstance(p.train_memory_mb, float)
    assert p.energy_j_per_gflop is None
    # name defaults to the file's stem
    assert (
        load_profile(str(_write(tmp_path, {k: v for k, v in VALID.items() if k != "name"}))).name
        == "my_phone"
    )


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        ({"train_gflops": None}, "train_gflops", "missing required key"),
        ({"train_gflops": "fast"}, "train_gflops", "expected a number, got string"),
        ({"availability": True}, "availability", "expected a number, got boolean"),
        ({"sources": "datasheet"}, "sources", "expected a table"),
        ({"train_gflops": -3.0}, "train_gflops", "finite number > 0"),
        ({"uplink_mbps": 0}, "uplink_mbps", "finite number > 0"),
        ({"energy_j_per_gflop": -1.0}, "energy_j_per_gflop", "finite number > 0"),
        ({"availability": 1.5}, "availability", "probability in [0, 1]"),
        ({"dropout": -0.1}, "dropout", "probability in [0, 1]"),
        ({"kind": "toaster"}, "kind", "must be one of"),
        ({"flops": 3.0}, "flops", "unknown key"),
        ({"name": "other"}, "name", "file name's stem"),
    ],
)
def test_profile_errors_name_file_key_and_reason(
    tmp_path: Path, change: dict[str, object], key: str, reason: str
) -> None:
    values = {**VALID, **change}
    values = {k: v for k, v in values.items() if v is not None}
    path = _write(tmp_path, values)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message and key in message and reason in message
    assert info.value.key == key and info.value.source == str(path)


def test_sources_must_name_figures(tmp_path: Path) -> None:
    path = tmp_path / "my_phone.toml"
    path.write_text(_toml(VALID) + '[sources]\nflops = "a blog"\n')
    with pytest.raises(ProfileError, match=r"my_phone\.toml: flops: names no figure"):
        load_profile(path)


def test_unknown_name_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"unknown device profile 'nokia_3310'; known profiles: .*pixel_8"):
        load_profile("nokia_3310")
    with pytest.raises(ProfileError, match="file not found"):
        load_profile(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("train_gflops = = 3\n")
    with pytest.raises(ProfileError, match=r"bad\.toml: not valid TOML"):
        load_profile(bad)


def test_parse_profile_without_stem_requires_a_name() -> None:
    data = {k: v for k, v in VALID.items() if k != "name"}
    with pytest.raises(ProfileError, match="inline: name: missing required key"):
        parse_profile(data, "inline")
    assert parse_profile(VALID, "inline").name == "my_phone"


# ------------------------------------------------------------------------------------------- mixes


def test_shipped_mixes_load_and_uniform_covers_every_profile() -> None:
    assert {"default", "right_skewed", "uniform", "jetsons"} <= set(list_mixes())
    for name in list_mixes():
        entries = load_mix(name)
        assert entries and all(w > 0 for _, w in entries)
    assert sorted(p for p, _ in load_mix("uniform")) == list_profiles()
    assert {load_profile(p).kind for p, _ in load_mix("jetsons")} == {"jetson"}
    skewed = dict(load_mix("right_skewed"))
    weak = sum(w for p, w in skewed.items() if load_profile(p).train_gflops < 20)
    assert weak / sum(skewed.values()) > 0.5


def test_mix_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProfileError, match=r"unknown device mix 'nope'; known mixes: .*default"):
        load_mix("nope")
    mixes = tmp_path / "mixes.toml"
    monkeypatch.setattr(profiles_mod, "_MIXES", mixes)
    mixes.write_text("[a]\npixel_8 = -1.0\n")
    with pytest.raises(ProfileError, match=r"a\.pixel_8: weight must be a finite number > 0"):
        load_mix("a")
    mixes.write_text("[a]\nnokia_3310 = 1.0\n")
    with pytest.raises(ProfileError, match=r"a\.nokia_3310: no such profile"):
        load_mix("a")


def test_sample_devices_is_deterministic_and_follows_the_weights() -> None:
    first = sample_devices("default", 50, seed=7)
    assert [p.name for p in first] == [p.name for p in sample_devices("default", 50, seed=7)]
    assert [p.name for p in first] != [p.name for p in sample_devices("default", 50, seed=8)]
    assert [p.name for p in sample_devices("default", 10, seed=7)] == [p.name for p in first[:10]]
    assert sample_devices("default", 0, seed=1) == []
    counts = Counter(p.name for p in sample_devices([("pixel_8", 3.0), ("galaxy_a14", 1.0)], 4000, seed=0))
    assert set(counts) == {"pixel_8", "galaxy_a14"}
    assert 0.72 < counts["pixel_8"] / 4000 < 0.78
    with pytest.raises(ProfileError, match="weight must be a finite number > 0"):
        sample_devices([("pixel_8", 0.0)], 3, seed=0)
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        sample_devices("default", -1, seed=0)


# ------------------------------------------------------------------------------------------ budget


def test_minilm_cost_follows_the_published_formulas() -> None:
    n_matmul = 22_700_000 - (30522 + 512 + 2) * 384
    assert MINILM.train_flops_per_example == 64 * (4 * n_matmul + 4 * 6 * 64 * 384)
    assert MINILM.train_flops_per_example / 1e9 == pytest.approx(2.8, abs=0.01)
    # Korthikanti et al.: s d (34 + 5 a s / d) bytes per layer at 16 bits, doubled for fp32
    assert MINILM.activation_mb_per_example == pytest.approx(6 * 64 * 384 * (34 + 10) * 2 / 2**20)
    assert MINILM.base_memory_mb == pytest.approx(22_700_000 * 4 / 2**20)
    assert MINILM.adapter_bytes_per_rank == 18 * 768 * 4
    assert MINILM.adapter_bytes_per_head == MINILM.adapter_bytes_per_rank * 8 / 4


def test_weakest_phone_gets_less_than_an_agx_orin() -> None:
    policy = BudgetPolicy(max_rank=8, max_heads=4, target_round_s=30.0)
    weak = compute_budget(load_profile("galaxy_a14"), MINILM, policy)
    strong = compute_budget(load_profile("jetson_agx_orin_64gb"), MINILM, policy)
    assert weak.local_steps < strong.local_steps
    assert weak.rank < strong.rank == 8
    assert weak.heads < strong.heads == 4
    assert strong.local_steps == policy.max_steps and strong.fits_deadline
    assert weak.round_s <= policy.target_round_s


@pytest.mark.parametrize("name", list_profiles())
def test_every_profile_affords_minilm_within_the_deadline(name: str) -> None:
    policy = BudgetPolicy(target_round_s=60.0)
    b = compute_budget(load_profile(name), MINILM, policy)
    assert b.fits_deadline
    assert b.rank in policy.ranks and 1 <= b.heads <= policy.max_heads
    assert b.round_s == pytest.approx(b.download_s + b.compute_s + b.upload_s)
    joules_per_gflop = load_profile(name).energy_j_per_gflop
    assert joules_per_gflop is not None and b.energy_j is not None
    assert b.energy_j == pytest.approx(b.examples * MINILM.train_flops_per_example / 1e9 * joules_per_gflop)


def test_too_little_memory_is_a_clear_budget_error() -> None:
    tiny = dataclasses.replace(load_profile("galaxy_a14"), name="tiny", train_memory_mb=90.0)
    with pytest.raises(BudgetError, match=r"device 'tiny' cannot train one example: it has 90 MiB"):
        compute_budget(tiny, MINILM, BudgetPolicy())


def test_a_device_short_of_time_does_min_steps_with_a_smaller_batch() -> None:
    slow = dataclasses.replace(load_profile("galaxy_a14"), train_gflops=1.0)
    b = compute_budget(slow, MINILM, BudgetPolicy(min_steps=2, target_round_s=30.0))
    assert b.local_steps == 2 and b.batch_size == math.floor((30.0 - b.download_s - 0.2) * 1e9 / 2.8e9 / 2)


def test_policy_and_cost_validation() -> None:
    assert BudgetPolicy(max_rank=6, rank_choices=(2, 4, 8)).ranks == (2, 4, 6)
    assert BudgetPolicy(max_rank=8).ranks == (2, 4, 8)
    with pytest.raises(BudgetError, match=r"min_steps \(5\) must not exceed max_steps \(2\)"):
        BudgetPolicy(min_steps=5, max_steps=2)
    with pytest.raises(BudgetError, match="family must be"):
        BudgetPolicy(family="adam")  # type: ignore[arg-type]
    with pytest.raises(BudgetError, match="target_round_s must be a finite number > 0"):
        BudgetPolicy(target_round_s=0)
    with pytest.raises(BudgetError, match="rank_choices"):
        BudgetPolicy(rank_choices=())
    with pytest.raises(BudgetError, match="embedding_params"):
        ModelCost.estimate(100, 8, 4, 1, 8, embedding_params=100)
    with pytest.raises(BudgetError, match="seq_len must be an integer >= 1"):
        ModelCost.estimate(100, 0, 4, 1, 8)


def test_a_higher_rank_never_costs_steps() -> None:
    """Crossing a rank threshold on a slow uplink must not shrink the time left for training."""
    big_adapter = ModelCost.estimate(22_700_000, 64, 384, 6, 200_000)  # 800 KB per rank
    policy = BudgetPolicy(
        max_rank=16, max_heads=8, target_round_s=120.0, max_steps=1000, reference_gflops=100.0
    )
    weak_link = dataclasses.replace(load_profile("galaxy_a14"), uplink_mbps=2.0, train_memory_mb=4000.0)
    budgets = [
        compute_budget(dataclasses.replace(weak_link, train_gflops=g / 4), big_adapter, policy)
        for g in range(4, 500)
    ]
    assert len({b.rank for b in budgets}) >= 3  # the scan crosses rank thresholds
    for before, after in itertools.pairwise(budgets):
        assert after.local_steps >= before.local_steps and after.batch_size >= before.batch_size


# Profiles drawn over several orders of magnitude, and a second profile at least as capable in every figure.
_figure = st.floats(min_value=0.5, max_value=5000.0, allow_nan=False)
_gain = st.floats(min_value=1.0, max_value=50.0, allow_nan=False)


@st.composite
def _dominating_pair(draw: st.DrawFn) -> tuple[DeviceProfile, DeviceProfile]:
    base = {"gflops": draw(_figure), "memory": draw(st.floats(50.0, 20000.0)), "up": draw(_figure)}
    base["down"] = draw(_figure)
    weak = DeviceProfile("weak", "phone", base["gflops"], base["memory"], base["up"], base["down"], 0.5, 0.1)
    # ties and near-ties (thresholds of rank and heads) happen often
    gains = {k: draw(st.one_of(st.just(1.0), st.floats(1.0, 1.1), _gain)) for k in base}
    strong = DeviceProfile(
        "strong",
        "jetson",
        base["gflops"] * gains["gflops"],
        base["memory"] * gains["memory"],
        base["up"] * gains["up"],
        base["down"] * gains["down"],
        0.5,
        0.1,
    )
    return weak, strong


_policies = st.builds(
    BudgetPolicy,
    max_steps=st.integers(1, 60),
    min_steps=st.just(1),
    max_batch=st.integers(1, 64),
    max_rank=st.sampled_from([1, 4, 8, 16, 32]),
    max_heads=st.integers(1, 16),
    target_round_s=st.floats(1.0, 600.0),
    reference_gflops=st.floats(1.0, 2000.0),
    family=st.sampled_from(["lora", "ravan"]),
    max_upload_fraction=st.floats(0.01, 1.0),
)
_costs = st.builds(
    ModelCost.estimate,
    n_params=st.integers(1_000_000, 2_000_000_000),
    seq_len=st.integers(8, 512),
    hidden=st.sampled_from([128, 384, 768, 2048]),
    layers=st.integers(1, 24),
    adapted_scalars_per_rank=st.integers(100, 200_000),
)


@settings(max_examples=300, deadline=None)
@given(_dominating_pair(), _costs, _policies)
def test_budget_is_monotone_in_capability(
    pair: tuple[DeviceProfile, DeviceProfile], cost: ModelCost, policy: BudgetPolicy
) -> None:
    weak, strong = pair
    try:
        strong_budget = compute_budget(strong, cost, policy)
    except BudgetError:
        with pytest.raises(BudgetError):  # more memory never turns a device away
            compute_budget(weak, cost, policy)
        return
    try:
        weak_budget = compute_budget(weak, cost, policy)
    except BudgetError:
        return
    for field in ("local_steps", "batch_size", "rank", "heads"):
        assert getattr(strong_budget, field) >= getattr(weak_budget, field), field
    for b in (weak_budget, strong_budget):
        _check_invariants(b, policy)


def _check_invariants(b: Budget, policy: BudgetPolicy) -> None:
    assert policy.min_steps <= b.local_steps <= policy.max_steps
    assert 1 <= b.batch_size <= policy.max_batch
    assert b.rank in policy.ranks and 1 <= b.heads <= policy.max_heads
    if b.local_steps > policy.min_steps:  # only a device at min_steps may run past the deadline
        assert b.round_s <= policy.target_round_s * (1 + 1e-9)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_list_shows_every_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "list"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for column in (
        "name",
        "kind",
        "GFLOP/s",
        "memory MiB",
        "up Mbps",
        "down Mbps",
        "availability",
        "dropout",
    ):
        assert column in header
    for name in list_profiles():
        assert name in out
    assert main(["devices", "list", "--mix", "jetsons"]) == 0
    out = capsys.readouterr().out
    assert "share" in out and "pixel_8" not in out and "jetson_nano_4gb" in out


def test_cli_show_prints_figures_and_sources(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "show", "jetson_orin_nano_8gb"]) == 0
    out = capsys.readouterr().out
    assert "train_gflops" in out and "320.0" in out and "datasheet" in out.lower()


def test_cli_unknown_device_exits_2_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "show", "nokia_3310"]) == 2
    err = capsys.readouterr().err
    assert "unknown device profile 'nokia_3310'" in err and "pixel_8" in err
    assert main(["devices", "list", "--mix", "nope"]) == 2
    assert "unknown device mix 'nope'" in capsys.readouterr().err


def test_cli_budget_table_and_unfit_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = _write(tmp_path, {**VALID, "train_memory_mb": 50.0})
    assert main(["devices", "budget", "--profiles", f"galaxy_a14,jetson_agx_orin_64gb,{tiny}"]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()[3:]
        if line and not line.startswith("cannot")
    }
    assert rows["galaxy_a14"][1:5] == ["5", "16", "2", "1"]  # steps, batch, rank, heads
    assert rows["jetson_agx_orin_64gb"][1:5] == ["20", "16", "8", "4"]
    assert "cannot train: device 'my_phone' cannot train one example" in out


def test_cli_budget_reads_a_toml_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.toml"
    config.write_text('deadline = 120.0\nmax-steps = 7\nprofiles = ["galaxy_a14"]\n')
    assert main(["devices", "budget", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "deadline 120 s" in out
    assert out.splitlines()[-1].split()[:2] == ["galaxy_a14", "7"]
    config.write_text("dedline = 3\n")
    assert main(["devices", "budget", "--config", str(config)]) == 2
    assert "unknown keys ['dedline']" in capsys.readouterr().err


def test_cli_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["devices", "budget", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "fleetlora devices budget --family ravan" in out
