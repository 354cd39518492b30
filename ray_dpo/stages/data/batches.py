"""Training batches: token rows -> the padded tensors a training worker consumes (the batch contract of
docs/ARCHITECTURE.md)."""

from __future__ import annotations

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn


def _lengths(rows) -> np.ndarray:
    return np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))


def _pad_concat(parts: list, width: int | None, pad_id: int) -> tuple[torch.Tensor, np.ndarray]:
    """Rows = concatenation of each part's row; right-padded with `pad_id` to `width` (default: the longest)."""
    lengths = np.sum([_lengths(p) for p in parts], axis=0)
    width = int(lengths.max(initial=0)) if width is None else width
    padded = np.full((len(lengths), width), pad_id, dtype=np.int64)
    filled = np.arange(width) < lengths[:, None]
    rows = [np.asarray(p[i]) for i in range(len(lengths)) for p in parts]  # row-major: part order within a row
    padded[filled] = np.concatenate(rows) if rows else []
    return torch.from_numpy(padded), lengths


def collate_preferences(batch: dict[str, np.ndarray], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Numpy batch from `iter_torch_batches` -> the training batch contract (docs/ARCHITECTURE.md).

    `chosen` and `rejected` are [prompt, response] right-padded with `pad_id` to ONE width, the longest row of
    THIS batch (both need the same shape for a shared forward pass), not to max_len; `prompt_len`, `chosen_len`,
    `rejected_len` (responses, prompt excluded) int64; reference log-probs (when present) float32.
    """
    prompt_len = _lengths(batch["prompt"])
    longest = np.maximum(_lengths(batch["chosen"]), _lengths(batch["rejected"]))
    width = int((prompt_len + longest).max(initial=0))
    out: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        out[side], lengths = _pad_concat([batch["prompt"], batch[side]], width, pad_id)
        out[f"{side}_len"] = torch.from_numpy(lengths - prompt_len)
    out["prompt_len"] = torch.from_numpy(prompt_len)
    for name in ("ref_chosen_logp", "ref_rejected_logp"):
        if name in batch:
            # torch.tensor copies: Ray's numpy views are read-only and torch warns on those.
            out[name] = torch.tensor(np.asarray(batch[name]), dtype=torch.float32)
    return out


def collate_sft(batch: dict[str, np.ndarray], *, pad_id: int) -> dict[str, torch.Tensor]:
    """SFT rows -> `tokens` ([prompt, response] right-padded to the batch's longest), `prompt_len`, `response_len`."""
    tokens, lengths = _pad_concat([batch["prompt"], batch["response"]], None, pad_id)
    prompt_len = _lengths(batch["prompt"])
    return {
        "tokens": tokens,
        "prompt_len": torch.from_numpy(prompt_len),
        "response_len": torch.from_numpy(lengths - prompt_len),
    }


class PreferenceCollateFn(NumpyBatchCollateFn):
    """`collate_preferences` as the callable class Ray >= 2.47 prefers for `iter_torch_batches(collate_fn=...)`
    (passing a plain function still works but warns that it is deprecated)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate_preferences(batch, pad_id=self.pad_id)


class SFTCollateFn(NumpyBatchCollateFn):
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate_sft(batch, pad_id=self.pad_id)
