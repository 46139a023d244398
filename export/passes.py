"""Graph passes on exported programs, applied between ``torch.export`` and ``to_edge``.

* :func:`rewrite_addmm` turns ``aten.addmm`` into ``aten.mm`` + ``aten.add``: the prebuilt ExecuTorch
  runtime runs ``addmm`` with a naive kernel (NOTES.md: 52 of 55 ms of a step), ``mm`` with a fast one.
* :func:`strip_state_prefix` renames the program's parameters and buffers, so a wrapper module's
  attribute name (``model.``) does not leak into the names the ``.ptd`` and the runtime use.
"""

from __future__ import annotations

import dataclasses

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature

ADDMM = torch.ops.aten.addmm.default


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


def rewrite_addmm(ep: ExportedProgram) -> int:
    """Rewrite every plain ``addmm(bias, a, b)`` into ``add(mm(a, b), bias)``, in place.

    Works on the joint forward/backward graph too. Returns the number of nodes rewritten; an
    ``addmm`` with a non-default ``beta`` or ``alpha`` is left alone.
    """
    graph = ep.graph_module.graph
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])
    rewritten = 0
    for node in list(graph.nodes):
        if not _is_plain_addmm(node):
            continue
        bias, a, b = node.args[:3]
        assert (
            isinstance(bias, torch.fx.Node) and isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)
        )
        with graph.inserting_before(node):
            mm = graph.call_function(torch.ops.aten.mm.default, (a, b))
            add = graph.call_function(torch.ops.aten.add.Tensor, (mm, bias))
        for new in (mm, add):
            new.meta = {k: v for k, v in node.meta.items() if k != "val"}
        # Shapes (symbolic batch included) come from running the ops on the fake values.
        with fake_mode if fake_mode is not None else torch.no_grad():
            mm.meta["val"] = torch.ops.aten.mm.default(a.meta["val"], b.meta["val"])
            add.meta["val"] = torch.ops.aten.add.Tensor(mm.meta["val"], bias.meta["val"])
        node.replace_all_uses_with(add)
        graph.erase_node(node)
        rewritten += 1
    graph.lint()
    ep.graph_module.recompile()
    return rewritten


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
