"""Graph passes on exported programs, applied between ``torch.export`` and ``to_edge``.

* :func:`rewrite_addmm` turns ``aten.addmm`` into ``aten.mm`` + ``aten.add``: the prebuilt ExecuTorch
  runtime runs ``addmm`` with a naive kernel (NOTES.md: 52 of 55 ms of a step), ``mm`` with a fast one.
* :func:`decompose_erf` writes ``aten.erf`` (GELU's backward) through XNNPACK's ``gelu``: the
  runtime's portable ``erf`` is scalar code (147 of ~1,800 ms of a MiniLM step).
* :func:`drop_safe_softmax_guard` removes attention's guard for rows with every key masked
  (``where(all(x == -inf), 0, softmax(x))``): ~95 ms of portable ``eq``/``any``/``where`` per MiniLM
  step, for rows a tokenized example never has (its first token is always attended; the ExecuTorch
  trainer refuses an example without tokens).
* :func:`strip_state_prefix` renames the program's parameters and buffers, so a wrapper module's
  attribute name (``model.``) does not leak into the names the ``.ptd`` and the runtime use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeGuard

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature

aten = torch.ops.aten
ADDMM = aten.addmm.default


_Builder = Callable[["_Emitter", torch.fx.Node], torch.fx.Node]


def count_op(ep: ExportedProgram, op: object) -> int:
    """How many ``call_function`` nodes of ``op`` the program's graph holds."""
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target == op)


def _is_plain_addmm(node: torch.fx.Node) -> bool:
    """``addmm(bias, a, b)`` with the default ``beta = alpha = 1`` (the only form ``F.linear`` emits)."""
    if node.op != "call_function" or node.target != ADDMM:
        return False
    beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
    alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
    return bool(beta == 1 and alpha == 1)


class _Emitter:
    """Inserts ``call_function`` nodes before ``anchor`` with the anchor's meta and fake values.

    Shapes (symbolic batch included) come from running each op on its inputs' fake values.
    """

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node) -> None:
        self.graph, self.anchor = graph, anchor
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])

    def __call__(self, op: Any, *args: Any) -> torch.fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(op, args)
        node.meta = {k: v for k, v in self.anchor.meta.items() if k != "val"}
        vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
        with self.fake_mode if self.fake_mode is not None else torch.no_grad():
            node.meta["val"] = op(*vals)
        return node


def _replace(ep: ExportedProgram, match: Callable[[torch.fx.Node], bool], build: _Builder) -> int:
    """Replace every node ``match`` accepts by what ``build(emit, node)`` returns; in place."""
    graph = ep.graph_module.graph
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not match(node):
            continue
        new = build(_Emitter(graph, node), node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced += 1
    graph.lint()
    ep.graph_module.recompile()
    return replaced


def rewrite_addmm(ep: ExportedProgram) -> int:
    """Rewrite every plain ``addmm(bias, a, b)`` into ``add(mm(a, b), bias)``, in place.

    Works on the joint forward/backward graph too. Returns the number of nodes rewritten; an
    ``addmm`` with a non-default ``beta`` or ``alpha`` is left alone.
    """

    def build(emit: _Emitter, node: torch.fx.Node) -> torch.fx.Node:
        bias, a, b = node.args[:3]
        return emit(aten.add.Tensor, emit(aten.mm.default, a, b), bias)

    return _replace(ep, _is_plain_addmm, build)


# erf(z) = 2 Phi(sqrt(2) z) - 1, and Phi(y) = gelu(y) / y: XNNPACK delegates gelu (a vectorised erf
# inside), so erf costs 6 elementwise passes instead of the portable runtime's scalar loop (or ~24
# passes for a polynomial). y is shifted by _GELU_SHIFT so that y = 0 gives gelu(e) / e = 1/2, not
# 0/0; the shift vanishes against any |y| above 1e-23 (only y = -_GELU_SHIFT exactly would divide by 0).
_GELU_SHIFT = 1e-30


def decompose_erf(ep: ExportedProgram) -> int:
    """Rewrite every ``aten.erf(z)`` as ``2 gelu(y) / y - 1`` with ``y = sqrt(2) z``, in place.

    Returns the number of nodes rewritten.
    """

    def build(emit: _Emitter, node: torch.fx.Node) -> torch.fx.Node:
        y = emit(aten.add.Tensor, emit(aten.mul.Tensor, node.args[0], math.sqrt(2.0)), _GELU_SHIFT)
        cdf = emit(aten.div.Tensor, emit(aten.gelu.default, y), y)
        return emit(aten.sub.Tensor, emit(aten.mul.Tensor, cdf, 2.0), 1.0)

    return _replace(ep, lambda n: n.target == aten.erf.default, build)


def _is(node: object, op: object) -> TypeGuard[torch.fx.Node]:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == op


def _guarded_softmax(node: torch.fx.Node) -> torch.fx.Node | None:
    """The ``softmax`` of ``where(logical_not(any(logical_not(x == -inf), -1)), zeros, softmax(x))``."""
    if not _is(node, aten.where.self) or len(node.args) != 3:
        return None
    cond, zeros, soft = node.args
    if not (
        _is(soft, aten._softmax.default)
        and _is(zeros, aten.full_like.default)
        and zeros.args[1:2] == (0,)
        and _is(cond, aten.logical_not.default)
    ):
        return None
    rows = cond.args[0]
    kept = rows.args[0] if _is(rows, aten.any.dim) else None
    masked = kept.args[0] if _is(kept, aten.logical_not.default) else None
    if not (_is(masked, aten.eq.Scalar) and masked.args == (soft.args[0], float("-inf"))):
        return None
    return soft


def drop_safe_softmax_guard(ep: ExportedProgram) -> int:
    """Replace every guarded softmax by the plain one, in place; returns how many.

    The guard only changes rows whose every entry is ``-inf`` (NaN without it, zeros with it).
    """
    graph = ep.graph_module.graph
    dropped = 0
    for node in list(graph.nodes):
        soft = _guarded_softmax(node)
        if soft is None:
            continue
        chain = [node.args[0], node.args[1]]  # the condition's ops and the zeros, if now unused
        node.replace_all_uses_with(soft)
        graph.erase_node(node)
        while chain:
            dead = chain.pop()
            if isinstance(dead, torch.fx.Node) and not dead.users and dead.op == "call_function":
                chain.extend(a for a in dead.args if isinstance(a, torch.fx.Node))
                graph.erase_node(dead)
        dropped += 1
    graph.lint()
    ep.graph_module.recompile()
    return dropped


def strip_state_prefix(ep: ExportedProgram, prefix: str) -> ExportedProgram:
    """A copy of ``ep`` whose parameter, buffer and constant names lose a leading ``prefix``.

    Names without the prefix (tensor constants that tracing lifted, ``lifted_tensor_0``) are kept;
    a rename that would make two names equal is refused.
    """

    def strip(name: str) -> str:
        return name[len(prefix) :] if name.startswith(prefix) else name

    for names in (ep.state_dict, ep.constants):
        if len({strip(n) for n in names}) != len(names):
            raise ValueError(f"stripping {prefix!r} would merge two state names")

    def renamed_target(target: str | None) -> str | None:
        if target is not None and (target in ep.state_dict or target in ep.constants):
            return strip(target)
        return target

    sig = ep.graph_signature
    inputs = [dataclasses.replace(s, target=renamed_target(s.target)) for s in sig.input_specs]
    outputs = [dataclasses.replace(s, target=renamed_target(s.target)) for s in sig.output_specs]
    state_dict = {strip(k): v for k, v in ep.state_dict.items()}
    constants = {strip(k): v for k, v in ep.constants.items()}
    return ep._update(
        ep.graph_module,
        ExportGraphSignature(input_specs=inputs, output_specs=outputs),
        state_dict=state_dict,
        constants=constants,
    )
