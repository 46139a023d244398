"""The ``executorch`` trainer backend: the bundle's training program with the runtime's SGD.

The program (``train.pte``) holds the frozen base; the trainable tensors live in runtime memory,
loaded from ``adapter.ptd`` and then overwritten with each round's global adapter through
``named_parameters()``. executorch is imported here only, when a trainer is made.

Ravan with a subset of heads: the program is exported training every head, and this trainer zeroes
the gradient rows of the heads outside the subset before each optimizer step. The mask in
``RavanLinear`` only cuts gradients (the forward pass uses every head either way), so this computes
exactly what the eager model with ``head_mask`` computes, without a program input or one bundle per
head budget.

A coordinator's change of the base (FLoRA, FedEx-LoRA) reaches a program exported with base-delta inputs
(``fleetlora export --base-delta``) through :meth:`ExecuTorchTrainer.base_delta`; they are zero otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from edge_client.trainer import Batch, OptimizerConfig, StepBudget, TrainMetrics
from export.base_delta import base_delta_layers, dense_base_delta
from export.bundle import ADAPTER_PTD, TRAIN_PTE, Bundle, load_bundle
from export.evaluation import EvalMetrics, EvalTally
from export.state import RAVAN_H, RAVAN_S, State, StateError


class ExecuTorchTrainer:
    """Trains the adapter inside an ExecuTorch training program.

    Parameters
    ----------
    train_pte, adapter_ptd : bytes
        The training program and its trainable tensors (a bundle's ``train.pte`` and ``adapter.ptd``).
    seq_len : int
        The program's (static) sequence length.
    batch_range : (int, int)
        The batch sizes the program accepts.
    optimizer : OptimizerConfig, optional
        Must be ``sgd`` (the only optimizer the runtime offers). A fresh optimizer is made for
        every ``train`` call, like :class:`edge_client.trainer.EagerTrainer`.
    """

    def __init__(
        self,
        train_pte: bytes,
        adapter_ptd: bytes,
        *,
        seq_len: int,
        batch_range: tuple[int, int],
        optimizer: OptimizerConfig | None = None,
        base_delta: Mapping[str, Sequence[int]] | None = None,
    ):
        from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer
        from executorch.extension.training import TrainingModule

        self.opt_config = optimizer or OptimizerConfig()
        if self.opt_config.name != "sgd":
            raise ValueError(f"the ExecuTorch runtime offers SGD only, not {self.opt_config.name!r}")
        self.seq_len = seq_len
        self.batch_range = batch_range
        # The runtime reads constants straight out of these buffers: keep them alive as long as it.
        self._buffers = (train_pte, adapter_ptd)
        self._module = TrainingModule(_load_for_executorch_from_buffer(train_pte, adapter_ptd))
        self._heads: list[int] | None = None
        # The program's base-delta inputs (layer -> (d, k)), zero unless a base_delta() block is open.
        self._delta_shapes = {name: (int(d), int(k)) for name, (d, k) in (base_delta or {}).items()}
        self._deltas = self._zero_deltas()
        # named_parameters() exists only after a first forward_backward: run one on dummy inputs
        # (no optimizer step, so the tensors keep the .ptd's values).
        n = batch_range[0]
        dummy = torch.zeros(n, seq_len, dtype=torch.long)
        self._module.forward_backward(
            "forward", (dummy, torch.ones_like(dummy), torch.zeros(n, dtype=torch.long), *self._deltas)
        )
        self._params: dict[str, torch.Tensor] = self._module.named_parameters()

    @classmethod
    def from_bundle(
        cls, bundle: str | Path | Bundle, optimizer: OptimizerConfig | None = None
    ) -> ExecuTorchTrainer:
        """A trainer for a bundle folder (verified against its manifest) or a loaded :class:`Bundle`."""
        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        return cls(
            b.read(TRAIN_PTE),
            b.read(ADAPTER_PTD),
            seq_len=b.info.seq_len,
            batch_range=b.batch_range,
            optimizer=optimizer,
            base_delta=b.info.base_delta,
        )

    # -- state in and out ----------------------------------------------------------------------------

    def get_trainable(self) -> State:
        # Clones: the runtime's tensors alias its memory and change with every step.
        return {k: v.clone() for k, v in self._params.items()}

    def set_trainable(self, state: State) -> None:
        """Write ``state`` into the runtime (every key, checked before anything is written)."""
        unknown = sorted(set(state) - set(self._params))
        missing = sorted(set(self._params) - set(state))
        if unknown or missing:
            raise StateError(
                f"state keys differ from the program's: unknown {unknown[:3]}, missing {missing[:3]}"
            )
        for key, t in state.items():
            p = self._params[key]
            if tuple(t.shape) != tuple(p.shape):
                raise StateError(f"{key}: shape {tuple(t.shape)} != program's {tuple(p.shape)}")
            if not torch.is_floating_point(t):
                raise StateError(f"{key}: dtype {t.dtype} is not floating point")
        for key, t in state.items():
            self._params[key].copy_(t.to(self._params[key].dtype))

    def select_heads(self, heads: list[int] | None) -> None:
        """Ravan: train only these head indices in every layer (``None``: all)."""
        if heads is not None:
            sizes = {p.shape[0] for k, p in self._params.items() if k.endswith((RAVAN_H, RAVAN_S))}
            if not sizes:
                raise ValueError("this program has no Ravan heads")
            bad = [i for i in heads if not all(0 <= i < n for n in sizes)]
            if bad:
                raise ValueError(f"head indices {bad} out of range for {min(sizes)} heads")
            heads = sorted(set(heads))
        self._heads = heads

    # -- a base changed by the coordinator (FLoRA, FedEx-LoRA) -----------------------------------------

    def _zero_deltas(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(shape) for shape in self._delta_shapes.values())

    @contextmanager
    def base_delta(self, delta: State) -> Iterator[None]:
        """The global's base delta as the program's base-delta inputs for the ``with`` block.

        Only a program exported with them (``fleetlora export --base-delta``) can take one: the base
        is baked into the program, and training on a stale base would be silently wrong.
        """
        if not self._delta_shapes:
            raise TypeError(
                "this bundle's program has no base-delta inputs: rebuild it with `fleetlora export "
                "--base-delta` to train a method that changes the base (FLoRA, FedEx-LoRA)"
            )
        layers = base_delta_layers(delta)
        unknown = sorted(set(layers) - set(self._delta_shapes))
        if unknown:
            raise StateError(f"base delta for layers the program has no input for: {unknown[:3]}")
        deltas = []
        for name, shape in self._delta_shapes.items():
            dense = dense_base_delta(layers[name]).float() if name in layers else torch.zeros(shape)
            if tuple(dense.shape) != shape:
                raise StateError(f"{name}: base delta {tuple(dense.shape)}, the program's input is {shape}")
            deltas.append(dense.contiguous())
        self._deltas = tuple(deltas)
        try:
            yield
        finally:
            self._deltas = self._zero_deltas()

    # -- training ------------------------------------------------------------------------------------

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        if "input_ids" not in batch:
            raise ValueError("the ExecuTorch program takes input_ids (no cached hidden states)")
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        n, lo, hi = int(ids.shape[0]), *self.batch_range
        if ids.dim() != 2 or ids.shape[1] != self.seq_len:
            raise ValueError(f"input_ids must be (batch, {self.seq_len}), got {tuple(ids.shape)}")
        if mask.shape != ids.shape or not bool((mask != 0).any(1).all()):
            # The program drops attention's guard for queries with no key (export.passes).
            raise ValueError("every example needs at least one token in its attention_mask")
        copies = -(-lo // n) if 0 < n < lo else 1
        if not lo <= n * copies <= hi:
            raise ValueError(f"batch size {n} is outside the program's range [{lo}, {hi}]")
        # A batch below the program's smallest is tiled whole: the mean loss and its gradient are unchanged.
        ids, mask, labels = (t.repeat(copies, *([1] * (t.dim() - 1))) for t in (ids, mask, labels))
        return ids.long(), mask.long(), labels.long(), *self._deltas

    def _mask_heads(self, grads: dict[str, torch.Tensor]) -> None:
        if self._heads is None:
            return
        for key, g in grads.items():
            if key.endswith((RAVAN_H, RAVAN_S)):
                keep = torch.zeros(g.shape[0], dtype=torch.bool)
                keep[self._heads] = True
                g[~keep] = 0

    def _optimizer(self) -> Any:
        from executorch.extension.training import get_sgd_optimizer

        c = self.opt_config
        return get_sgd_optimizer(self._params, c.lr, c.momentum, 0.0, c.weight_decay, False)

    def evaluate(self, batches: Iterable[Batch]) -> EvalMetrics:
        """The current adapter on ``batches``: the program's loss and logits, no optimizer step.

        The training program is the only one holding the adapter in runtime memory, so it computes
        the logits (its gradients are computed too and dropped); batches above the program's largest
        are cut into pieces.
        """
        tally = EvalTally()
        hi = self.batch_range[1]
        for batch in batches:
            for start in range(0, int(batch["labels"].shape[0]), hi):
                piece = {k: v[start : start + hi] for k, v in batch.items()}
                n = int(piece["labels"].shape[0])
                logits = self._module.forward_backward("forward", self._inputs(piece))[1]
                tally.add(logits[:n], piece["labels"])
        return tally.result()

    def train(self, batches: Iterable[Batch], budget: StepBudget) -> TrainMetrics:
        opt = self._optimizer()
        metrics = TrainMetrics()
        start = time.perf_counter()
        it: Iterator[Batch] = iter(batches)
        for _ in range(budget.local_steps):
            batch = next(it, None)
            if batch is None:
                break
            loss = self._module.forward_backward("forward", self._inputs(batch))[0]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} at local step {metrics.steps}")
            grads = self._module.named_gradients()
            self._mask_heads(grads)
            opt.step(grads)
            metrics.steps += 1
            metrics.examples += int(batch["labels"].shape[0])
            metrics.losses.append(float(loss))
        metrics.seconds = time.perf_counter() - start
        return metrics
