"""CPU kernels of `TransformerLM`: what the eager CPU step runs instead of autograd's many small kernels.

Each has a plain-PyTorch twin it must equal (tests/test_model.py, tests/test_prefix_sharing.py) and steps aside where
that twin is already fast: on CUDA and under `torch.compile` (Inductor fuses the plain expressions).

    linear / Linear     fp32 CPU matmuls in oneDNN instead of MKL (a custom op, so torch.compile keeps it)
    rms_norm            RMSNorm with its backward written out, statistics in fp32
    rope / rotary_qkv   RoPE on q and k together, straight out of the fused q/k/v projection
    swiglu              silu(gate) * up, one gradient buffer for both halves
    tiled_attention     attention as query tiles that never multiply the keys a mask hides (bf16 causal rows, and
                        packed rows of pairs in any dtype)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# --- fp32 matmuls on CPU through oneDNN ------------------------------------------------------------------------------
#
# PyTorch runs fp32 CPU matmuls in MKL, which takes its AVX2 code path on AMD CPUs: on the AMD EPYC (Zen 5) this was
# tuned on, oneDNN's AVX-512 fp32 GEMM runs a 2048^2 matmul 2.2x faster and the fp32 DPO step 1.3x faster
# (benchmarks/dpo_step.py). Same IEEE fp32 arithmetic, another summation order. bf16 matmuls already go to oneDNN
# (autocast keeps F.linear); CUDA is untouched.

# oneDNN's linear op is in this torch build (a private op, what Inductor emits: plain matmuls if it ever goes)
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("ray_dpo::onednn_mm_t", mutates_args=())
def onednn_mm_t(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """a @ b.T (+ bias) in oneDNN: `(..., K), (N, K) -> (..., N)`; strided views are read as they are.

    A custom op, so `torch.compile` calls it as one opaque kernel (Inductor's own lowering of this oneDNN op expects
    frozen inference weights)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [None], "")


@onednn_mm_t.register_fake
def _(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    return a.new_empty((*a.shape[:-1], b.shape[0]))


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return onednn_mm_t(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = onednn_mm_t(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = onednn_mm_t(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1]).t())
        return grad_x, grad_w


def use_onednn(x: Tensor, weight: Tensor) -> bool:
    """fp32 on CPU outside autocast (where the matmul would run in MKL)."""
    cpu_fp32 = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
    return ONEDNN_LINEAR and cpu_fp32 and not torch.is_autocast_enabled("cpu")


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight)` (no bias); fp32 CPU matmuls in oneDNN (see above)."""
    return _OneDNNLinear.apply(x, weight) if use_onednn(x, weight) else F.linear(x, weight)


class Linear(nn.Linear):
    """`nn.Linear` whose bias-free matmul goes through `linear`. Still a module call, so forward hooks and PEFT's
    LoRA (which wraps `nn.Linear` modules) see it as before."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight) if self.bias is None else super().forward(x)


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm with its backward written out, statistics and gradients in at least fp32: 4 passes forward (the output
    already in the autocast dtype), 7 backward, where eager `F.rms_norm` runs ~12 kernels on CPU plus the next
    matmul's cast, and mixed-dtype elementwise ops take TensorIterator's slow casting loop."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc).square_().div_(x.shape[-1])
        rstd = mean_square.add_(eps).rsqrt_()
        normed = x.to(acc) * rstd
        ctx.save_for_backward(normed, weight, rstd)  # instead of x: the same memory, one pass less in backward
        ctx.x_dtype = x.dtype
        return (normed * weight.to(acc)).to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        normed, weight, rstd = ctx.saved_tensors
        owned = grad.dtype != normed.dtype
        grad = grad.to(normed.dtype)  # from bf16: a new tensor, ours to modify; else the caller's: left as it is
        grad_weight = (grad * normed).reshape(-1, normed.shape[-1]).sum(0)
        grad_normed = grad.mul_(weight) if owned else grad * weight
        dot = torch.linalg.vecdot(grad_normed, normed, dim=-1).unsqueeze(-1).div_(normed.shape[-1])
        grad_x = torch.addcmul(grad_normed.mul_(rstd), normed, dot.mul_(rstd), value=-1)
        return grad_x.to(ctx.x_dtype), grad_weight.to(weight.dtype), None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm; on CPU in eager mode the written-out kernel, its output already in the autocast dtype."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # fused there (CUDA kernel, Inductor)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    out_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return _RMSNormCPU.apply(x, weight, eps, out_dtype)


def rope_tables(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RoPE's cos and sin at `positions`: (...) -> (..., head_dim) in `dtype`, with rotate_half's sign folded into
    sin's first half, so `rope` is one multiply, one concatenation and one fused multiply-add."""
    freqs = positions.unsqueeze(-1).float() * inv_freq
    freqs = torch.cat((freqs, freqs), dim=-1)
    sin = freqs.sin()
    sin[..., : sin.shape[-1] // 2].neg_()
    return freqs.cos().to(dtype), sin.to(dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, with `rope_tables`' signed sin. Contiguous, whatever x's strides: q and k
    sliced from the fused projection would otherwise keep its (B, N, H, D) layout, and attention copy them."""
    first, second = x.chunk(2, dim=-1)
    return torch.addcmul(torch.cat((second, first), dim=-1).mul_(sin), x, cos)


class _RotaryQKV(torch.autograd.Function):
    """(B, N, 3 * dim) projection -> q and k rotated (one (2, B, H, N, D) buffer), v (a view of the projection).

    Backward writes the projection's gradient into one buffer, where autograd would add up three zero-padded
    slices of it; RoPE's backward is RoPE with -sin (a rotation's transpose)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
        q, k = rope(_qk_heads(qkv, heads), cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.heads = heads
        return q, k, _v_heads(qkv, heads)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor) -> tuple[Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        b, h, n, d = grad_q.shape
        grad_qkv = grad_q.new_empty(b, n, 3 * h * d)
        for grad, into in zip((grad_q, grad_k), _qk_heads(grad_qkv, h), strict=True):
            first, second = grad.chunk(2, dim=-1)
            torch.addcmul(cos * grad, torch.cat((second, first), dim=-1), sin, value=-1, out=into)
        _v_heads(grad_qkv, h).copy_(grad_v)
        return grad_qkv, None, None, None


def _qk_heads(qkv: Tensor, heads: int) -> Tensor:
    return rearrange(qkv[..., : qkv.shape[-1] * 2 // 3], "b n (two h d) -> two b h n d", two=2, h=heads)


def _v_heads(qkv: Tensor, heads: int) -> Tensor:
    return rearrange(qkv[..., qkv.shape[-1] * 2 // 3 :], "b n (h d) -> b h n d", h=heads)


def rotary_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (rotated by RoPE), v as (B, H, N, D) from the fused (B, N, 3 * dim) projection."""
    if torch.compiler.is_compiling():
        # Inductor fuses the plain expression. q and k each in a buffer of its own: with dynamic shapes, Inductor
        # (torch 2.13) saves views of a shared buffer with the strides of the first length it traced.
        q, k = (rope(x, cos, sin) for x in _qk_heads(qkv, heads))
        return q, k, _v_heads(qkv, heads)
    return _RotaryQKV.apply(qkv, cos, sin, heads)


CAUSAL_SPLIT_MIN = 128  # `causal_tiles` halves a query tile while it has at least this many rows


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """bool (True = may attend) -> 0 / -inf in `dtype`: added to the scores, it masks for free in backward."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


# --- tiled attention: skip the key blocks a causal mask hides -------------------------------------------------------


@dataclass(frozen=True)
class AttentionTile:
    """Queries [start, end) over the keys in `key_ranges` (concatenated in that order), masked by the additive
    `bias`, broadcastable to (B * H, end - start, keys); `row`: of that batch row only (bias broadcastable to
    (H, end - start, keys)), None: of every row."""

    start: int
    end: int
    key_ranges: tuple[tuple[int, int], ...]
    bias: Tensor
    row: int | None = None


@functools.lru_cache(maxsize=64)
def _causal_bias(start: int, end: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return additive_mask(torch.ones(end - start, end, dtype=torch.bool, device=device).tril(start), dtype)


def causal_tiles(n: int, dtype: torch.dtype, device: torch.device) -> list[AttentionTile]:
    """Causal self-attention over n positions as query tiles, rows [start, end) over keys [0, end): the keys after a
    tile's last query are never multiplied. Halved from the bottom up while a tile has CAUSAL_SPLIT_MIN rows: at
    n = 256, tiles of 64, 64 and 128 rows compute 69% of the (n, n) scores."""
    tiles, end = [], n
    while end:
        start = end // 2 if end >= CAUSAL_SPLIT_MIN else 0
        tiles.insert(0, AttentionTile(start, end, ((0, end),), _causal_bias(start, end, dtype, device)))
        end = start
    return tiles


def _from_row(tiles: list[AttentionTile], row: int) -> list[AttentionTile]:
    """The tiles' queries from `row` on: tiles that end before it dropped, those holding it cut (their bias too)."""
    kept = []
    for tile in tiles:
        if tile.end <= row:
            continue
        if tile.start < row:
            bias = tile.bias[..., row - tile.start :, :]
            tile = AttentionTile(row, tile.end, tile.key_ranges, bias, tile.row)
        kept.append(tile)
    return kept


def _tile_keys(x: Tensor, tile: AttentionTile) -> Tensor:
    """(B * H, keys, D) rows of `x` a tile attends to: a view for one range, a (small) copy for several."""
    ranges = [x[:, start:end] for start, end in tile.key_ranges]
    return ranges[0] if len(ranges) == 1 else torch.cat(ranges, dim=1)


def _heads(tile: AttentionTile, heads: int) -> slice:
    """The (B * H) rows of q, k, v a tile reads: all, or the heads of its batch row."""
    return slice(None) if tile.row is None else slice(tile.row * heads, (tile.row + 1) * heads)


class _TiledAttention(torch.autograd.Function):
    """Matmul attention tile by tile, written out: each tile's softmax saved for backward, and the key and value
    gradients accumulated in place, where autograd over the same tiles adds zero-padded slices and concatenations.
    Query rows no tile covers (padding after packed pairs) get zeros, and no gradient."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, tiles: list[AttentionTile], queries_from: int) -> Tensor:
        b, h, n, d = q.shape
        q3, k3, v3 = (x.reshape(b * h, x.shape[-2], d) for x in (q, k, v))
        per_row = any(tile.row is not None for tile in tiles)
        # one (B, N, H, D) buffer: the caller's "b h n d -> b n (h d)" is then a view, not a copy
        out = (q.new_zeros if per_row else q.new_empty)(b, n - queries_from, h, d)
        probs = []
        for tile in tiles:
            heads, rows = _heads(tile, h), slice(tile.start - queries_from, tile.end - queries_from)
            keys = _tile_keys(k3[heads], tile).transpose(1, 2)
            scores = torch.baddbmm(tile.bias, q3[heads, tile.start : tile.end], keys, alpha=d**-0.5)
            probs.append(scores.softmax(-1))
            tile_out = torch.bmm(probs[-1], _tile_keys(v3[heads], tile))
            tile_out = tile_out.view(-1, h, tile.end - tile.start, d).transpose(1, 2)  # (rows, queries, H, D)
            if tile.row is None:
                out[:, rows] = tile_out
            else:
                out[tile.row, rows] = tile_out[0]
        ctx.save_for_backward(q3, k3, v3, *probs)
        ctx.tiles, ctx.queries_from = tiles, queries_from
        return out.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q3, k3, v3, *probs = ctx.saved_tensors
        b, h, rows_out, d = grad.shape  # output rows: from queries_from on
        first = ctx.queries_from
        grad3 = grad.reshape(b * h, rows_out, d)
        grad_q, grad_k, grad_v = torch.zeros_like(q3), torch.zeros_like(k3), torch.zeros_like(v3)
        for tile, prob in zip(ctx.tiles, probs, strict=True):
            heads = _heads(tile, h)
            rows, queries = grad3[heads, tile.start - first : tile.end - first], q3[heads, tile.start : tile.end]
            grad_probs = torch.bmm(rows, _tile_keys(v3[heads], tile).transpose(1, 2))
            grad_scores = torch._softmax_backward_data(grad_probs, prob, -1, prob.dtype)
            grad_q[heads, tile.start : tile.end] = torch.bmm(grad_scores, _tile_keys(k3[heads], tile)).mul_(d**-0.5)
            tile_grad_k = torch.bmm(grad_scores.transpose(1, 2), queries).mul_(d**-0.5)
            tile_grad_v = torch.bmm(prob.transpose(1, 2), rows)
            offset = 0
            for start, end in tile.key_ranges:
                grad_k[heads, start:end] += tile_grad_k[:, offset : offset + end - start]
                grad_v[heads, start:end] += tile_grad_v[:, offset : offset + end - start]
                offset += end - start
        unflatten = lambda x: x.view(b, h, -1, d)
        return unflatten(grad_q), unflatten(grad_k), unflatten(grad_v), None, None


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, tiles: list[AttentionTile], queries_from: int = 0) -> Tensor:
    """(B, H, N - queries_from, D): attention tile by tile (`AttentionTile`s covering the query rows, each row once),
    for the queries from `queries_from` on."""
    return _TiledAttention.apply(q, k, v, _from_row(tiles, queries_from) if queries_from else tiles, queries_from)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of the (..., 2 * hidden) projection; backward writes both halves of the projection's gradient
    into one buffer, where autograd would concatenate them."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate_up, activated)
        return activated * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        gate_up, activated = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_gate_up


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up; compiled, the plain expression (Inductor fuses it)."""
    if torch.compiler.is_compiling():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(gate_up)
