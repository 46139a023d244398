"""The coordinator's round state machine without a broker: policy for bad, late, duplicate updates; resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deploy_helpers import adapted, client_ids, make_service, spec_for
from tolerances import unit_roundoff

from coordinator.metrics import read_metrics
from coordinator.service import RoundService, ServiceConfig, ServiceError
from coordinator.store import RoundStore, StoreError, _read_segment
from export.state import LORA_B, State
from protocol.topics import up_topic
from protocol.wire import decode_global, encode_update, sample_clients
from protocol.wire_tensors import template_of

METHOD = "fedit"


def update_for(service: RoundService, client: str, round: int, *, scale: float = 1.0, **kw: object) -> bytes:
    state: State = {k: v.cpu() + scale * 0.01 for k, v in service.global_state.items()}
    args = {"num_examples": 10, "local_steps": 1, "compute_s": 0.1, "rank": service.spec.rank, **kw}
    return encode_update(
        state,
        run="t",
        round=round,
        client=client,
        method=METHOD,
        spec=service.spec,
        **args,  # type: ignore[arg-type]
    )


@pytest.fixture
def service(tmp_path: Path) -> RoundService:
    svc = make_service(METHOD, tmp_path, client_ids(3), rounds=2)
    svc.start()
    return svc


def test_config_is_validated() -> None:
    with pytest.raises(ServiceError, match="min_clients"):
        ServiceConfig(run="t", method=METHOD, rounds=1, min_clients=4, clients=client_ids(3))
    with pytest.raises(ServiceError, match="rounds"):
        ServiceConfig(run="t", method=METHOD, rounds=0)


def test_a_method_whose_devices_keep_tensors_neither_sends_nor_takes_them(tmp_path: Path) -> None:
    """FedSA-LoRA: the announcement names B as kept and carries A only; an update carrying B is refused."""
    service = make_service("fedsa_lora", tmp_path, client_ids(3), rounds=1)
    service.start()
    assert service.template and not any(k.endswith(LORA_B) for k in service.template)
    full = {k: v.cpu() for k, v in service.global_state.items()}  # B included: it must not travel
    announced = decode_global(
        service.announcement, expected_run="t", spec=service.spec, template=template_of(full), key=None
    )
    assert announced.header.keep_local == (LORA_B,)
    assert announced.state and not any(k.endswith(LORA_B) for k in announced.state)
    envelope = encode_update(
        full, run="t", round=1, client="dev0", method="fedsa_lora", spec=service.spec, num_examples=1,
        local_steps=1, compute_s=0.0, rank=service.spec.rank,
    )  # fmt: skip
    assert service.receive([(up_topic("t", "dev0"), envelope)]) == 0
    assert service.tally.rejected == {"unknown_key": 1}


def test_lower_ranks_are_offered_and_taken_only_by_methods_that_aggregate_them(tmp_path: Path) -> None:
    """HetLoRA announces the ranks a device may train and takes a lower-rank upload; FedIT offers
    none and refuses one in words; a rank above the global one is refused by both."""
    from export.adapters import lora_rank_slice
    from export.state import LORA_A

    for method, offers in (("hetlora", True), ("fedit", False)):
        service = make_service(method, tmp_path / method, client_ids(3), rounds=1)
        service.start()
        rank = service.spec.rank
        full = {k: v.cpu() for k, v in service.global_state.items()}
        header = decode_global(
            service.announcement, expected_run="t", spec=service.spec, template=template_of(full), key=None
        ).header
        assert header.rank_choices == ((1, 2, rank) if offers else None)
        wide = {
            k: torch.cat([v, v], dim=0 if k.endswith(LORA_A) else 1) if "lora_" in k else v
            for k, v in full.items()
        }
        for client, state, r in (("dev0", lora_rank_slice(full, 2), 2), ("dev1", wide, 2 * rank)):
            envelope = encode_update(
                state, run="t", round=1, client=client, method=method, spec=service.spec, num_examples=1,
                local_steps=1, compute_s=0.0, rank=r,
            )  # fmt: skip
            service.receive([(up_topic("t", client), envelope)])
        assert set(service.accepted) == ({"dev0"} if offers else set())
        events = read_metrics(tmp_path / method / "metrics.jsonl")
        messages = [e["message"] for e in events if e["event"] == "rejected"]
        assert any(f"rank {2 * rank} above the global rank {rank}" in m for m in messages), messages
        if not offers:
            assert any(f"aggregates the global rank {rank} only" in m for m in messages), messages


def test_sampling_is_seeded_and_stable() -> None:
    roster = client_ids(10)
    a = sample_clients(1, 3, roster, 4)
    assert a == sample_clients(1, 3, reversed(roster), 4) and len(a) == 4  # the roster's order is moot
    assert any(sample_clients(1, r, roster, 4) != a for r in range(4, 10))
    assert sample_clients(1, 3, roster, 0) == sorted(roster)


def test_every_refusal_is_counted_and_never_touches_the_global(service: RoundService) -> None:
    before = {k: v.clone() for k, v in service.global_state.items()}
    good = update_for(service, "dev0", 1)
    tampered = bytearray(update_for(service, "dev1", 1))
    tampered[-1] ^= 0xFF
    nan_state = {k: v.cpu().clone() for k, v in service.global_state.items()}
    next(iter(nan_state.values()))[0] = float("nan")
    nan = encode_update(
        nan_state, run="t", round=1, client="dev2", method=METHOD, spec=service.spec,
        num_examples=1, local_steps=1, compute_s=0.0, rank=service.spec.rank,
    )  # fmt: skip
    accepted = service.receive(
        [
            (up_topic("t", "dev0"), good),
            (up_topic("t", "dev0"), good),  # the same message again: a redelivery
            (up_topic("t", "dev0"), update_for(service, "dev0", 1, scale=2.0)),  # a second update
            (up_topic("t", "dev1"), bytes(tampered)),
            (up_topic("t", "dev2"), nan),
            (up_topic("t", "dev1"), update_for(service, "dev1", 2)),  # a future round
            (up_topic("t", "outsider"), update_for(service, "outsider", 1)),
            (up_topic("t", "dev2"), update_for(service, "dev1", 1)),  # header says dev1, topic dev2
            ("fleetlora/t/up/a/b", good),
            (up_topic("t", "dev1"), b"garbage"),
        ]
    )
    assert accepted == 1
    assert dict(service.tally.rejected) == {
        "replay": 1, "bad_mac": 1, "non_finite": 1, "wrong_round": 1, "not_sampled": 1,
        "topic_mismatch": 1, "bad_topic": 1, "bad_magic": 1,
    }  # fmt: skip
    assert service.tally.redelivered == 1
    assert service.tick() is None  # dev1 and dev2 are still due and the deadline is far
    assert all(torch.equal(before[k], service.global_state[k]) for k in before)
    reasons = [
        r["reason"] for r in read_metrics(service.store.root / "metrics.jsonl") if r["event"] == "rejected"
    ]
    assert len(reasons) == 8


def test_round_closes_when_everyone_reported_and_stale_updates_are_refused(service: RoundService) -> None:
    late = update_for(service, "dev0", 1, scale=3.0)
    service.receive([(up_topic("t", c), update_for(service, c, 1)) for c in client_ids(3)])
    announcement = service.tick()
    assert announcement is not None and service.round == 2
    service.receive([(up_topic("t", "dev0"), late)])
    assert service.tally.rejected == {"wrong_round": 1}
    rounds = [r for r in read_metrics(service.store.root / "metrics.jsonl") if r["event"] == "round"]
    assert rounds[0]["participants"] == 3 and rounds[0]["clients"] == list(client_ids(3))


def test_a_redelivery_of_an_aggregated_update_is_counted_as_such_after_a_restart_too(tmp_path: Path) -> None:
    """A restarted coordinator may close a round from its stored updates before the broker delivers
    them again: those redeliveries are not stale updates (nor data loss) and are not refused."""
    service = make_service(METHOD, tmp_path, client_ids(2), rounds=3)
    service.start()
    sent = {c: update_for(service, c, 1) for c in client_ids(2)}
    service.receive([(up_topic("t", c), sent[c]) for c in client_ids(2)])
    assert service.tick() is not None and service.round == 2
    again = make_service(METHOD, tmp_path, client_ids(2), rounds=3)  # the coordinator restarts
    again.start()
    again.receive([(up_topic("t", c), sent[c]) for c in client_ids(2)])  # the broker redelivers
    assert again.tally.redelivered == 2 and not again.tally.rejected
    again.receive([(up_topic("t", "dev0"), update_for(again, "dev0", 1, scale=2.0))])  # not the same message
    assert again.tally.rejected == {"wrong_round": 1}
    events = read_metrics(tmp_path / "metrics.jsonl")
    assert [e["client"] for e in events if e["event"] == "redelivered"] == ["dev0", "dev1"]


def test_deadline_without_quorum_extends_the_round_and_keeps_updates(tmp_path: Path) -> None:
    now = [1000.0]
    svc = make_service(METHOD, tmp_path, client_ids(3), min_clients=2, deadline_s=10.0)
    svc.clock = lambda: now[0]
    svc.start()
    svc.receive([(up_topic("t", "dev0"), update_for(svc, "dev0", 1))])
    now[0] += 11
    assert svc.tick() is not None and svc.round == 1 and svc.state is not None and svc.state.extensions == 1
    svc.receive([(up_topic("t", "dev1"), update_for(svc, "dev1", 1))])  # late but the round is open
    assert svc.tick() is None  # quorum now, but the extended deadline is not reached yet
    now[0] += 11
    assert svc.tick() is not None and svc.round == 2
    assert svc.history[0]["participants"] == 2 and svc.history[0]["deadline_extensions"] == 1


def test_a_restarted_service_resumes_the_round_with_its_accepted_updates(tmp_path: Path) -> None:
    first = make_service(METHOD, tmp_path, client_ids(3))
    first.start()
    payload = update_for(first, "dev0", 1)
    first.receive([(up_topic("t", "dev0"), payload)])
    second = make_service(METHOD, tmp_path, client_ids(3))
    second.start()
    assert second.round == 1 and list(second.accepted) == ["dev0"]
    second.receive([(up_topic("t", "dev0"), payload)])  # the broker redelivers what was not acked
    assert second.tally.redelivered == 1 and not second.tally.rejected
    other = make_service("fedit", tmp_path, client_ids(3))
    other.config = ServiceConfig(run="other", method=METHOD, rounds=2, clients=client_ids(3))
    with pytest.raises(StoreError, match="another --state-dir"):
        other.start()


def test_a_crash_between_writing_the_global_and_committing_keeps_the_old_round(tmp_path: Path) -> None:
    svc = make_service(METHOD, tmp_path, client_ids(3))
    svc.start()
    svc.receive([(up_topic("t", "dev0"), update_for(svc, "dev0", 1))])
    store = RoundStore(tmp_path, sync=False)
    # The new global of round 2 is written, the process dies before state.json moves on.
    store._write_all([(store.global_path(2), b"partial garbage")])
    loaded = store.load()
    assert loaded is not None and loaded[0].round == 1 and [c for c, _ in loaded[2]] == ["dev0"]


def test_the_initial_global_is_the_attached_models_state(tmp_path: Path) -> None:
    svc = make_service(METHOD, tmp_path, client_ids(2))
    svc.start()
    model = adapted(spec_for(METHOD))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(svc.global_state[name].cpu(), p.detach())


def _norm_service(tmp_path: Path, mode: str) -> RoundService:
    svc = make_service(METHOD, tmp_path, client_ids(2), rounds=1, clip_norm=1.0, clip_mode=mode)
    svc.start()
    return svc


@pytest.mark.numerical
def test_clip_norm_scales_an_outsized_update_back_to_the_limit(tmp_path: Path) -> None:
    from coordinator.clipping import delta_norm

    svc = _norm_service(tmp_path, "scale")
    small, huge = update_for(svc, "dev0", 1, scale=0.01), update_for(svc, "dev1", 1, scale=1e30)
    assert svc.receive([(up_topic("t", "dev0"), small), (up_topic("t", "dev1"), huge)]) == 2
    sent = {k: v.cpu() for k, v in svc.global_state.items()}
    # The scaled update global + delta (||delta|| = 1) is stored in float32: u per entry, so the
    # recovered delta's norm is off by at most u ||global + delta|| <= u (||global|| + 1).
    g_norm = sum(float(v.double().square().sum()) for v in sent.values() if v.is_floating_point()) ** 0.5
    drift = unit_roundoff(torch.float32) * (g_norm + 1)
    assert delta_norm(svc.accepted["dev1"].update.state, sent, None) == pytest.approx(1.0, rel=0, abs=drift)
    assert delta_norm(svc.accepted["dev0"].update.state, sent, None) < 1.0  # left as sent
    assert svc.tally.clipped == 1 and not svc.tally.rejected
    resumed = make_service(METHOD, tmp_path, client_ids(2), rounds=1, clip_norm=1.0)
    resumed.start()  # the stored envelope is the original: clipped again, identically
    for k, v in svc.accepted["dev1"].update.state.items():
        assert torch.equal(resumed.accepted["dev1"].update.state[k], v)
    assert svc.tick() is not None
    assert all(torch.isfinite(v).all() for v in svc.global_state.values())
    assert svc.history[0]["clipped"] == 1


def test_clip_norm_reject_mode_refuses_outsized_updates_by_reason(tmp_path: Path) -> None:
    svc = _norm_service(tmp_path, "reject")
    before = {k: v.clone() for k, v in svc.global_state.items()}
    assert svc.receive([(up_topic("t", "dev1"), update_for(svc, "dev1", 1, scale=1e30))]) == 0
    assert svc.tally.rejected == {"outsized": 1} and not svc.accepted
    assert all(torch.equal(before[k], svc.global_state[k]) for k in before)
    with pytest.raises(ServiceError, match="clip_mode"):
        ServiceConfig(run="t", method=METHOD, rounds=1, clip_norm=1.0, clip_mode="zero")  # type: ignore[arg-type]


def test_a_segment_of_more_records_than_one_writev_takes_reads_back_byte_for_byte(tmp_path: Path) -> None:
    store = RoundStore(tmp_path, sync=True)
    gen = torch.Generator().manual_seed(0)
    records = [
        (f"dev{i}", bytes(torch.randint(0, 256, (int(n),), generator=gen, dtype=torch.uint8).tolist()))
        for i, n in enumerate(torch.randint(0, 3000, (700,), generator=gen))
    ]  # 700 records = 2,100 buffers: three writev calls, some buffers empty
    store.save_updates(3, records[:400])
    store.save_updates(3, records[400:])
    directory = store.round_dir(3)
    assert sorted(p.name for p in directory.iterdir()) == ["000001.seg", "000002.seg"]
    assert _read_segment(directory / "000001.seg") + _read_segment(directory / "000002.seg") == records


@pytest.mark.parametrize("sync", [True, False])
def test_megabyte_views_cross_the_early_writeback_points_and_read_back(tmp_path: Path, sync: bool) -> None:
    """Received payloads are read-only views; 18 MB of them pass the 8 MB points where the store
    starts the disk writing (with sync) and still read back byte for byte."""
    store = RoundStore(tmp_path, sync=sync)
    gen = torch.Generator().manual_seed(1)
    sizes = [1_500_000] * 12 + [0, 7, 123_457]
    blobs = [bytearray(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).numpy()) for n in sizes]
    records = [(f"dev{i}", memoryview(blob).toreadonly()) for i, blob in enumerate(blobs)]
    store.save_updates(1, records)
    assert _read_segment(store.round_dir(1) / "000001.seg") == [(c, bytes(p)) for c, p in records]
