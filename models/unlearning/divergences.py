"""FLAT's loss: the variational form of an f-divergence between template and forget answers.

With g the output activation and f* the convex conjugate of the divergence's generator, FLAT
minimises  -g(P_template) + f*(g(P_forget)),  where P is the answers' mean token probability:
maximising the variational lower bound of D_f(template || forget) pushes probability onto the
template answers and away from the forget answers. The pairs (g, f* o g) are those of the
reference implementation (UCSC-REAL/FLAT, `dataloader.py`, `get_contrastive_loss`, after the
f-GAN table of Nowozin et al.): its `activation(x)` is -mean g(x) and its `conjugate(x)` is
-mean f*(g(x)), and its loss is activation(P_template) - conjugate(P_forget).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["tv", "kl", "js", "pearson"]

_LOG2 = math.log(2.0)

_TERMS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    # name: (g, f* o g)
    "tv": (lambda x: torch.tanh(x) / 2, lambda x: torch.tanh(x) / 2),
    "kl": (lambda x: x, lambda x: torch.exp(x - 1)),
    "js": (lambda x: _LOG2 - F.softplus(-x), lambda x: F.softplus(x) - _LOG2),
    "pearson": (lambda x: x, lambda x: x * x / 4 + x),
}


def flat_loss(template_prob: torch.Tensor, forget_prob: torch.Tensor, divergence: Divergence) -> torch.Tensor:
    """-g(P_template) + f*(g(P_forget)) for batch-mean answer probabilities (scalars or batches,
    averaged last, as the reference averages over the batch's tokens before the activation)."""
    activation, conjugate = _TERMS[divergence]
    return -activation(template_prob.mean()) + conjugate(forget_prob.mean())
