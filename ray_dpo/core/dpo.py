"""`DPO`, the x-transformers seed contract: `DPO(model, beta, pad_id)`, `policy_model` / `ref_model`, the loss.

Chosen and rejected run through ONE forward per model (`ray_dpo.core.pairs`); the loss is `ray_dpo.core.losses`'.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ray_dpo.core.logps import scored_logps
from ray_dpo.core.losses import default_reduction, dpo_loss
from ray_dpo.core.names import REFERENCE_MODES
from ray_dpo.core.pairs import (
    check_prefix_sharing,
    pack_batch,
    reduce_logps,
    response_mask,
    score_batch,
    score_pairs,
    score_rows,
)


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) for each position: `(..., V), (...) -> (...)`, computed in at least fp32.

    Gathers the target logit and subtracts logsumexp, so no second (..., V) log-softmax tensor is kept.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return target_logits - logits.logsumexp(dim=-1)


def sequence_logps(model: nn.Module, seq: Tensor, response_mask: Tensor, reduction: str = "sum") -> Tensor:
    """Log-prob of the masked tokens of each row of `seq` (B, N) under `model`: (B,)."""
    scored = response_mask[:, 1:].bool()
    return reduce_logps(scored_logps(model, seq[:, :-1], seq[:, 1:], scored), scored, reduction)


class DPO(nn.Module):
    """`DPO(model, beta=0.1, pad_id=None)`: policy = `model`, reference = a frozen deep copy.

    `dpo(preferred_seq, unpreferred_seq, prompt_mask=...)` returns the scalar loss; metrics are in
    `.last_metrics` (or returned with `return_metrics=True`). Chosen and rejected share ONE forward pass.
    `reference`: "live" (a frozen model: `ref_model`, default a deep copy of `model`), "precomputed" (reference
    log-probs are passed to `forward` / found in the batch; no model held) or "none" (reference-free: an implicit
    uniform reference).
    `reduction`: sequence log-prob as "sum" (the DPO paper) or "mean"; default "mean" for IPO (as TRL), else "sum".
    `prefix_sharing=True` (TransformerLM only): policy and live reference each run ONE packed
    `[prompt, chosen, rejected]` row per pair instead of two sequences; same log-probs, the prompt computed once.
    `pack_len` (TransformerLM, Hugging Face Llama / Qwen2 / Mistral): whole pairs packed into rows of up to that many
    tokens, padding only after a row's last pair (`ray_dpo.core.pairs.pack_rows`); same log-probs.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        beta: float = 0.1,
        pad_id: int | None = None,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        rpo_alpha: float | None = None,
        reference: str = "live",
        ref_model: nn.Module | None = None,
        reduction: str | None = None,
        prefix_sharing: bool = False,
        pack_len: int | None = None,
    ):
        super().__init__()
        if reference not in REFERENCE_MODES:
            raise ValueError(f"dpo.reference must be one of {REFERENCE_MODES}, got {reference!r}")
        if ref_model is not None and reference != "live":
            raise ValueError(f"a ref_model was given but reference={reference!r}: use reference='live'")
        if prefix_sharing:
            check_prefix_sharing(model)
        if pack_len is not None:
            check_prefix_sharing(model, "data.packing")
        self.prefix_sharing, self.pack_len = prefix_sharing, pack_len
        self.policy_model = model
        self.reference = reference
        self.ref_model = None
        if reference == "live":
            self.ref_model = (ref_model if ref_model is not None else copy.deepcopy(model)).eval().requires_grad_(False)
        self.beta, self.pad_id = beta, pad_id
        self.loss_kwargs = dict(
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            reference_free=reference == "none",
            rpo_alpha=rpo_alpha,
        )
        self.reduction = default_reduction(loss_type, reduction)
        self.last_metrics: dict[str, Tensor] = {}

    def parameters(self, recurse: bool = True):
        return self.policy_model.parameters(recurse)

    def train(self, mode: bool = True) -> DPO:
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()
        return self

    def forward(
        self,
        preferred_seq: Tensor,
        unpreferred_seq: Tensor,
        *,
        prompt_mask: Tensor,
        preferred_seq_mask: Tensor | None = None,
        unpreferred_seq_mask: Tensor | None = None,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        return_metrics: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        if preferred_seq.dim() != 2 or preferred_seq.shape != unpreferred_seq.shape:
            raise ValueError(
                "DPO expects preferred_seq and unpreferred_seq of the same (batch, seq_len) shape, got "
                f"{tuple(preferred_seq.shape)} and {tuple(unpreferred_seq.shape)}"
            )
        if prompt_mask.shape != preferred_seq.shape:
            raise ValueError(
                f"prompt_mask shape {tuple(prompt_mask.shape)} != sequence shape {tuple(preferred_seq.shape)}"
            )
        chosen_mask = response_mask(preferred_seq, prompt_mask, preferred_seq_mask, self.pad_id)
        rejected_mask = response_mask(unpreferred_seq, prompt_mask, unpreferred_seq_mask, self.pad_id)
        score = functools.partial(
            score_pairs,
            chosen=preferred_seq,
            rejected=unpreferred_seq,
            chosen_mask=chosen_mask,
            rejected_mask=rejected_mask,
            prefix_sharing=self.prefix_sharing,
            pad_id=self._pad,
            pack_len=self.pack_len,
        )
        loss, metrics = self._loss(score, ref_chosen_logps, ref_rejected_logps)
        return (loss, metrics) if return_metrics else loss

    def batch_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """DPO loss from a training-worker batch (see `score_batch`), with optional precomputed reference
        log-probs `ref_chosen_logp`, `ref_rejected_logp` (B,). Uses the packed path when `prefix_sharing` is on; with
        `pack_len` the rows are packed once for the policy and the live reference."""
        if self.pack_len is not None:
            packed = pack_batch(batch, prefix_sharing=self.prefix_sharing, pack_len=self.pack_len, pad_id=self._pad)
            score = functools.partial(score_rows, packed=packed)
        else:
            score = functools.partial(score_batch, batch=batch, prefix_sharing=self.prefix_sharing, pad_id=self._pad)
        return self._loss(score, batch.get("ref_chosen_logp"), batch.get("ref_rejected_logp"))

    @property
    def _pad(self) -> int:
        return self.pad_id if self.pad_id is not None else 0

    def _loss(self, score, ref_chosen_logps, ref_rejected_logps) -> tuple[Tensor, dict[str, Tensor]]:
        """`score(model)` -> PairTokenLogps for the policy and (live reference) the frozen model."""
        if self.reference == "precomputed" and (ref_chosen_logps is None or ref_rejected_logps is None):
            raise ValueError("DPO(reference='precomputed') needs ref_chosen_logps and ref_rejected_logps")
        policy = score(self.policy_model)
        chosen_logps, rejected_logps = policy.sequence(self.reduction)
        if self.ref_model is not None:
            with torch.no_grad():
                ref_chosen_logps, ref_rejected_logps = score(self.ref_model).sequence(self.reduction)
        loss, metrics = dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            policy_chosen_nll=policy.chosen_nll() if self.loss_kwargs["rpo_alpha"] else None,
            **self.loss_kwargs,
        )
        self.last_metrics = metrics
        return loss, metrics
