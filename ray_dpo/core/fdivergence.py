"""f-divergence scores for f-DPO (Wang et al. 2023, "Beyond Reverse KL"): a loss compares f'(t) of the
policy/reference probability ratio t = pi / pi_ref instead of log t.

The forms are TRL 1.16's, constants included. A constant cancels in a chosen-minus-rejected difference, but not once
ipo or sigmoid_norm divide each score by its own response length: TRL 1.9 dropped them (forward_kl as -1/t, js as
log(t / (1 + t))), so those two losses differ between TRL versions, and we follow 1.16.

TRL's alpha parameterisation is f'(t) = (t^(alpha - 1) - 1) / (alpha - 1): alpha -> 1 is reverse KL and alpha = 0 is
forward KL, so TRL's alpha is the paper's 1 - alpha (the paper writes (1 - t^(-alpha)) / alpha). The default, 0.5, is
the same in both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ray_dpo.core.names import F_DIVERGENCES

# exp(700) ~ 1e304: a difference of two such scores, times a beta of a few, is still finite in float64. Past it the
# pair losses have saturated (or are astronomically large anyway), so the exponent is capped instead of overflowing:
# an inf score would turn the backward's 0 * inf into NaN.
MAX_EXPONENT = 700.0


def f_divergence_score(logratio: Tensor, f_divergence_type: str, alpha: float = 0.5) -> Tensor:
    """f'(t) at t = exp(logratio), in float64 (TRL computes alpha's exp in float32 and has no float64 path)."""
    u = logratio.to(torch.float64)
    if f_divergence_type == "reverse_kl":  # f'(t) = log t: standard DPO
        return u
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t; expm1 keeps it exact near t = 1
        return -_capped_expm1(-u)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (1 + t)) = log 2 + log sigmoid(log t)
        return math.log(2) + F.logsigmoid(u)
    if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(alpha - 1) - 1) / (alpha - 1)
        if abs(alpha - 1.0) < 1e-6:  # the limit is log t: reverse KL, as TRL
            return u
        return _capped_expm1((alpha - 1.0) * u) / (alpha - 1.0)
    raise ValueError(f"dpo.f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")


def _capped_expm1(x: Tensor) -> Tensor:
    return torch.expm1(x.clamp(max=MAX_EXPONENT))
