"""The ``ray`` transport: virtual clients spread over Ray actors that each hold the model once.

Every actor builds the adapted model from the run config and seed, so all actors and the driver hold
bit-identical frozen weights and adapter templates; nothing of the model ever travels. The training
inputs (cached hidden states) go into Ray's object store once and every actor on a node maps the
same shared-memory copy. Per round, each distinct payload is put into the store once and every job
refers to it; jobs run unordered over an ``ActorPool`` and the results are put back in job order,
so aggregation sees exactly what the in-process transport gives it (same seed, same metrics).

What crosses process boundaries: tensors as safetensors bytes, plans and metrics as JSON, example
indices and inputs as plain numpy arrays; no Python object of ours is pickled.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from edge_client.local_round import LocalPlan, trained_kept
from edge_client.trainer import TrainMetrics
from export.spec import AdapterSpec
from export.state import State
from sim.config import SimConfig
from sim.features import Inputs
from sim.trainers import adapted_model, client_trainer, world_device
from sim.transports import ClientJob, ClientResult, train_client

# Without the first two, Ray binds the machine's external address and phones home (NOTES.md, "Ray").
# Ray starts its workers at nice 15: on a machine shared with other jobs the actors, which do all of
# the simulation's work, then get a few percent of a core (measured: 2% each beside four busy loops).
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_worker_niceness": "0",
}
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class RayTransportError(RuntimeError):
    """Ray is missing, or the cluster cannot run the simulator's actors."""


def connect(address: str = "", num_cpus: int | None = None) -> None:
    """Join Ray once per process: a private local instance on 127.0.0.1 (``""``) or a cluster.

    ``address`` is ``"auto"`` (the cluster ``ray start`` left running here) or ``host:port``.
    Actors find this project through ``PYTHONPATH``; on a remote cluster it must be installed.
    """
    os.environ.update(RAY_ENV)
    try:
        import ray
    except ImportError as e:
        raise RayTransportError("the ray transport needs Ray: pip install 'fleetlora[ray]'") from e
    if ray.is_initialized():
        return
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path, **RAY_ENV}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )


def to_bytes(state: State) -> bytes:
    """A trainable state as safetensors bytes (dtypes and values exact)."""
    return save_tensors({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_bytes(data: bytes) -> State:
    """Safetensors bytes as a state of freshly allocated tensors.

    Tensors viewing the byte buffer may be misaligned, and torch's vectorised reductions then sum in
    another order: fresh (aligned) copies keep the driver's float results identical to ``inproc``.
    """
    return {k: v.clone() for k, v in load_tensors(data).items()}


def metrics_to_json(m: TrainMetrics) -> str:
    return json.dumps({"steps": m.steps, "examples": m.examples, "seconds": m.seconds, "losses": m.losses})


def metrics_from_json(text: str) -> TrainMetrics:
    return TrainMetrics(**json.loads(text))


def config_from_json(text: str) -> SimConfig:
    """The run config an actor was given (JSON turned tuples into lists)."""
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}
    return SimConfig(**fields)


def plan_to_json(job: ClientJob) -> str:
    plan = job.plan
    return json.dumps(
        {
            "local_steps": plan.local_steps,
            "rank": plan.rank,
            "heads": [int(h) for h in plan.heads] if plan.heads is not None else None,
            "batch_size": job.batch_size,
            "data_seed": [int(s) for s in job.data_seed],
        }
    )


class ClientWorker:
    """One actor: the adapted model built once, training whichever clients it is handed.

    Each job loads its whole start state from its payload and builds a fresh optimizer, so a
    result does not depend on which actor ran it or on what that actor ran before.
    """

    def __init__(
        self,
        config_json: str,
        family: str,
        num_classes: int,
        inputs: dict[str, np.ndarray],
        train: bool,
        base_delta: bool = False,
    ):
        config = config_from_json(config_json)
        self.spec = config.spec(family)
        # Ray shows an actor only the GPUs it was given (CUDA_VISIBLE_DEVICES): auto finds them or not.
        device = world_device(config)
        model = adapted_model(config, num_classes, family).to(device)
        self.trainer = client_trainer(config, model, family, num_classes, base_delta)
        self.template = self.trainer.get_trainable()
        with warnings.catch_warnings():  # read-only shared memory: the inputs are only ever indexed
            warnings.simplefilter("ignore", UserWarning)
            tensors = {k: torch.from_numpy(v) for k, v in inputs.items() if k != "start_layer"}
        self.inputs = Inputs(
            tensors["x"], tensors["attention_mask"], tensors["labels"], int(inputs["start_layer"])
        ).to(device)
        self.train_fn = train

    def train(
        self, index: int, spec_json: str, plan_json: str, indices: np.ndarray, payload: bytes, kept: bytes
    ) -> tuple[int, bytes, str, bytes]:
        """Job ``index``: (index, upload, metrics as JSON, kept tensors after training).

        ``kept`` (safetensors, empty for none) is what the client keeps between rounds (FedSA-LoRA's B).
        """
        if not self.train_fn:  # `bench`: the round trip without the training
            return index, payload, metrics_to_json(TrainMetrics()), b""
        spec = AdapterSpec.from_json(spec_json)
        if spec != self.spec:
            raise RayTransportError(f"job spec {spec.digest()} differs from the actor's {self.spec.digest()}")
        p = json.loads(plan_json)
        heads = tuple(p["heads"]) if p["heads"] is not None else None
        plan = LocalPlan(p["local_steps"], rank=p["rank"], heads=heads)
        keep_local = from_bytes(kept) if kept else None
        upload, metrics = train_client(
            self.trainer,
            spec,
            self.template,
            self.inputs,
            indices,
            plan,
            p["batch_size"],
            tuple(p["data_seed"]),
            from_bytes(payload),
            keep_local,
        )
        local = to_bytes(trained_kept(self.trainer, keep_local)) if keep_local else b""
        return index, to_bytes(upload), metrics_to_json(metrics), local


def gpu_share(config: SimConfig, actors: int) -> float:
    """Each actor's share of the cluster's GPUs (0 without GPUs or with ``--device cpu``): the actors
    split them evenly, so several models share one GPU when there are more actors than GPUs."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    return 0.0 if config.device == "cpu" or gpus == 0 else min(1.0, gpus / actors)


class RayTransport:
    """Clients trained by a pool of Ray actors, results in job order.

    Parameters
    ----------
    config : SimConfig
        The run; ``ray_address`` and ``ray_actors`` choose the cluster and the pool size.
    family : str
        Adapter family every actor attaches.
    num_classes : int
        Classes of the classification head.
    train_inputs : Inputs
        The training split, shipped to the object store once.
    train : bool
        ``False`` returns each payload unchanged after the round trip (benchmarks).
    base_delta : bool
        The method changes the frozen base (an ExecuTorch trainer then takes it as program inputs).
    """

    def __init__(
        self,
        config: SimConfig,
        family: str,
        num_classes: int,
        train_inputs: Inputs,
        train: bool = True,
        base_delta: bool = False,
    ):
        connect(config.ray_address)
        import ray
        from ray.util import ActorPool

        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = config.ray_actors or max(1, min(cpus, config.clients_per_round))
        inputs = {
            "x": train_inputs.x.cpu().numpy(),
            "attention_mask": train_inputs.attention_mask.cpu().numpy(),
            "labels": train_inputs.labels.cpu().numpy(),
            "start_layer": np.asarray(train_inputs.start_layer),
        }
        inputs_ref = ray.put(inputs)
        # A fractional CPU lets more actors than cores share a machine (more models, not more speed).
        worker = ray.remote(num_cpus=min(1.0, cpus / n), num_gpus=gpu_share(config, n))(ClientWorker)
        config_json = json.dumps(config.to_dict())
        self.actors: list[Any] = [
            worker.remote(config_json, family, num_classes, inputs_ref, train, base_delta) for _ in range(n)
        ]
        self.pool = ActorPool(self.actors)

    def run(self, spec: AdapterSpec, jobs: list[ClientJob]) -> list[ClientResult]:
        import ray

        spec_json = spec.to_json()
        payload_refs: dict[int, Any] = {}  # id(payload) -> ref: one put per distinct payload object
        tasks = []
        for index, job in enumerate(jobs):
            key = id(job.payload)  # the payloads stay alive in ``jobs``, so ids are unique here
            if key not in payload_refs:
                payload_refs[key] = ray.put(to_bytes(job.payload))
            kept = to_bytes(job.keep_local) if job.keep_local else b""
            tasks.append((index, plan_to_json(job), job.client.indices, payload_refs[key], kept))
        results: list[ClientResult | None] = [None] * len(jobs)
        for index, upload, metrics, local in self.pool.map_unordered(
            lambda actor, t: actor.train.remote(t[0], spec_json, t[1], t[2], t[3], t[4]), tasks
        ):
            results[index] = ClientResult(
                jobs[index].client.cid,
                from_bytes(upload),
                metrics_from_json(metrics),
                from_bytes(local) if local else {},
            )
        return [r for r in results if r is not None]

    def close(self) -> None:
        """Stop this transport's actors (the Ray runtime stays up for the next method)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
