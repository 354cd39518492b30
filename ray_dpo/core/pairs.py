"""Pair scoring: the ONE function the trainer, the reference pass and evaluation use to get the per-token log-probs
of both responses of each pair, concatenated (2B rows), prefix-shared (one packed row per pair), or packed: whole
pairs side by side in rows of up to `pack_len` tokens, padding only after a row's last pair (`pack_rows`).

Token alignment: logits at position t-1 score token t, and target t is scored iff it is a response token (not prompt,
not padding). Works with any module mapping (B, N) tokens to (B, N, V) logits or to an object with `.logits`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ray_dpo.core.attention import PairBlocks, SharedPrefixMask
from ray_dpo.core.kinds import architecture, module_kind
from ray_dpo.core.logps import core_model, scored_logps


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


def reduce_logps(logps: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """Sum (the DPO paper) or mean of masked per-token log-probs over the last dim."""
    total = logps.masked_fill(~mask, 0.0).sum(-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(-1).clamp(min=1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


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


def check_prefix_sharing(model: nn.Module, key: str = "dpo.prefix_sharing") -> None:
    """Packed rows (prefix sharing, `data.packing`) need per-row positions and a mask other than causal."""
    model = core_model(model)  # the scoring wrapper's model
    kind, name = module_kind(model), architecture(model)
    if kind == "ours" or (kind == "hf" and name in PREFIX_SHARING_HF):
        return
    raise TypeError(
        f"{key} needs ray_dpo.core.model.TransformerLM or a Hugging Face "
        f"{' / '.join(PREFIX_SHARING_HF)} (per-row positions and a 4-D attention mask); got {name}. "
        f"Set {key}=false for other models."
    )


def packed_token_logps(model: nn.Module, packed: PackedPairs) -> Tensor:
    """(B, L) log p of each packed token, indexed by the token it scores; 0 where neither mask is True.

    The output at i scores token i + 1, except that the first token of BOTH responses is scored by the output at
    the last prompt token. The head runs only where a token is scored (`ray_dpo.core.logps`).
    """
    tokens, split = packed.tokens, packed.attn_mask.split  # every row's second response starts at split
    source = torch.arange(-1, tokens.shape[1] - 1, device=tokens.device).expand_as(tokens).clone()
    source[:, split] = packed.last_prompt
    scored = packed.chosen_mask | packed.rejected_mask
    return scored_logps(
        model, tokens, tokens, scored, source=source, positions=packed.positions, attn_mask=packed.attn_mask
    )


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
            "dpo.prefix_sharing and data.packing need [shared prompt, response, pad] rows: both response masks one "
            "contiguous run starting right after a prompt that chosen and rejected share"
        )
    return prompt_len, c, r


# --- Packing: whole pairs side by side in rows of up to pack_len tokens ----------------------------------------------
#
# With prefix sharing a pair is one block [prompt, chosen, rejected] (rejected restarts its positions at p and never
# sees chosen); without it, two blocks [prompt, chosen], [prompt, rejected]. Positions restart at 0 for every pair and
# attention never leaves a block (`PairBlocks`), so every token has exactly the context and RoPE phases of its own
# sequence: the log-probs of the batch's pairs, whatever rows they share.


def pair_sizes(prompt_len: np.ndarray, chosen_len: np.ndarray, rejected_len: np.ndarray, prefix_sharing: bool):
    """Tokens one pair takes in a packed row."""
    p, c, r = (np.asarray(x, dtype=np.int64) for x in (prompt_len, chosen_len, rejected_len))
    return p + c + r if prefix_sharing else 2 * p + c + r


def plan_rows(sizes: np.ndarray, pack_len: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(row, column offset) of each pair, the number of rows and their width (the fullest row).

    As few rows as hold the pairs, filled evenly: the largest pair first, into the emptiest row (rows all end near
    the same width, and only that gap is padding); one more row while the fullest would pass `pack_len`."""
    if len(sizes) and sizes.max() > pack_len:
        raise ValueError(f"a pair of {int(sizes.max())} tokens does not fit data.pack_len={pack_len}")
    order = np.argsort(-sizes, kind="stable")
    rows = max(1, -(-int(sizes.sum()) // pack_len))
    while True:
        fill, row, offset = (
            np.zeros(rows, dtype=np.int64),
            np.zeros(len(sizes), np.int64),
            np.zeros(len(sizes), np.int64),
        )
        for i in order:
            row[i] = int(np.argmin(fill))
            offset[i], fill[row[i]] = fill[row[i]], fill[row[i]] + sizes[i]
        if fill.max(initial=0) <= pack_len:
            return row, offset, rows, max(int(fill.max(initial=0)), 1)
        rows += 1


def layout_tokens(batch: Mapping[str, Tensor], *, prefix_sharing: bool, pack_len: int | None) -> tuple[int, int]:
    """(model input positions, pair tokens among them) of the layout `score_batch` runs: concatenated 2B rows of the
    batch's width, prefix-shared rows (`pack_pairs`) or packed rows. The padded fraction is 1 - pair / input."""
    p, c, r = (np.asarray(batch[k].tolist(), dtype=np.int64) for k in ("prompt_len", "chosen_len", "rejected_len"))
    real = int(pair_sizes(p, c, r, prefix_sharing).sum())
    if not len(p):
        return 0, 0
    if pack_len is not None:
        _, _, rows, width = plan_rows(pair_sizes(p, c, r, prefix_sharing), pack_len)
        return rows * width, real
    if prefix_sharing:  # [prompt, longer response | shorter response], split and width shared by the batch
        split, width = int((p + np.maximum(c, r)).max()), int(np.minimum(c, r).max())
        return len(p) * (max(split, 1) + max(width, 1)), real
    return 2 * len(p) * int((p + np.maximum(c, r)).max()), real


@dataclass
class PackedRows:
    tokens: Tensor  # (R, L): pairs one after another, each whole in one row; pad_id after a row's last pair
    positions: Tensor  # (R, L): 0 at every pair's (and without prefix sharing, every sequence's) first token
    attn_mask: PairBlocks  # a token sees its own block only
    source: Tensor  # (R, L): the output position that scores each token
    scored: Tensor  # (R, L) bool: response tokens (never a sequence's token 0, as the concatenated path)
    chosen_index: Tensor  # (B, C): flat positions in R * L of pair b's scored chosen tokens
    chosen_mask: Tensor  # (B, C) bool
    rejected_index: Tensor  # (B, C')
    rejected_mask: Tensor  # (B, C') bool
    pair_tokens: int  # tokens of the pairs; the other R * L - pair_tokens are padding


def _spans(dest: np.ndarray, src: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat (destination, source, index within the span) of spans [dest, dest + length) <- [src, src + length)."""
    within = np.arange(int(length.sum()), dtype=np.int64) - np.repeat(np.cumsum(length) - length, length)
    return np.repeat(dest, length) + within, np.repeat(src, length) + within, within


def pack_rows(
    chosen: Tensor,
    rejected: Tensor,
    prompt_len: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    *,
    prefix_sharing: bool,
    pack_len: int,
    pad_id: int = 0,
) -> PackedRows:
    """Pack right-padded `[prompt, response, pad...]` pairs (B, N) (response lengths excluding the prompt) into rows
    of up to `pack_len` tokens. The layout is planned on the host from the lengths (one sync)."""
    batch, n = chosen.shape
    device = chosen.device
    p, c, r = (np.asarray(x.tolist(), dtype=np.int64) for x in (prompt_len, chosen_len, rejected_len))
    row, offset, rows, width = plan_rows(pair_sizes(p, c, r, prefix_sharing), pack_len)
    base, b = row * width + offset, np.arange(batch, dtype=np.int64)
    chosen_at, rejected_at = b * n, (batch + b) * n  # rows of cat(chosen, rejected).flatten()
    # the spans of each pair: (where in the packed rows, where in the batch, length, first position, response kind)
    if prefix_sharing:
        spans = [
            (base, chosen_at, p, 0, 0),
            (base + p, chosen_at + p, c, p, 1),
            (base + p + c, rejected_at + p, r, p, 2),
        ]
        first = {"chosen": base + p, "rejected": base + p + c}  # each response's first packed column
        blocks = [(row, offset, offset + p, offset + p + c, offset + p + c + r)]
        block_of = [b, b, b]
    else:
        spans = [(base, chosen_at, p + c, 0, 0), (base + p + c, rejected_at, p + r, 0, 0)]
        first = {"chosen": base + p, "rejected": base + 2 * p + c}
        end = offset + p + c
        blocks = [(row, offset, offset, end, end), (row, end, end, end + p + r, end + p + r)]
        block_of = [2 * b, 2 * b + 1]
    slots = rows * width
    gather = np.full(slots, -1, dtype=np.int64)
    positions, response = np.zeros(slots, dtype=np.int64), np.zeros(slots, dtype=np.int8)
    block_ids = np.full(slots, -1, dtype=np.int64)
    for dest, src, length, position, kind in spans:
        to, frm, within = _spans(dest, src, length)
        gather[to], response[to] = frm, kind
        positions[to] = np.repeat(np.broadcast_to(position, length.shape), length) + within
    for (dest, _, length, _, _), ids in zip(spans, block_of, strict=True):
        block_ids[_spans(dest, dest, length)[0]] = np.repeat(ids, length)
    source = np.arange(slots, dtype=np.int64) % width - 1  # the column before a token scores it ...
    index = {}
    for side, length in (("chosen", c), ("rejected", r)):
        j = np.arange(max(int(length.max(initial=0)), 1), dtype=np.int64)
        at = first[side][:, None] + j
        mask = (j < length[:, None]) & (p[:, None] + j >= 1)  # token 0 of a sequence is never scored
        index[side] = (np.where(mask, at, 0), mask)
    if prefix_sharing:  # ... except the rejected response's first token: scored by the prompt's last
        has = (r > 0) & (p > 0)
        source[first["rejected"][has]] = offset[has] + p[has] - 1
    scored = np.zeros(slots, dtype=bool)
    for at, mask in index.values():
        scored[at[mask]] = True
    in_order = sorted(tuple(int(x[k]) for x in block) for block in blocks for k in range(batch))  # by row, column
    as_tensor = lambda x: torch.from_numpy(x).to(device)
    flat = torch.cat((chosen, rejected)).flatten()
    gather_t = as_tensor(gather)
    tokens = torch.where(gather_t >= 0, flat[gather_t.clamp(min=0)], pad_id).view(rows, width)
    return PackedRows(
        tokens=tokens,
        positions=as_tensor(positions).view(rows, width),
        attn_mask=PairBlocks(
            tuple(in_order), as_tensor(block_ids).view(rows, width), as_tensor(response).view(rows, width)
        ),
        source=as_tensor(source.clip(min=0)).view(rows, width),
        scored=as_tensor(scored).view(rows, width),
        chosen_index=as_tensor(index["chosen"][0]),
        chosen_mask=as_tensor(index["chosen"][1]),
        rejected_index=as_tensor(index["rejected"][0]),
        rejected_mask=as_tensor(index["rejected"][1]),
        pair_tokens=int(pair_sizes(p, c, r, prefix_sharing).sum()),
    )


def score_rows(model: nn.Module, packed: PackedRows) -> PairTokenLogps:
    """Per-token log-probs of every pair's responses from ONE forward over the packed rows."""
    token_lp = scored_logps(
        model,
        packed.tokens,
        packed.tokens,
        packed.scored,
        source=packed.source,
        positions=packed.positions,
        attn_mask=packed.attn_mask,
    ).flatten()
    return PairTokenLogps(
        token_lp[packed.chosen_index], packed.chosen_mask, token_lp[packed.rejected_index], packed.rejected_mask
    )


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

    def counts(self) -> tuple[Tensor, Tensor]:
        """(B,), (B,) scored tokens of each chosen and rejected response."""
        return self.chosen_mask.sum(-1), self.rejected_mask.sum(-1)


def scored_counts(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The `counts()` `score_batch` would give for a training batch, from its lengths alone (no forward): the first
    token of a row is never scored, as in the scoring itself."""
    n, prompt_len = batch["chosen"].shape[1], batch["prompt_len"]
    return tuple(
        response_mask_from_lengths(n, prompt_len, batch[k].to(prompt_len.device))[:, 1:].sum(-1)
        for k in ("chosen_len", "rejected_len")
    )


def score_pairs(
    model: nn.Module,
    chosen: Tensor,
    rejected: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    prefix_sharing: bool = False,
    pad_id: int = 0,
    pack_len: int | None = None,
) -> PairTokenLogps:
    """Per-token log-probs of both responses of each pair under `model`, in ONE forward pass.

    `chosen`, `rejected` (B, N) with response masks (B, N) (True on scored tokens). Concatenated: the 2B sequences
    run as one batch. `prefix_sharing`: one packed `[prompt, chosen | rejected]` row per pair; `pack_len`: whole
    pairs packed into rows of up to that many tokens (`pack_rows`). Both need masks that are one contiguous run
    after a shared prompt (`lengths_from_masks`).
    """
    if prefix_sharing or pack_len is not None:
        lengths = lengths_from_masks(chosen, rejected, chosen_mask, rejected_mask)
        batch = dict(chosen=chosen, rejected=rejected, prompt_len=lengths[0], chosen_len=lengths[1])
        batch["rejected_len"] = lengths[2]
        return score_batch(model, batch, prefix_sharing=prefix_sharing, pad_id=pad_id, pack_len=pack_len)
    batch = chosen.shape[0]
    seqs = torch.cat((chosen, rejected))
    scored = torch.cat((chosen_mask, rejected_mask))[:, 1:].bool()
    token_lp = scored_logps(model, seqs[:, :-1], seqs[:, 1:], scored)  # the head only where a token is scored
    return PairTokenLogps(token_lp[:batch], scored[:batch], token_lp[batch:], scored[batch:])


def pack_batch(batch: Mapping[str, Tensor], *, prefix_sharing: bool, pack_len: int, pad_id: int = 0) -> PackedRows:
    """`pack_rows` of a training batch."""
    lengths = (batch[k] for k in ("prompt_len", "chosen_len", "rejected_len"))
    return pack_rows(
        batch["chosen"], batch["rejected"], *lengths, prefix_sharing=prefix_sharing, pack_len=pack_len, pad_id=pad_id
    )


def score_batch(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    prefix_sharing: bool = False,
    pad_id: int = 0,
    pack_len: int | None = None,
) -> PairTokenLogps:
    """`score_pairs` on a training batch: `chosen`, `rejected` (B, N) right-padded `[prompt, response, pad]`,
    `prompt_len`, `chosen_len`, `rejected_len` (B,) (response lengths, prompt excluded)."""
    if pack_len is not None:
        check_prefix_sharing(model, "data.packing")
        return score_rows(model, pack_batch(batch, prefix_sharing=prefix_sharing, pack_len=pack_len, pad_id=pad_id))
    chosen, rejected = batch["chosen"], batch["rejected"]
    prompt_len, chosen_len, rejected_len = (
        batch[k].to(chosen.device) for k in ("prompt_len", "chosen_len", "rejected_len")
    )
    if prefix_sharing:  # pack straight from the lengths: no masks to check
        return _score_packed(model, chosen, rejected, prompt_len, chosen_len, rejected_len, pad_id)
    n = chosen.shape[1]
    chosen_mask = response_mask_from_lengths(n, prompt_len, chosen_len)
    rejected_mask = response_mask_from_lengths(n, prompt_len, rejected_len)
    return score_pairs(model, chosen, rejected, chosen_mask, rejected_mask, pad_id=pad_id)


def _score_packed(model, chosen, rejected, prompt_len, chosen_len, rejected_len, pad_id: int) -> PairTokenLogps:
    check_prefix_sharing(model)
    packed = pack_pairs(chosen, rejected, prompt_len, chosen_len, rejected_len, pad_id)
    token_lp = packed_token_logps(model, packed)
    return PairTokenLogps(token_lp, packed.chosen_mask, token_lp, packed.rejected_mask)
