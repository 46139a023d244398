"""Fed-SB, random-basis variant: Ravan with one head (METHODS.md 5).

Fed-SB trains only ``R`` (r x r) between frozen ``B = U_r`` and ``A = V_r^T`` and averages ``R``,
which is exact. The paper takes ``U_r, V_r`` from the SVD of a first-step full gradient; this is the
**random-basis variant**: seed-derived orthonormal (Gram-Schmidt) bases, ``R`` starting at 0, i.e.
Ravan with ``h = 1`` (so the single ``s`` also trains and is folded into the upload). The head size
is the spec's ``head_rank``, or by default matched to a rank-``r`` LoRA's trainable budget,
``floor(sqrt(r (d + k)))``. Upload and download: ``r_h^2`` per layer.
"""

from __future__ import annotations

from coordinator.aggregators.ravan import Ravan
from export.spec import AdapterSpec


class FedSB(Ravan):
    name = "fed_sb"

    @classmethod
    def client_spec(cls, spec: AdapterSpec) -> AdapterSpec:
        return spec.with_(heads=1)
