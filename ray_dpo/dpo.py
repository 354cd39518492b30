"""Per-token log-probs, the DPO loss family, and `DPO`, the x-transformers seed contract.

Token alignment: logits at position t-1 score token t, and target t is scored iff it is a response token
(not prompt, not padding). Works with any module mapping (B, N) tokens to (B, N, V) logits, or to an
object with `.logits` (Hugging Face causal LMs).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .logps import core_model, scored_logps
from .model import SharedPrefixMask, TransformerLM

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "sppo_hard", "nca_pair")


def model_logits(model: nn.Module, tokens: Tensor) -> Tensor:
    output = model(tokens)
    return getattr(output, "logits", output)


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) for each position: `(..., V), (...) -> (...)`, computed in at least fp32.

    Gathers the target logit and subtracts logsumexp, so no second (..., V) log-softmax tensor is kept.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return target_logits - logits.logsumexp(dim=-1)


def response_mask(
    seq: Tensor, prompt_mask: Tensor, seq_mask: Tensor | None = None, pad_id: int | None = None
) -> Tensor:
    """True on tokens that are scored: not prompt, and not padding (from `seq_mask`, else `pad_id`)."""
    mask = ~prompt_mask.bool()
    if seq_mask is not None:
        mask = mask & seq_mask.bool()
    elif pad_id is not None:
        mask = mask & (seq != pad_id)
    return mask


def response_mask_from_lengths(seq_len: int, prompt_len: Tensor, response_len: Tensor) -> Tensor:
    """Response mask for right-padded `[prompt, response, pad...]` rows (the training batch contract)."""
    positions = torch.arange(seq_len, device=prompt_len.device)
    start = prompt_len.unsqueeze(-1)
    return (positions >= start) & (positions < start + response_len.unsqueeze(-1))


def default_reduction(loss_type: str, reduction: str | None = None) -> str:
    """Sequence log-prob reduction: the given one, else "mean" for IPO (as TRL) and "sum" (the DPO paper) otherwise.
    The one place this rule lives: a precomputed reference must be reduced exactly as the policy is in training."""
    return reduction or ("mean" if loss_type == "ipo" else "sum")


def reduce_logps(logps: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """Sum (the DPO paper) or mean of masked per-token log-probs over the last dim."""
    total = logps.masked_fill(~mask, 0.0).sum(-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(-1).clamp(min=1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def sequence_logps(model: nn.Module, seq: Tensor, response_mask: Tensor, reduction: str = "sum") -> Tensor:
    """Log-prob of the masked tokens of each row of `seq` (B, N) under `model`: (B,)."""
    scored = response_mask[:, 1:].bool()
    return reduce_logps(scored_logps(model, seq[:, :-1], seq[:, 1:], scored), scored, reduction)


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


# --- Prefix sharing: one forward scores both responses of a pair ---------------------------------------------------
#
# Row b is packed as [prompt (p), chosen response (c), rejected response (r), pad...]. Rejected queries may not see
# chosen keys, and rejected positions restart at p, so every token sees exactly the context (and RoPE phases) it has in
# its own concatenated sequence: log-probs equal the two-sequence path, and the prompt is run once instead of twice.


@dataclass
class PackedPairs:
    tokens: Tensor  # (B, split + W) int64: [prompt, longer response, pad... | shorter response, pad...]
    positions: Tensor  # (B, split + W) RoPE positions: both responses continue from the prompt's end
    attn_mask: SharedPrefixMask  # the second response sees the prompt and itself, never the first response
    chosen_mask: Tensor  # (B, split + W) True on scored chosen-response tokens
    rejected_mask: Tensor  # (B, split + W) True on scored rejected-response tokens
    last_prompt: Tensor  # (B,) packed index of the last prompt token (p - 1, clamped to 0)


def pack_pairs(
    chosen: Tensor, rejected: Tensor, prompt_len: Tensor, chosen_len: Tensor, rejected_len: Tensor, pad_id: int = 0
) -> PackedPairs:
    """Pack right-padded `[prompt, response, pad...]` pairs (B, N), response lengths EXCLUDING the prompt.

    Every row's second response starts at the same column, split, so attention splits into two dense blocks
    (`model.SharedPrefixMask`). Each row puts its longer response first: split + W then stays close to the
    tightest packing, max(p + c + r). Vectorised; one host sync (the widths) per batch.
    """
    batch, n = chosen.shape
    p, c, r = (x.to(chosen.device, torch.long) for x in (prompt_len, chosen_len, rejected_len))
    swap = r > c  # rows whose rejected response goes first
    first_len, second_len = torch.maximum(c, r), torch.minimum(c, r)
    first_rows, second_rows = torch.where(swap[:, None], rejected, chosen), torch.where(swap[:, None], chosen, rejected)
    split, width, prompt_keys = torch.stack(((p + first_len).max(), second_len.max(), p.max())).tolist()
    if split > n:
        raise ValueError(f"prompt_len + response_len reaches {split} > sequence length {n}")
    split, width = max(split, 1), max(width, 1)  # every block needs at least one query
    j, i = torch.arange(split, device=chosen.device), torch.arange(width, device=chosen.device)
    p_ = p[:, None]
    in_first, in_second = j < p_ + first_len[:, None], i < second_len[:, None]
    first = torch.where(in_first, first_rows.gather(1, j.clamp(max=n - 1).expand(batch, split)), pad_id)
    second = torch.where(in_second, second_rows.gather(1, (p_ + i).clamp(max=n - 1)), pad_id)
    causal = i[:, None] >= i[None, :]  # second-block pads sit after its real tokens: causality hides them
    sees_prompt = torch.arange(prompt_keys, device=chosen.device) < p_  # (B, prompt_keys): shorter prompts' rows
    second_mask = torch.cat((sees_prompt[:, None, :].expand(-1, width, -1), causal.expand(batch, -1, -1)), dim=-1)
    # scored tokens; the concatenated path never scores token 0 of a row, so neither does the packed one
    first_scored = torch.cat((in_first & (j >= p_) & (j >= 1), torch.zeros_like(in_second)), dim=1)
    second_scored = torch.cat((torch.zeros_like(in_first), in_second & (p_ + i >= 1)), dim=1)
    return PackedPairs(
        tokens=torch.cat((first, second), dim=1),
        positions=torch.cat((j.expand(batch, split), p_ + i), dim=1),
        attn_mask=SharedPrefixMask(split, prompt_keys, second_mask.unsqueeze(1)),
        chosen_mask=torch.where(swap[:, None], second_scored, first_scored),
        rejected_mask=torch.where(swap[:, None], first_scored, second_scored),
        last_prompt=(p - 1).clamp(min=0),
    )


PREFIX_SHARING_HF = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")  # 4-D masks + position ids


def _check_prefix_sharing(model: nn.Module) -> None:
    inner = core_model(model)
    inner = inner.get_base_model() if callable(getattr(inner, "get_base_model", None)) else inner  # PEFT
    if isinstance(inner, TransformerLM) or type(inner).__name__ in PREFIX_SHARING_HF:
        return
    raise TypeError(
        "dpo.prefix_sharing needs ray_dpo.model.TransformerLM or a Hugging Face "
        f"{' / '.join(PREFIX_SHARING_HF)} (per-row positions and a 4-D attention mask); got {type(inner).__name__}. "
        "Set dpo.prefix_sharing=false for other models."
    )


def packed_token_logps(model: nn.Module, packed: PackedPairs) -> Tensor:
    """(B, L) log p of each packed token, indexed by the token it scores; 0 where neither mask is True.

    The output at i scores token i + 1, except that the first token of BOTH responses is scored by the output at
    the last prompt token. The head runs only where a token is scored (`ray_dpo.logps`).
    """
    tokens, split = packed.tokens, packed.attn_mask.split  # every row's second response starts at split
    source = torch.arange(-1, tokens.shape[1] - 1, device=tokens.device).expand_as(tokens).clone()
    source[:, split] = packed.last_prompt
    scored = packed.chosen_mask | packed.rejected_mask
    return scored_logps(
        model, tokens, tokens, scored, source=source, positions=packed.positions, attn_mask=packed.attn_mask
    )


def prefix_shared_logps(
    model: nn.Module,
    chosen: Tensor,
    rejected: Tensor,
    prompt_len: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    *,
    reduction: str = "sum",
    pad_id: int = 0,
) -> tuple[Tensor, Tensor]:
    """Sequence log-probs (B,), (B,) of chosen and rejected responses from ONE packed forward of `model`."""
    _check_prefix_sharing(model)
    packed = pack_pairs(chosen, rejected, prompt_len, chosen_len, rejected_len, pad_id)
    logps = packed_token_logps(model, packed)
    return reduce_logps(logps, packed.chosen_mask, reduction), reduce_logps(logps, packed.rejected_mask, reduction)


def lengths_from_masks(
    chosen: Tensor, rejected: Tensor, chosen_mask: Tensor, rejected_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(prompt_len, chosen_len, rejected_len) from response masks of the `[prompt, response, pad]` form.

    Raises if the masks are not one contiguous run starting at a prompt both rows share: packing would silently
    score different tokens than the masks ask for.
    """
    n = chosen.shape[1]
    chosen_mask, rejected_mask = chosen_mask.bool(), rejected_mask.bool()
    c, r = chosen_mask.sum(-1), rejected_mask.sum(-1)
    start_c = torch.where(c > 0, chosen_mask.int().argmax(-1), n)
    start_r = torch.where(r > 0, rejected_mask.int().argmax(-1), n)
    prompt_len = torch.minimum(start_c, start_r)
    prompt_len = torch.where(prompt_len == n, 0, prompt_len)  # both responses empty: nothing is scored anyway
    j = torch.arange(n, device=chosen.device)
    same_prompt = ((chosen == rejected) | (j >= prompt_len[:, None])).all()
    contiguous = (chosen_mask == response_mask_from_lengths(n, prompt_len, c)).all() & (
        rejected_mask == response_mask_from_lengths(n, prompt_len, r)
    ).all()
    starts_ok = ((c == 0) | (start_c == prompt_len)).all() & ((r == 0) | (start_r == prompt_len)).all()
    if not bool(same_prompt & contiguous & starts_ok):
        raise ValueError(
            "dpo.prefix_sharing needs [shared prompt, response, pad] rows: both response masks one contiguous run "
            "starting right after a prompt that chosen and rejected share"
        )
    return prompt_len, c, r


# --- Pair scoring: the one function the trainer, the reference pass and evaluation use --------------------------


@dataclass
class PairTokenLogps:
    """Per-token log-probs of a batch of pairs and the masks of the scored response tokens (True = scored)."""

    chosen: Tensor
    chosen_mask: Tensor
    rejected: Tensor
    rejected_mask: Tensor

    def sequence(self, reduction: str) -> tuple[Tensor, Tensor]:
        """(B,), (B,) sequence log-probs of the chosen and rejected responses."""
        return reduce_logps(self.chosen, self.chosen_mask, reduction), reduce_logps(
            self.rejected, self.rejected_mask, reduction
        )

    def chosen_nll(self) -> Tensor:
        """Mean NLL over all chosen response tokens of the batch (RPO's term, as TRL)."""
        return -self.chosen[self.chosen_mask].sum() / self.chosen_mask.sum().clamp(min=1)


def score_pairs(
    model: nn.Module,
    chosen: Tensor,
    rejected: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    prefix_sharing: bool = False,
    pad_id: int = 0,
) -> PairTokenLogps:
    """Per-token log-probs of both responses of each pair under `model`, in ONE forward pass.

    `chosen`, `rejected` (B, N) with response masks (B, N) (True on scored tokens). Concatenated: the 2B sequences
    run as one batch. `prefix_sharing`: one packed `[prompt, chosen | rejected]` row per pair (masks must then be
    one contiguous run after a shared prompt, see `lengths_from_masks`).
    """
    if prefix_sharing:
        _check_prefix_sharing(model)
        lengths = lengths_from_masks(chosen, rejected, chosen_mask, rejected_mask)
        packed = pack_pairs(chosen, rejected, *lengths, pad_id)
        token_lp = packed_token_logps(model, packed)
        return PairTokenLogps(token_lp, packed.chosen_mask, token_lp, packed.rejected_mask)
    batch = chosen.shape[0]
    seqs = torch.cat((chosen, rejected))
    scored = torch.cat((chosen_mask, rejected_mask))[:, 1:].bool()
    token_lp = scored_logps(model, seqs[:, :-1], seqs[:, 1:], scored)  # the head only where a token is scored
    return PairTokenLogps(token_lp[:batch], scored[:batch], token_lp[batch:], scored[batch:])


def score_batch(
    model: nn.Module, batch: Mapping[str, Tensor], *, prefix_sharing: bool = False, pad_id: int = 0
) -> PairTokenLogps:
    """`score_pairs` on a training batch: `chosen`, `rejected` (B, N) right-padded `[prompt, response, pad]`,
    `prompt_len`, `chosen_len`, `rejected_len` (B,) (response lengths, prompt excluded)."""
    chosen, rejected = batch["chosen"], batch["rejected"]
    prompt_len, chosen_len, rejected_len = (
        batch[k].to(chosen.device) for k in ("prompt_len", "chosen_len", "rejected_len")
    )
    if prefix_sharing:  # pack straight from the lengths: no masks to check
        _check_prefix_sharing(model)
        packed = pack_pairs(chosen, rejected, prompt_len, chosen_len, rejected_len, pad_id)
        token_lp = packed_token_logps(model, packed)
        return PairTokenLogps(token_lp, packed.chosen_mask, token_lp, packed.rejected_mask)
    n = chosen.shape[1]
    chosen_mask = response_mask_from_lengths(n, prompt_len, chosen_len)
    rejected_mask = response_mask_from_lengths(n, prompt_len, rejected_len)
    return score_pairs(model, chosen, rejected, chosen_mask, rejected_mask, pad_id=pad_id)


REFERENCE_MODES = ("live", "precomputed", "none")


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
    ):
        super().__init__()
        if reference not in REFERENCE_MODES:
            raise ValueError(f"dpo.reference must be one of {REFERENCE_MODES}, got {reference!r}")
        if ref_model is not None and reference != "live":
            raise ValueError(f"a ref_model was given but reference={reference!r}: use reference='live'")
        if prefix_sharing:
            _check_prefix_sharing(model)
        self.prefix_sharing = prefix_sharing
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
        )
        loss, metrics = self._loss(score, ref_chosen_logps, ref_rejected_logps)
        return (loss, metrics) if return_metrics else loss

    def batch_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """DPO loss from a training-worker batch (see `score_batch`), with optional precomputed reference
        log-probs `ref_chosen_logp`, `ref_rejected_logp` (B,). Uses the packed path when `prefix_sharing` is on."""
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
