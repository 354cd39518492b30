"""`DPO`, the x-transformers seed contract: `DPO(model, beta, pad_id)`, `policy_model` / `ref_model`, the loss.

Chosen and rejected run through ONE forward per model (`ray_dpo.core.pairs`); the loss is `ray_dpo.core.losses`'
`preference_loss`: TRL's loss types, their weighted combinations and f-divergences, SimPO and ORPO. TR-DPO's reference
update is `mix_into`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ray_dpo.core.kinds import unwrap
from ray_dpo.core.logps import scored_logps
from ray_dpo.core.losses import BatchStats, LossOutput, LossSpec, PairLogps, preference_loss
from ray_dpo.core.names import REFERENCE_MODES
from ray_dpo.core.pairs import (
    PairTokenLogps,
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


def pair_logps(policy: PairTokenLogps, reference: tuple[Tensor, Tensor] | None = None) -> PairLogps:
    """The loss's per-row inputs: summed log-probs and scored-token counts of the policy, the reference's sums."""
    chosen, rejected = policy.sequence("sum")
    return PairLogps(chosen, rejected, *policy.counts(), *(reference or (None, None)))


@torch.no_grad()
def mix_into(pairs: Sequence[tuple[Tensor, Tensor]], alpha: float) -> None:
    """TR-DPO's reference update (Gorbatovski et al. 2024), in place: reference <- alpha * policy + (1 - alpha) *
    reference for each (reference, policy) tensor pair; alpha = 1 is a hard copy. Sharded tensors (FSDP's DTensors)
    are updated shard by shard: both sides are sharded alike, so nothing is gathered."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"dpo.ref_model_mixup_alpha must be in (0, 1], got {alpha}")
    for reference, policy in pairs:
        if isinstance(reference, DTensor) or isinstance(policy, DTensor):
            if not (isinstance(reference, DTensor) and isinstance(policy, DTensor)):
                raise ValueError("mix_into: a sharded tensor pairs with an unsharded one")
            if reference.placements != policy.placements or reference.shape != policy.shape:
                raise ValueError(f"mix_into: shards differ: {reference.placements} vs {policy.placements}")
            reference, policy = reference.to_local(), policy.to_local()
        source = policy.to(reference.dtype)
        if alpha == 1.0:
            reference.copy_(source)
        else:
            reference.mul_(1.0 - alpha).add_(source, alpha=alpha)


def parameter_pairs(reference: nn.Module, policy: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (reference, policy) parameter, through DDP / compile wrappers: the two copies of one architecture.
    Raises if the names or shapes differ, or if the reference shares the policy's weights."""
    ref, pol = dict(unwrap(reference)[0].named_parameters()), dict(unwrap(policy)[0].named_parameters())
    if ref.keys() != pol.keys():
        differ = sorted(ref.keys() ^ pol.keys())[:3]
        raise ValueError(f"the reference and the policy differ in their parameters (e.g. {differ})")
    if any(ref[k] is pol[k] for k in ref):
        raise ValueError("the reference shares the policy's weights (LoRA adapters off?): it cannot be synced")
    if any(ref[k].shape != pol[k].shape for k in ref):
        raise ValueError("the reference and the policy differ in parameter shapes")
    return {k: (ref[k], pol[k]) for k in ref}


class DPO(nn.Module):
    """`DPO(model, beta=0.1, pad_id=None)`: policy = `model`, reference = a frozen deep copy.

    `dpo(preferred_seq, unpreferred_seq, prompt_mask=...)` returns the scalar loss; metrics are in
    `.last_metrics` (or returned with `return_metrics=True`). Chosen and rejected share ONE forward pass.
    `loss_type`: a name or a list of names of `ray_dpo.core.names.LOSS_TYPES` (default "sigmoid", the DPO paper);
    `loss_options`: the other fields of `ray_dpo.core.losses.LossSpec` (`loss_weights`, `label_smoothing`,
    `f_divergence_type`, `f_alpha_divergence_coef`, `discopop_tau`, `simpo_gamma`, `orpo_lambda`, `bco_reward_shift`,
    `sigmoid_label_smoothing`, `reduction`).
    `reference`: "live" (a frozen model: `ref_model`, default a deep copy of `model`), "precomputed" (reference
    log-probs are passed to `forward` / found in the batch; no model held) or "none" (reference-free: an implicit
    uniform reference). Losses that need no reference (sft, simpo, orpo) hold none and score none.
    `prefix_sharing=True` (TransformerLM only): policy and live reference each run ONE packed
    `[prompt, chosen, rejected]` row per pair instead of two sequences; same log-probs, the prompt computed once.
    TR-DPO: `sync_reference(alpha)` moves the live reference towards the policy.
    `pack_len` (TransformerLM, Hugging Face Llama / Qwen2 / Mistral): whole pairs packed into rows of up to that many
    tokens, padding only after a row's last pair (`ray_dpo.core.pairs.pack_rows`); same log-probs.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        beta: float = 0.1,
        pad_id: int | None = None,
        loss_type: str | Sequence[str] = "sigmoid",
        reference: str = "live",
        ref_model: nn.Module | None = None,
        prefix_sharing: bool = False,
        pack_len: int | None = None,
        **loss_options,
    ):
        super().__init__()
        if reference not in REFERENCE_MODES:
            raise ValueError(f"dpo.reference must be one of {REFERENCE_MODES}, got {reference!r}")
        if ref_model is not None and reference != "live":
            raise ValueError(f"a ref_model was given but reference={reference!r}: use reference='live'")
        self.spec = LossSpec(loss_type=loss_type, beta=beta, reference_free=reference == "none", **loss_options)
        if ref_model is not None and not self.spec.needs_reference:
            raise ValueError(f"a ref_model was given but dpo.loss_type={list(self.spec.types)} needs no reference")
        if prefix_sharing:
            check_prefix_sharing(model)
        if pack_len is not None:
            check_prefix_sharing(model, "data.packing")
        self.prefix_sharing, self.pack_len = prefix_sharing, pack_len
        self.policy_model = model
        self.reference = reference if self.spec.needs_reference else "none"
        self.ref_model = None
        if self.reference == "live":
            self.ref_model = (ref_model if ref_model is not None else copy.deepcopy(model)).eval().requires_grad_(False)
        self.beta, self.pad_id = beta, pad_id
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
        policy = score(self.policy_model)  # the policy first: under FSDP its root forward gathers the shared weights
        out = self.loss(pair_logps(policy, self._reference(score, ref_chosen_logps, ref_rejected_logps)))
        return (out.loss, out.metrics) if return_metrics else out.loss

    # --- the pieces a trainer composes: scoring, the reference, the loss (with global-batch statistics) -------------

    def batch_loss(self, batch: Mapping[str, Tensor], stats: BatchStats | None = None) -> tuple[Tensor, dict]:
        """The loss and metrics of a training-worker batch (see `score_batch`), with optional precomputed reference
        log-probs `ref_chosen_logp`, `ref_rejected_logp` (B,). `stats`: this batch's rows of the global batch's
        statistics (`batch_stats(...).rows(...)`); None = the batch is the whole batch."""
        out = self.loss(self.batch_pairs(batch), stats)
        return out.loss, out.metrics

    def batch_pairs(self, batch: Mapping[str, Tensor], reference: tuple[Tensor, Tensor] | None = None) -> PairLogps:
        """The loss's inputs for a training batch: the policy scored (with gradients when enabled), the reference's
        log-probs given, else scored (live), read from the batch (precomputed) or None (not needed)."""
        score = self._batch_scorer(batch)
        policy = score(self.policy_model)  # the policy first: under FSDP its root forward gathers the shared weights
        if reference is None:
            reference = self._reference(score, batch.get("ref_chosen_logp"), batch.get("ref_rejected_logp"))
        return pair_logps(policy, reference)

    def loss(self, pairs: PairLogps, stats: BatchStats | None = None) -> LossOutput:
        out = preference_loss(self.spec, pairs, stats)
        self.last_metrics = out.metrics
        return out

    def sync_reference(self, alpha: float) -> None:
        """TR-DPO: the live reference <- alpha * policy + (1 - alpha) * reference (alpha 1: a copy of the policy)."""
        if self.ref_model is None:
            raise ValueError("sync_reference needs a live reference (reference='live' and a loss that uses it)")
        mix_into(list(parameter_pairs(self.ref_model, self.policy_model).values()), alpha)

    def _batch_scorer(self, batch: Mapping[str, Tensor]):
        """Scores a training batch; with `pack_len` its rows are packed once, for the policy and the live reference."""
        if self.pack_len is not None:
            packed = pack_batch(batch, prefix_sharing=self.prefix_sharing, pack_len=self.pack_len, pad_id=self._pad)
            return functools.partial(score_rows, packed=packed)
        return functools.partial(score_batch, batch=batch, prefix_sharing=self.prefix_sharing, pad_id=self._pad)

    @property
    def _pad(self) -> int:
        return self.pad_id if self.pad_id is not None else 0

    def _reference(self, score, ref_chosen, ref_rejected) -> tuple[Tensor, Tensor] | None:
        """`score(model)` -> PairTokenLogps; the reference's sums, or None when the loss needs no reference."""
        if self.reference == "none":
            return None
        if self.ref_model is not None:
            with torch.no_grad():
                return score(self.ref_model).sequence("sum")
        if ref_chosen is None or ref_rejected is None:
            raise ValueError("DPO(reference='precomputed') needs ref_chosen_logps and ref_rejected_logps")
        return ref_chosen, ref_rejected
