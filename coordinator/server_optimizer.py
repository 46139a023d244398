"""The server's step on top of any aggregator: FedAvgM (Hsu et al. 2019, "Measuring the effects of
non-identical data distribution for federated visual classification").

An aggregator returns the next global adapter; the server optimizer treats ``aggregate - global`` as a
pseudo-gradient and moves the global by ``lr`` times its momentum-averaged sum::

    v <- momentum * v + (aggregate - global)
    global <- global + lr * v

With ``lr = 1`` and ``momentum = 0`` this is the identity (the aggregate is returned as it is). A
smaller ``lr`` damps the round-to-round swings of a non-IID fleet; momentum carries progress across
rounds, which local optimizers cannot (they restart from the global every round).

Only tensors that every round carries with the same shape move this way; everything else (a base
delta, a version counter, tensors whose shape changes) is taken from the aggregate unchanged.
Methods that change the frozen base (FLoRA, FedEx-LoRA) re-initialise their adapter every round, so
a server step on it means nothing: for them the server optimizer is the identity (:meth:`for_method`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from export.state import State, is_base_delta_key


@dataclass
class ServerOptimizer:
    lr: float = 1.0
    momentum: float = 0.0
    velocity: State = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"server lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"server momentum must be in [0, 1), got {self.momentum}")

    @property
    def is_identity(self) -> bool:
        return self.lr == 1.0 and self.momentum == 0.0

    def for_method(self, changes_base: bool) -> ServerOptimizer:
        """This optimizer, or the identity for a method that changes the frozen base every round."""
        return ServerOptimizer() if changes_base else self

    def step(self, global_state: State, aggregate: State) -> State:
        """The next global state from the current one and the aggregator's output."""
        if self.is_identity:
            return aggregate
        out = dict(aggregate)
        for key, new in aggregate.items():
            old = global_state.get(key)
            if old is None or old.shape != new.shape or not new.is_floating_point() or is_base_delta_key(key):
                continue
            delta = new - old
            v = self.velocity.get(key)
            v = delta if v is None or v.shape != delta.shape else self.momentum * v + delta
            self.velocity[key] = v
            out[key] = old + self.lr * v
        return out
