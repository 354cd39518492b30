"""Decoder-only transformer: RoPE, RMSNorm, SwiGLU, causal attention (SDPA), optional preallocated KV cache.

`TransformerLM(config)(tokens) -> logits`, `(B, N) int64 -> (B, N, V)`. Plain PyTorch + einops.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import Tensor, nn


@dataclass
class ModelConfig:
    vocab_size: int = 259  # ByteTokenizer: 256 bytes + pad, bos, eos
    max_seq_len: int = 512  # longest sequence RoPE tables and the KV cache are sized for
    dim: int = 256  # residual stream width
    depth: int = 4  # number of transformer blocks
    heads: int = 4  # attention heads; dim must divide evenly
    ff_mult: float = 4.0  # SwiGLU hidden width = 2/3 * ff_mult * dim, rounded up to a multiple of 32
    dropout: float = 0.0  # residual and attention dropout (training only)
    tie_embeddings: bool = True  # share the token embedding with the output projection
    rope_base: float = 10_000.0  # RoPE frequency base

    def __post_init__(self) -> None:
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"model.dim={self.dim} must split into {self.heads} heads of even size")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def ff_hidden(self) -> int:
        return 32 * math.ceil(2 / 3 * self.ff_mult * self.dim / 32)


class KVCache:
    """Preallocated keys/values for all layers; `length` tokens are filled.

    Allocated lazily on first write so it takes the dtype the model computes in (fp32 or bf16 autocast).
    Every row of the batch shares one `length`: variable-length prompts are padded and masked by the caller.
    `generate`'s fused decode step (ray_dpo/generate.py) writes `keys`/`values` in place and advances `length`.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None):
        self.shape = (config.depth, batch_size, config.heads, max_len or config.max_seq_len, config.head_dim)
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.length = 0

    def update(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys is None:
            self.keys = keys.new_zeros(self.shape)
            self.values = values.new_zeros(self.shape)
        end = self.length + keys.shape[-2]
        if end > self.shape[-2]:
            raise ValueError(f"KV cache holds {self.shape[-2]} positions; {end} requested")
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def reorder(self, batch_indices: Tensor) -> None:
        """Select/reorder batch rows (beam search). Same batch size: in place, filled slots only, so the storage
        (and a CUDA graph captured over it) stays; a new batch size allocates."""
        self.shape = (self.shape[0], len(batch_indices), *self.shape[2:])
        if self.keys is None:
            return
        if self.keys.shape[1] != len(batch_indices):
            self.keys = self.keys.index_select(1, batch_indices)
            self.values = self.values.index_select(1, batch_indices)
            return
        for cache in (self.keys, self.values):
            filled = cache[:, :, :, : self.length]
            filled.copy_(filled.index_select(1, batch_indices))


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or torch.compiler.is_compiling():  # fused there (CUDA kernel, Inductor)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        out_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        return _RMSNormCPU.apply(x, self.weight, self.eps, out_dtype)


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


MATMUL_ATTENTION_MAX_KEYS = 1024  # CPU bf16: the matmul path wins up to here (benchmarks/attention.py)
CAUSAL_SPLIT_MIN = 128  # `causal_tiles` halves a query tile while it has at least this many rows


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """bool (True = may attend) -> 0 / -inf in `dtype`: added to the scores, it masks for free in backward."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


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


def uses_matmul_attention(q: Tensor, keys: int) -> bool:
    """bf16 on CPU over at most MATMUL_ATTENTION_MAX_KEYS keys: two bf16 matmuls and a softmax run forward +
    backward 1.1-2.9x faster there than PyTorch's CPU flash kernel (benchmarks/attention.py)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and keys <= MATMUL_ATTENTION_MAX_KEYS


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | SharedPrefixMask | None,
    is_causal: bool,
    dropout_p: float,
    queries_from: int = 0,
) -> Tensor:
    """Softmax attention of (B, H, N, D) queries over (B, H, keys, D); a tensor `attn_mask` is bool (True = may
    attend) or an additive float bias. Returns the output rows from `queries_from` on.

    Where `uses_matmul_attention`: causal self-attention and packed prefix-sharing rows run as `tiled_attention`
    (eager, without dropout; the queries before `queries_from` are skipped), other masks as `matmul_attention`;
    elsewhere SDPA.
    """
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


# --- tiled attention: skip the key blocks a causal mask hides -------------------------------------------------------


@dataclass(frozen=True)
class AttentionTile:
    """Queries [start, end) over the keys in `key_ranges` (concatenated in that order), masked by the additive
    `bias`, broadcastable to (B * H, end - start, keys)."""

    start: int
    end: int
    key_ranges: tuple[tuple[int, int], ...]
    bias: Tensor


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
    """The tiles' queries from `row` on: earlier tiles dropped, the one holding `row` cut (its bias too)."""
    kept = [tile for tile in tiles if tile.end > row]
    first = kept[0]
    if first.start < row:
        kept[0] = AttentionTile(row, first.end, first.key_ranges, first.bias[..., row - first.start :, :])
    return kept


def _tile_keys(x: Tensor, tile: AttentionTile) -> Tensor:
    """(B * H, keys, D) rows of `x` a tile attends to: a view for one range, a (small) copy for several."""
    ranges = [x[:, start:end] for start, end in tile.key_ranges]
    return ranges[0] if len(ranges) == 1 else torch.cat(ranges, dim=1)


class _TiledAttention(torch.autograd.Function):
    """Matmul attention tile by tile, written out: each tile's softmax saved for backward, and the key and value
    gradients accumulated in place, where autograd over the same tiles adds zero-padded slices and concatenations."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, tiles: list[AttentionTile]) -> Tensor:
        b, h, _, d = q.shape
        q3, k3, v3 = (x.reshape(b * h, x.shape[-2], d) for x in (q, k, v))
        probs, outs = [], []
        for tile in tiles:
            keys = _tile_keys(k3, tile).transpose(1, 2)
            scores = torch.baddbmm(tile.bias, q3[:, tile.start : tile.end], keys, alpha=d**-0.5)
            probs.append(scores.softmax(-1))
            outs.append(torch.bmm(probs[-1], _tile_keys(v3, tile)).view(b, h, -1, d).transpose(1, 2))
        ctx.save_for_backward(q3, k3, v3, *probs)
        ctx.tiles = tiles
        # one (B, N, H, D) buffer: the caller's "b h n d -> b n (h d)" is then a view, not a copy
        return torch.cat(outs, dim=1).transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q3, k3, v3, *probs = ctx.saved_tensors
        b, h, rows_out, d = grad.shape  # output rows: from the first tile's start on
        first = ctx.tiles[0].start
        grad3 = grad.reshape(b * h, rows_out, d)
        grad_q = [q3.new_zeros(b * h, first, d)] if first else []  # skipped queries
        grad_k, grad_v = torch.zeros_like(k3), torch.zeros_like(v3)
        for tile, prob in zip(ctx.tiles, probs, strict=True):
            rows, queries = grad3[:, tile.start - first : tile.end - first], q3[:, tile.start : tile.end]
            grad_probs = torch.bmm(rows, _tile_keys(v3, tile).transpose(1, 2))
            grad_scores = torch._softmax_backward_data(grad_probs, prob, -1, prob.dtype)
            grad_q.append(torch.bmm(grad_scores, _tile_keys(k3, tile)).mul_(d**-0.5))
            tile_grad_k = torch.bmm(grad_scores.transpose(1, 2), queries).mul_(d**-0.5)
            tile_grad_v = torch.bmm(prob.transpose(1, 2), rows)
            offset = 0
            for start, end in tile.key_ranges:
                grad_k[:, start:end] += tile_grad_k[:, offset : offset + end - start]
                grad_v[:, start:end] += tile_grad_v[:, offset : offset + end - start]
                offset += end - start
        unflatten = lambda x: x.view(b, h, -1, d)
        return unflatten(torch.cat(grad_q, dim=1)), unflatten(grad_k), unflatten(grad_v), None


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, tiles: list[AttentionTile], queries_from: int = 0) -> Tensor:
    """(B, H, N - queries_from, D): attention tile by tile (`AttentionTile`s covering the query rows in order), for
    the queries from `queries_from` on."""
    return _TiledAttention.apply(q, k, v, _from_row(tiles, queries_from) if queries_from else tiles)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.heads, self.dropout = layer, config.heads, config.dropout
        self.to_qkv = Linear(config.dim, 3 * config.dim, bias=False)
        self.to_out = Linear(config.dim, config.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | SharedPrefixMask | None,
        is_causal: bool,
        cache: KVCache | None,
        queries_from: int = 0,
    ) -> Tensor:
        q, k, v = rotary_qkv(self.to_qkv(x), cos, sin, self.heads)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = attend(q, k, v, attn_mask, is_causal, self.dropout if self.training else 0.0, queries_from)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


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


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.to_gate_up = Linear(config.dim, 2 * config.ff_hidden, bias=False)
        self.to_out = Linear(config.ff_hidden, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.to_out(swiglu(self.to_gate_up(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(config.dim), Attention(config, layer)
        self.ff_norm, self.ff = RMSNorm(config.dim), FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask, is_causal, cache, rows_from: int = 0) -> Tensor:
        """The block's output rows from `rows_from` on (the earlier rows still give their keys and values)."""
        attended = self.attn(self.attn_norm(x), cos, sin, attn_mask, is_causal, cache, rows_from)
        x = x[:, rows_from:] + self.dropout(attended)
        return x + self.dropout(self.ff(self.ff_norm(x)))


class TransformerLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.depth))
        self.norm = RMSNorm(config.dim)
        self.to_logits = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.to_logits.weight = self.token_emb.weight
        inv_freq = config.rope_base ** -(torch.arange(0, config.head_dim, 2).float() / config.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.gradient_checkpointing = False  # set by ray_dpo.models.enable_gradient_checkpointing
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("to_out.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * config.depth))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def init_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch_size, max_len)

    def forward(
        self,
        tokens: Tensor,
        *,
        positions: Tensor | None = None,
        attn_mask: Tensor | SharedPrefixMask | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        hidden_from: int = 0,
    ) -> Tensor:
        """Logits for `tokens` (B, N).

        positions: (B, N) or (N,) RoPE positions; default continues from `cache.length` (or 0).
        attn_mask: bool, True = may attend, broadcastable to (B, heads, N, keys). When given it is used
            as is (the caller composes causality with padding); when None the mask is causal. A
            `SharedPrefixMask` runs packed prefix-sharing rows (`dpo.pack_pairs`) without a cache.
        cache: a `KVCache`; the new keys/values are appended and `cache.length` advances by N.
        return_hidden: return the final-normed hidden states (B, N, dim) instead of logits, so a caller can run the
            output projection only where it needs it (`logps.scored_logps`).
        hidden_from: with `return_hidden`, return rows [hidden_from, N) only: the last block then runs attention
            queries, output projection and feed-forward only there (a caller that scores no earlier position).
        """
        if cache is not None and isinstance(attn_mask, SharedPrefixMask):
            raise ValueError("a SharedPrefixMask (packed prefix-sharing rows) cannot be used with a KV cache")
        if hidden_from and (not return_hidden or cache is not None):
            raise ValueError("hidden_from needs return_hidden=True and no KV cache")
        offset = cache.length if cache is not None else 0
        n = tokens.shape[1]
        if positions is None:
            positions = torch.arange(offset, offset + n, device=tokens.device)
        # computed per call, not looked up in a table: any position works (packed prefix-sharing rows, long caches);
        # in the dtype q and k come out of their matmul in (fp32 tables would promote them back under autocast)
        device = tokens.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.token_emb.weight.dtype
        cos, sin = rope_tables(positions, self.inv_freq, dtype)
        if cos.dim() == 3:  # per-row positions: (B, N, D) -> (B, 1, N, D) to broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        is_causal = attn_mask is None and offset == 0  # a Python bool, also for symbolic lengths (SDPA needs one)
        if attn_mask is None and offset > 0 and n > 1:  # chunk appended to a cache: causal, bottom-right aligned
            attn_mask = torch.ones(n, offset + n, dtype=torch.bool, device=tokens.device).tril(offset)

        x = self.token_emb(tokens)
        for layer, block in enumerate(self.blocks):
            rows_from = hidden_from if layer == len(self.blocks) - 1 else 0
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # activations recomputed in backward: memory per block instead of per op
                x = torch.utils.checkpoint.checkpoint(
                    block, x, cos, sin, attn_mask, is_causal, cache, rows_from, use_reentrant=False
                )
            else:
                x = block(x, cos, sin, attn_mask, is_causal, cache, rows_from)
        if cache is not None:
            cache.length += n
        return self.norm(x) if return_hidden else self.to_logits(self.norm(x))

    def num_params(self, non_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.token_emb.weight.numel() if non_embedding else total

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Model FLOPs per token (PaLM appendix B): 2 per matmul weight, plus attention scores and values.

        Counts every matmul including the output projection; attention as 2 matmuls of seq_len x head_dim per
        head (non-causal count, as PaLM/nanoGPT). Training (forward + backward) = 3x forward.
        """
        c = self.config
        matmul_params = self.num_params() - self.token_emb.weight.numel()
        if c.tie_embeddings:
            matmul_params += self.to_logits.weight.numel()
        matmul_params -= sum(p.numel() for n, p in self.named_parameters() if n.endswith("norm.weight"))
        forward = 2 * matmul_params + 2 * 2 * c.depth * seq_len * c.dim
        return 3 * forward if training else forward
