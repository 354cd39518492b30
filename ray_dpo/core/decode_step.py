"""`TransformerLM`'s forward fused for one new token per row: what `generate` and `beam_search` step through.

No nn.Module calls, fewer kernels: RoPE tables, the key-padding mask and the transposed (on CPU, from 2 rows on:
oneDNN-prepacked) weights are prepared once per call, keys/values written into the cache in place. Optionally
compiled (`decode="compile"`). tests/test_generate.py pins it to the module forward's tokens.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ray_dpo.core.attention import attend
from ray_dpo.core.kernels import ONEDNN_LINEAR, rope, rope_tables
from ray_dpo.core.model import KVCache, TransformerLM

DecodeMode = Literal["eager", "compile"]  # how a TransformerLM's decode step runs (`DecodeStep`)


def fusable(model: Callable, device: torch.device) -> bool:
    """`DecodeStep` re-implements `TransformerLM.forward`: only for that forward, and outside autocast (whose
    per-op casts it does not mirror)."""
    return (
        isinstance(model, TransformerLM)
        and type(model).forward is TransformerLM.forward
        and not torch.is_autocast_enabled(device.type)
    )


def _linear(x: Tensor, weight: Tensor, residual: Tensor | None = None) -> Tensor:
    """x @ W.T (+ residual: one kernel). `weight` is W.T (a view; the residual is then updated in place), or W
    prepacked for oneDNN (`_decode_weights`): at decode batch sizes a plain matmul repacks W on every call."""
    if weight.is_mkldnn:
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [None], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, None, "add")
    return torch.mm(x, weight) if residual is None else residual.addmm_(x, weight)


def _step(
    weights: tuple,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    token: Tensor,
    slot: Tensor,
    span: int,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor | None,
) -> Tensor:
    """One token per row through a TransformerLM: (B,) tokens -> (B, V) logits; its keys/values go to `slot`.

    weights: `_decode_weights`. keys/values: the cache's layers, each (B, heads, L, head_dim) (separate tensors, not
    one: torch.compile then writes them in place instead of copying the whole cache). Attention reads the first
    `span` cache slots; `mask` (bool, True = may attend) hides pad keys (and, for a static span, unwritten slots).
    cos/sin: RoPE at each row's position, (B or 1, 1, head_dim), the sign of rotate_half folded into `sin`.

    The math of `TransformerLM.forward`, in fewer kernels: no nn.Module calls, q and k rotated together, the
    residual adds fused into the output matmuls, the keys/values written in place with `index_copy_`.
    """
    emb, layers, (norm, eps), to_logits = weights
    x = F.embedding(token, emb)  # (B, dim): the residual stream
    b, dim = x.shape
    heads, half = keys[0].shape[1], keys[0].shape[-1] // 2
    for (attn_norm, attn_eps, to_qkv, to_out, ff_norm, ff_eps, to_gate_up, ff_out), k_cache, v_cache in zip(
        layers, keys, values, strict=True
    ):
        qkv = _linear(F.rms_norm(x, (dim,), attn_norm, attn_eps), to_qkv)
        qk = qkv[:, : 2 * dim].view(b, 2 * heads, 2 * half)  # q and k heads side by side: one RoPE for both
        qk = rope(qk, cos, sin)
        k_cache.index_copy_(2, slot, qk[:, heads:, None])
        v_cache.index_copy_(2, slot, qkv[:, 2 * dim :].view(b, heads, 1, 2 * half))
        k, v = k_cache.narrow(2, 0, span), v_cache.narrow(2, 0, span)
        out = attend(qk[:, :heads, None], k, v, mask, False, 0.0)  # (B, heads, 1, head_dim)
        x = _linear(out.view(b, dim), to_out, x)
        gate, up = _linear(F.rms_norm(x, (dim,), ff_norm, ff_eps), to_gate_up).chunk(2, dim=-1)
        x = _linear(F.silu(gate).mul_(up), ff_out, x)
    return _linear(F.rms_norm(x, (dim,), norm, eps), to_logits)


def _static_step(
    weights: tuple,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    token: Tensor,
    slot: Tensor,
    cos: Tensor,
    sin: Tensor,
    key_valid: Tensor | None,
) -> Tensor:
    """`_step` with every shape fixed, for torch.compile: the position is a tensor, attention spans
    the whole cache and the mask hides the slots after `slot`. cos/sin: tables (B or 1, L, 1, head_dim)."""
    span = keys[0].shape[-2]
    mask = (torch.arange(span, device=slot.device) <= slot).view(1, 1, 1, span)
    mask = mask if key_valid is None else mask & key_valid  # (B or 1, 1, 1, L)
    cos, sin = cos.index_select(1, slot).squeeze(1), sin.index_select(1, slot).squeeze(1)
    return _step(weights, keys, values, token, slot, span, cos, sin, mask)


_compiled_static_step: Callable | None = None  # one torch.compile for the process: its graphs are reused

# CPU fp32/bf16: from 2 rows on, oneDNN-prepacked matmul weights make decoding 1.1-1.5x faster; at 1 row they are
# slower than MKL's plain GEMV (measured on a 2-core EPYC, this model size; benchmarks/generate.py)
PACK_MIN_BATCH = 2
_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, weights): packed once, reused


def _decode_weights(model: TransformerLM, batch: int, pack: bool) -> tuple:
    """The tensors `_step` reads: (embedding, per-layer tuples, (final norm, eps), logits weight). Matmul weights
    are W.T views, or on CPU from PACK_MIN_BATCH rows on W prepacked for oneDNN (cached while the weights are
    unchanged: packing costs milliseconds, a small batch's whole generation)."""
    blocks = model.blocks
    linears = [m for b in blocks for m in (b.attn.to_qkv, b.attn.to_out, b.ff.to_gate_up, b.ff.to_out)]
    linears.append(model.to_logits)
    w = linears[0].weight
    pack = (
        pack
        and w.device.type == "cpu"
        and w.dtype in (torch.float32, torch.bfloat16)
        and batch >= PACK_MIN_BATCH
        and ONEDNN_LINEAR
    )
    if pack:  # the batch size is only a hint to oneDNN: from 2 rows on it picks the same layout, so one copy serves all
        key = tuple((m.weight.data_ptr(), m.weight._version) for m in linears)
        cached = _packed.get(model)
        if cached is None or cached[0] != key:
            _packed[model] = cached = (key, [torch.ops.mkldnn._reorder_linear_weight(m.weight, batch) for m in linears])
        mats = cached[1]
    else:
        mats = [m.weight.t() for m in linears]  # x @ W.T without a transpose per call
    layers = tuple(
        (b.attn_norm.weight, b.attn_norm.eps, *mats[4 * i : 4 * i + 2], b.ff_norm.weight, b.ff_norm.eps)
        + tuple(mats[4 * i + 2 : 4 * i + 4])
        for i, b in enumerate(blocks)
    )
    return model.token_emb.weight, layers, (model.norm.weight, model.norm.eps), mats[-1]


class DecodeStep:
    """`TransformerLM` decode step: (B,) tokens -> (B, V) logits, keys/values into a preallocated `KVCache`.

    Everything that does not change from token to token is done once: the weights' transposes, RoPE's cos/sin for
    every row and slot, the key-padding mask. decode: "eager" runs `_step` directly (attention over the filled
    slots only); "compile" runs `torch.compile(_static_step)` (opt-in: on CPU it did not pay, benchmarks/generate.py
    --compile).
    """

    def __init__(
        self, model: TransformerLM, cache: KVCache, positions: Tensor, key_valid: Tensor | None, decode: DecodeMode
    ):
        if decode not in ("eager", "compile"):
            raise ValueError(f"decode must be 'eager' or 'compile', got {decode!r}")
        self.cache, self.decode = cache, decode
        self.weights = _decode_weights(model, cache.shape[1], pack=decode == "eager")
        # RoPE as TransformerLM.forward computes it, for every slot at once: (B or 1, L, 1, head_dim)
        cos, sin = rope_tables(positions, model.inv_freq, model.token_emb.weight.dtype)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        self.cos, self.sin = (cos, sin) if cos.dim() == 4 else (cos.unsqueeze(0), sin.unsqueeze(0))
        self.key_valid = None if key_valid is None else key_valid[:, None, None, :]  # (B, 1, 1, L)
        self.slots = torch.arange(positions.shape[-1], device=positions.device)

    def __call__(self, token: Tensor) -> Tensor:
        c = self.cache
        n = c.length
        if self.decode == "eager":
            mask = None if self.key_valid is None else self.key_valid[..., : n + 1]
            cos, sin = self.cos[:, n], self.sin[:, n]
            keys, values = c.keys.unbind(0), c.values.unbind(0)
            logits = _step(self.weights, keys, values, token, self.slots[n : n + 1], n + 1, cos, sin, mask)
        else:
            global _compiled_static_step
            if _compiled_static_step is None:
                _compiled_static_step = torch.compile(_static_step, fullgraph=True, dynamic=False)
            slot, keys, values = self.slots[n : n + 1], c.keys.unbind(0), c.values.unbind(0)
            logits = _compiled_static_step(self.weights, keys, values, token, slot, self.cos, self.sin, self.key_valid)
        c.length = n + 1
        return logits

    def reorder(self, rows: Tensor) -> None:
        """Beam search: per-row tables follow their rows."""
        for name in ("cos", "sin", "key_valid"):
            table = getattr(self, name)
            if table is None or table.shape[0] == 1:
                continue
            if table.shape[0] == len(rows):
                table.copy_(table.index_select(0, rows))
            else:
                setattr(self, name, table.index_select(0, rows))
