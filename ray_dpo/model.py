"""Decoder-only transformer: RoPE, RMSNorm, SwiGLU, causal attention (SDPA), optional preallocated KV cache.

`TransformerLM(config)(tokens) -> logits`, `(B, N) int64 -> (B, N, V)`. Plain PyTorch + einops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


MATMUL_ATTENTION_MAX_KEYS = 768  # CPU bf16: the matmul path wins up to here (benchmarks/attention.py)


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


def attend(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | SharedPrefixMask | None, is_causal: bool, dropout_p: float
) -> Tensor:
    """Softmax attention of (B, H, N, D) queries over (B, H, keys, D); a tensor `attn_mask` is bool, True = may attend.

    SDPA, except for bf16 on CPU with at most MATMUL_ATTENTION_MAX_KEYS keys: there two bf16 matmuls and a softmax
    run forward + backward 1.1-2.9x faster than PyTorch's CPU flash kernel (benchmarks/attention.py), and the
    (N, keys) score matrix is small enough to keep.
    """
    if isinstance(attn_mask, SharedPrefixMask):
        split, prompt = attn_mask.split, attn_mask.prompt_keys
        # Compiled with dynamic shapes, Inductor (torch 2.13) saves these slices for backward with the strides of
        # the row width it traced, and the next width fails its stride check: there each block gets its own buffer.
        own = (lambda x: x.contiguous()) if torch.compiler.is_compiling() else (lambda x: x)
        first = attend(own(q[..., :split, :]), own(k[..., :split, :]), own(v[..., :split, :]), None, True, dropout_p)
        keys = lambda x: torch.cat((x[..., :prompt, :], x[..., split:, :]), dim=-2)  # a new buffer already
        second = attend(own(q[..., split:, :]), keys(k), keys(v), attn_mask.second_mask, False, dropout_p)
        return torch.cat((first, second), dim=-2)
    cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
    if cpu_bf16 and k.shape[-2] <= MATMUL_ATTENTION_MAX_KEYS:
        return matmul_attention(q, k, v, attn_mask, is_causal, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)


def matmul_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float
) -> Tensor:
    """Attention as two matmuls and a softmax over the full (N, keys) scores: SDPA's math, in the input dtype."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:  # an additive bias, in place: 4x faster than masked_fill and free in backward
        scores += torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~attn_mask, -math.inf)
    return F.dropout(scores.softmax(-1), dropout_p) @ v


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
    ) -> Tensor:
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # under bf16 autocast, fp32 tables would promote q, k back
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = attend(q, k, v, attn_mask, is_causal, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.to_gate_up = Linear(config.dim, 2 * config.ff_hidden, bias=False)
        self.to_out = Linear(config.ff_hidden, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.to_gate_up(x).chunk(2, dim=-1)
        return self.to_out(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(config.dim), Attention(config, layer)
        self.ff_norm, self.ff = RMSNorm(config.dim), FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask, is_causal, cache) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, attn_mask, is_causal, cache))
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
    ) -> Tensor:
        """Logits for `tokens` (B, N).

        positions: (B, N) or (N,) RoPE positions; default continues from `cache.length` (or 0).
        attn_mask: bool, True = may attend, broadcastable to (B, heads, N, keys). When given it is used
            as is (the caller composes causality with padding); when None the mask is causal. A
            `SharedPrefixMask` runs packed prefix-sharing rows (`dpo.pack_pairs`) without a cache.
        cache: a `KVCache`; the new keys/values are appended and `cache.length` advances by N.
        return_hidden: return the final-normed hidden states (B, N, dim) instead of logits, so a caller can run the
            output projection only where it needs it (`logps.scored_logps`).
        """
        if cache is not None and isinstance(attn_mask, SharedPrefixMask):
            raise ValueError("a SharedPrefixMask (packed prefix-sharing rows) cannot be used with a KV cache")
        offset = cache.length if cache is not None else 0
        n = tokens.shape[1]
        if positions is None:
            positions = torch.arange(offset, offset + n, device=tokens.device)
        # computed per call, not looked up in a table: any position works (packed prefix-sharing rows, long caches)
        freqs = positions.unsqueeze(-1).float() * self.inv_freq
        freqs = torch.cat((freqs, freqs), dim=-1)
        if freqs.dim() == 3:  # per-row positions: (B, N, D) -> (B, 1, N, D) to broadcast over heads
            freqs = freqs.unsqueeze(1)
        cos, sin = freqs.cos(), freqs.sin()

        is_causal = attn_mask is None and offset == 0 and n > 1
        if attn_mask is None and offset > 0 and n > 1:  # chunk appended to a cache: causal, bottom-right aligned
            attn_mask = torch.ones(n, offset + n, dtype=torch.bool, device=tokens.device).tril(offset)

        x = self.token_emb(tokens)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # activations recomputed in backward: memory per block instead of per op
                x = torch.utils.checkpoint.checkpoint(
                    block, x, cos, sin, attn_mask, is_causal, cache, use_reentrant=False
                )
            else:
                x = block(x, cos, sin, attn_mask, is_causal, cache)
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
