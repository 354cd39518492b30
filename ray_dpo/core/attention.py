"""Attention dispatch and masks: SDPA, or on CPU in bf16 the matmul path (`kernels.tiled_attention`), the mask of
packed prefix-sharing rows (`SharedPrefixMask`) and of rows packed with whole pairs (`PairBlocks`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ray_dpo.core.kernels import CAUSAL_SPLIT_MIN, AttentionTile, additive_mask, causal_tiles, tiled_attention

MATMUL_ATTENTION_MAX_KEYS = 1024  # CPU bf16: the matmul path wins up to here (benchmarks/attention.py)


@dataclass
class SharedPrefixMask:
    """Attention of packed `[prompt, response, pad | other response, pad]` rows (`dpo.pack_pairs`).

    Columns before `split` (prompt + first response) attend causally among themselves. Queries from `split` on
    (the second response) attend to the first `prompt_keys` columns and to their own block, as `second_mask` says:
    the first response's keys are never multiplied, so the shared prompt costs what it costs once.
    """

    split: int
    prompt_keys: int
    second_mask: Tensor  # (B, 1, columns after split, prompt_keys + columns after split) bool, True = may attend
    # `second_mask` as the bf16 matmul path's additive bias, built with the mask, outside any compiled graph:
    # compiled, a bias that is a graph input runs forward + backward 1.2x faster than one the graph builds, which
    # Inductor fuses into a slower softmax
    second_bias_bf16: Tensor = field(init=False, repr=False, compare=False)
    _biases: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.second_bias_bf16 = additive_mask(self.second_mask, torch.bfloat16)

    def second_bias(self, heads: int) -> Tensor:
        """The matmul path's (bf16, `uses_matmul_attention`) additive bias: compiled, `second_bias_bf16`, (B, 1, ...);
        eager, (B, heads, ...) for `baddbmm`, built once per batch for every layer of the policy and the reference."""
        if torch.compiler.is_compiling():
            return self.second_bias_bf16
        if heads not in self._biases:
            self._biases[heads] = self.second_bias_bf16.expand(-1, heads, -1, -1).contiguous()
        return self._biases[heads]

    def tiles(self, heads: int) -> list[AttentionTile]:
        """This attention as `tiled_attention` tiles: the first block causal (`causal_tiles`); the second block's
        queries over [prompt keys, their own keys], in two halves once it has CAUSAL_SPLIT_MIN rows (the top half
        never sees the bottom half's keys)."""
        width, prompt, split = self.second_mask.shape[-2], self.prompt_keys, self.split
        bias = self.second_bias(heads).flatten(0, 1)
        halves = ((0, width // 2), (width // 2, width)) if width >= CAUSAL_SPLIT_MIN else ((0, width),)
        second = [
            AttentionTile(split + a, split + b, ((0, prompt), (split, split + b)), bias[:, a:b, : prompt + b])
            for a, b in halves
        ]
        return causal_tiles(split, bias.dtype, bias.device) + second

    def dense(self) -> Tensor:
        """The same attention as one (B, 1, L, L) bool mask (True = may attend): for models that take a 4-D mask
        (Hugging Face Llama, Qwen2, Mistral) instead of the two dense blocks."""
        batch, _, width, _ = self.second_mask.shape
        length = self.split + width
        mask = torch.zeros(batch, 1, length, length, dtype=torch.bool, device=self.second_mask.device)
        mask[..., : self.split, : self.split] = torch.ones(self.split, self.split, dtype=torch.bool).tril()
        mask[..., self.split :, : self.prompt_keys] = self.second_mask[..., : self.prompt_keys]
        mask[..., self.split :, self.split :] = self.second_mask[..., self.prompt_keys :]
        return mask


PAIR_GROUP_MAX = 128  # blocks shorter than this share one tile with their neighbours: fewer, larger matmuls
# Rows packed with pairs on CUDA: "sdpa" (the dense (R, 1, L, L) mask; every (query, key) pair of a row is computed)
# or "flex" (FlexAttention over a block mask: key blocks without a key of the query's pair are skipped).
# benchmarks/gpu.py times both ("packed rows, SDPA" / "packed rows, FlexAttention"): set the faster.
PACKED_CUDA_ATTENTION = "sdpa"


@functools.lru_cache(maxsize=256)
def _second_response_bias(prompt: int, a: int, b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Queries a..b of a second response over [its prompt's keys, its own keys 0..b]: the prompt whole, itself
    causally."""
    own = torch.ones(b - a, b, dtype=torch.bool).tril(a)
    return additive_mask(torch.cat((torch.ones(b - a, prompt, dtype=torch.bool), own), 1).to(device), dtype)


def _allowed(block_ids: Tensor, response: Tensor) -> Tensor:
    """(..., n) columns -> (..., n, n) bool, True = may attend: causal inside a block, a second response never over
    the first, and a padding query over itself only (no query without a key: softmax of nothing is NaN)."""
    j = torch.arange(block_ids.shape[-1], device=block_ids.device)
    same = (block_ids[..., :, None] == block_ids[..., None, :]) & (j[:, None] >= j[None, :])
    unseen = (response[..., :, None] == 2) & (response[..., None, :] == 1)
    return (same & ~unseen) | (j[:, None] == j[None, :])


@dataclass
class PairBlocks:
    """Attention of rows packed with whole pairs (`pairs.pack_rows`): a query sees keys of its own block only.

    A block is one pair (prefix sharing: `[prompt, first response, second response]`, the second response seeing the
    prompt and itself, never the first) or one `[prompt, response]` sequence; inside it, causal. Every column of a
    row belongs to a block or is padding after the row's last block.
    """

    # (row, start, prompt_end, second, end) per block, in row and column order: columns [start, second) causal;
    # [second, end) over [start, prompt_end) and themselves, causally (second == end: no second response)
    blocks: tuple[tuple[int, int, int, int, int], ...]
    block_ids: Tensor  # (R, L) int64: the block of each column, -1 on padding
    response: Tensor  # (R, L) int8: 1 on a prefix-shared pair's first response, 2 on its second, 0 elsewhere
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def dense(self) -> Tensor:
        """The same attention as one (R, 1, L, L) bool mask (True = may attend): SDPA on GPU or compiled, and the
        4-D mask of Hugging Face models. Built from tensors, so a compiled graph takes it with dynamic shapes."""
        if torch.compiler.is_compiling():
            return _allowed(self.block_ids, self.response)[:, None]
        if "dense" not in self._cache:
            self._cache["dense"] = _allowed(self.block_ids, self.response)[:, None]
        return self._cache["dense"]

    def block_mask(self):
        """This attention as FlexAttention's `BlockMask` (built once per batch): blocks of 128 x 128 (query, key)
        positions that hold no key a query may see are never computed."""
        if "block_mask" not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            ids, response = self.block_ids, self.response

            def mask_mod(b, h, q, k):
                same = (ids[b, q] == ids[b, k]) & (k <= q) & ~((response[b, q] == 2) & (response[b, k] == 1))
                return same | (q == k)

            rows, length = ids.shape
            self._cache["block_mask"] = create_block_mask(mask_mod, rows, None, length, length, device=ids.device)
        return self._cache["block_mask"]

    def tiles(self, dtype: torch.dtype, device: torch.device) -> list[AttentionTile]:
        """This attention as `tiled_attention` tiles of one batch row each, built once per batch (every layer of the
        policy and the reference reuses them). A block of PAIR_GROUP_MAX columns or more gets its own tiles (causal
        tiles, and the second response over [prompt keys, its own keys], in halves once long): the keys of other
        blocks and of the first response are never multiplied. Shorter neighbouring blocks share one tile."""
        key = (dtype, device)
        if key not in self._cache:
            tiles, group = [], []
            for block in (*self.blocks, None):  # None: flush the last group
                if group and (block is None or block[0] != group[0][0] or block[4] - group[0][1] > PAIR_GROUP_MAX):
                    tiles.append(self._group_tile(group, dtype))
                    group = []
                if block is not None and block[4] - block[1] >= PAIR_GROUP_MAX:
                    tiles += _block_tiles(*block, dtype, device)
                elif block is not None:
                    group.append(block)
            self._cache[key] = tiles
        return self._cache[key]

    def _group_tile(self, group: list, dtype: torch.dtype) -> AttentionTile:
        row, start, end = group[0][0], group[0][1], group[-1][4]
        bias = additive_mask(_allowed(self.block_ids[row, start:end], self.response[row, start:end]), dtype)
        return AttentionTile(start, end, ((start, end),), bias, row)


def _block_tiles(row, start, prompt_end, second, end, dtype, device) -> list[AttentionTile]:
    tiles = [
        AttentionTile(start + t.start, start + t.end, ((start, start + t.end),), t.bias, row)
        for t in causal_tiles(second - start, dtype, device)
    ]
    width, prompt = end - second, prompt_end - start
    halves = ((0, width // 2), (width // 2, width)) if width >= CAUSAL_SPLIT_MIN else ((0, width),)
    for a, b in halves if width else ():
        keys = ((start, prompt_end), (second, second + b)) if prompt else ((second, second + b),)
        bias = _second_response_bias(prompt, a, b, dtype, device)
        tiles.append(AttentionTile(second + a, second + b, keys, bias, row))
    return tiles


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=True)  # FlexAttention is fast only compiled; one graph for every row width


def flex_attention(q: Tensor, k: Tensor, v: Tensor, *, block_mask) -> Tensor:
    """FlexAttention (compiled on CUDA; eager elsewhere: PyTorch's reference implementation, for checking)."""
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask)
    from torch.nn.attention.flex_attention import flex_attention as flex

    return flex(q, k, v, block_mask=block_mask)


def uses_matmul_attention(q: Tensor, keys: int) -> bool:
    """bf16 on CPU over at most MATMUL_ATTENTION_MAX_KEYS keys: two bf16 matmuls and a softmax run forward +
    backward 1.1-2.9x faster there than PyTorch's CPU flash kernel (benchmarks/attention.py)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and keys <= MATMUL_ATTENTION_MAX_KEYS


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | SharedPrefixMask | PairBlocks | None,
    is_causal: bool,
    dropout_p: float,
    queries_from: int = 0,
) -> Tensor:
    """Softmax attention of (B, H, N, D) queries over (B, H, keys, D); a tensor `attn_mask` is bool (True = may
    attend) or an additive float bias. Returns the output rows from `queries_from` on.

    Where `uses_matmul_attention`: causal self-attention and packed prefix-sharing rows run as `tiled_attention`
    (eager, without dropout; the queries before `queries_from` are skipped), other masks as `matmul_attention`;
    elsewhere SDPA. Rows packed with pairs (`PairBlocks`) run as `tiled_attention` on CPU in eager mode in any dtype
    (per-block tiles: no key of another pair is multiplied), elsewhere as SDPA with their dense mask.
    """
    if isinstance(attn_mask, PairBlocks):  # rows packed with whole pairs
        if q.device.type == "cpu" and dropout_p == 0 and not torch.compiler.is_compiling():
            return tiled_attention(q, k, v, attn_mask.tiles(q.dtype, q.device), queries_from)
        if q.device.type == "cuda" and PACKED_CUDA_ATTENTION == "flex" and dropout_p == 0:
            out = flex_attention(q, k, v, block_mask=attn_mask.block_mask())
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.dense(), dropout_p=dropout_p)
        return out[..., queries_from:, :]
    packed = isinstance(attn_mask, SharedPrefixMask)
    keys = max(attn_mask.split, attn_mask.prompt_keys + q.shape[-2] - attn_mask.split) if packed else k.shape[-2]
    matmul = uses_matmul_attention(q, keys)
    tiled = matmul and dropout_p == 0 and not torch.compiler.is_compiling()
    if packed and tiled:
        return tiled_attention(q, k, v, attn_mask.tiles(q.shape[1]), queries_from)
    if tiled and is_causal and q.shape[-2] == k.shape[-2]:
        return tiled_attention(q, k, v, causal_tiles(q.shape[-2], q.dtype, q.device), queries_from)
    if packed:  # two dense blocks
        split, prompt = attn_mask.split, attn_mask.prompt_keys
        # Compiled with dynamic shapes, Inductor (torch 2.13) saves these slices for backward with the strides of
        # the row width it traced, and the next width fails its stride check: there each block gets its own buffer.
        own = (lambda x: x.contiguous()) if torch.compiler.is_compiling() else (lambda x: x)
        # split, not sliced: backward concatenates the blocks' gradients instead of adding zero-padded copies
        (q1, q2), (k1, k2), (v1, v2) = (x.split((split, x.shape[-2] - split), dim=-2) for x in (q, k, v))
        first = attend(own(q1), own(k1), own(v1), None, True, dropout_p)
        second_mask = attn_mask.second_bias(q.shape[1]) if matmul else attn_mask.second_mask
        with_prompt = lambda first, second: torch.cat((first[..., :prompt, :], second), dim=-2)  # a new buffer
        second = attend(own(q2), with_prompt(k1, k2), with_prompt(v1, v2), second_mask, False, dropout_p)
        # both blocks into one (B, N, H, D) buffer: the caller's "b h n d -> b n (h d)" is then a view, not a copy
        out = torch.cat((first.transpose(1, 2), second.transpose(1, 2)), dim=1).transpose(1, 2)
    elif matmul:
        out = matmul_attention(q, k, v, attn_mask, is_causal, dropout_p)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)
    return out[..., queries_from:, :]


def matmul_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float
) -> Tensor:
    """Attention as two matmuls and a softmax over the full (N, keys) scores: SDPA's math, in the input dtype.

    A mask shared by all rows and heads, or one per (row, head), goes into the scores matmul itself (`baddbmm`:
    scale, matmul and mask in one kernel); a per-row mask is broadcast over heads in a separate add.
    """
    n, keys, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if is_causal:
        attn_mask = torch.ones(n, keys, dtype=torch.bool, device=q.device).tril()
    bias = q.new_zeros(()) if attn_mask is None else attn_mask
    bias = additive_mask(bias, q.dtype) if bias.dtype == torch.bool else bias
    if bias.dim() <= 2 or bias.shape[:-2] == q.shape[:-2]:
        bias = bias if bias.dim() <= 2 else bias.reshape(-1, n, keys)
        q3, k3 = q.reshape(-1, n, d), k.reshape(-1, keys, d)
        scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=d**-0.5).view(*q.shape[:-2], n, keys)
    else:
        scores = ((q * d**-0.5) @ k.transpose(-1, -2)).add_(bias)
    return F.dropout(scores.softmax(-1), dropout_p) @ v
