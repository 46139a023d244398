"""The coordinator's own evaluation of each new global adapter on a held-out file (``--eval-data``).

The global is evaluated as a device joining now would receive it: the aggregator's payload for a
client of full rank, with a base change the method made (FLoRA, FedEx-LoRA) applied and the tensors
devices keep for themselves (FedSA-LoRA's B) at their initial values.
"""

from __future__ import annotations

from torch import nn

from coordinator.aggregators import Aggregator
from export.adapters import start_state
from export.base_delta import applied_base_delta, split_base_delta
from export.data import TokenizedSplit
from export.evaluation import evaluate_metrics
from export.spec import AdapterSpec
from export.state import State, load_trainable_state

EVAL_BATCH = 64


class GlobalEvaluator:
    """``evaluator(global_state)`` -> ``eval_accuracy``, ``eval_loss``, ``eval_examples`` on ``examples``.

    ``model``: the task's adapted model (its trainable tensors are overwritten on every call);
    ``template``: the model's initial trainable state.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: AdapterSpec,
        aggregator: Aggregator,
        template: State,
        examples: TokenizedSplit,
    ) -> None:
        if len(examples) == 0:
            raise ValueError("no examples to evaluate on")
        self.model, self.spec, self.agg, self.examples = model, spec, aggregator, examples
        suffixes = aggregator.local_suffixes
        self.template = template
        self.kept = {k: v for k, v in template.items() if suffixes and k.endswith(suffixes)}

    def __call__(self, global_state: State) -> dict[str, float]:
        payload = self.agg.announced(global_state)
        view = {**{k: v.detach().to("cpu") for k, v in payload.items()}, **self.kept}
        with applied_base_delta(self.model, split_base_delta(view)[1]):
            load_trainable_state(self.model, start_state(self.spec, view, self.template))
            result = evaluate_metrics(self.model, self.examples.batches(EVAL_BATCH))
        return {"eval_accuracy": result.accuracy, "eval_loss": result.loss, "eval_examples": result.examples}
