"""The preference loss family: per-pair losses from sequence log-probs of the policy and the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ray_dpo.core.names import LOSS_TYPES


def default_reduction(loss_type: str, reduction: str | None = None) -> str:
    """Sequence log-prob reduction: the given one, else "mean" for IPO (as TRL) and "sum" (the DPO paper) otherwise.
    The one place this rule lives: a precomputed reference must be reduced exactly as the policy is in training."""
    return reduction or ("mean" if loss_type == "ipo" else "sum")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    rpo_alpha: float | None = None,
    policy_chosen_nll: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean loss over the batch and detached metrics with TRL's names.

    sigmoid  DPO (Rafailov et al. 2023); label_smoothing > 0 is cDPO (Mitchell 2023)
    robust   rDPO (Chowdhury et al. 2024), unbiased under label noise rate `label_smoothing`
    ipo      IPO (Azar et al. 2023): (h - 1/(2 beta))^2
    hinge    SLiC (Zhao et al. 2023): relu(1 - beta h)
    sppo_hard  SPPO (Wu et al. 2024), hard-label form
    nca_pair NCA (Chen et al. 2024), pairwise form
    h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)); `reference_free` sets the ref terms to 0.
    rpo_alpha adds rpo_alpha * NLL of the chosen response (RPO, Pang et al. 2024).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"dpo.label_smoothing applies to 'sigmoid' and 'robust' only, not {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if reference_free:
        ref_chosen_logps = ref_rejected_logps = torch.zeros_like(policy_chosen_logps)
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("dpo_loss needs reference log-probs unless reference_free=True")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - eps) + F.logsigmoid(-beta * h) * eps) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    else:  # nca_pair
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        losses = (
            -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
        )
    loss = losses.mean()
    if rpo_alpha:
        if policy_chosen_nll is None:
            raise ValueError("dpo.rpo_alpha needs policy_chosen_nll")
        loss = loss + rpo_alpha * policy_chosen_nll

    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    metrics = {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    return loss, metrics
