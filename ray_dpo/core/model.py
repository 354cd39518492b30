"""Decoder-only transformer: RoPE, RMSNorm, SwiGLU, causal attention, optional preallocated KV cache, tied embeddings.

`TransformerLM(config)(tokens) -> logits`, `(B, N) int64 -> (B, N, V)`. Plain PyTorch + einops; the CPU kernels it
calls (`ray_dpo.core.kernels`) each equal their plain expression, and attention goes through `attention.attend`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from einops import rearrange
from torch import Tensor, nn

from ray_dpo.core.attention import PairBlocks, SharedPrefixMask, attend
from ray_dpo.core.kernels import Linear, rms_norm, rope_tables, rotary_qkv, swiglu


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


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
        attn_mask: Tensor | SharedPrefixMask | PairBlocks | None,
        is_causal: bool,
        cache: KVCache | None,
        queries_from: int = 0,
    ) -> Tensor:
        q, k, v = rotary_qkv(self.to_qkv(x), cos, sin, self.heads)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = attend(q, k, v, attn_mask, is_causal, self.dropout if self.training else 0.0, queries_from)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


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
        self.gradient_checkpointing = False  # set by ray_dpo.stages.models.enable_gradient_checkpointing
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
        attn_mask: Tensor | SharedPrefixMask | PairBlocks | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        hidden_from: int = 0,
    ) -> Tensor:
        """Logits for `tokens` (B, N).

        positions: (B, N) or (N,) RoPE positions; default continues from `cache.length` (or 0).
        attn_mask: bool, True = may attend, broadcastable to (B, heads, N, keys). When given it is used
            as is (the caller composes causality with padding); when None the mask is causal. A
            `SharedPrefixMask` runs packed prefix-sharing rows (`pairs.pack_pairs`), a `PairBlocks` rows packed with
            whole pairs (`pairs.pack_rows`), both without a cache.
        cache: a `KVCache`; the new keys/values are appended and `cache.length` advances by N.
        return_hidden: return the final-normed hidden states (B, N, dim) instead of logits, so a caller can run the
            output projection only where it needs it (`logps.scored_logps`).
        hidden_from: with `return_hidden`, return rows [hidden_from, N) only: the last block then runs attention
            queries, output projection and feed-forward only there (a caller that scores no earlier position).
        """
        if cache is not None and isinstance(attn_mask, (SharedPrefixMask, PairBlocks)):
            raise ValueError("the mask of packed rows (SharedPrefixMask, PairBlocks) cannot be used with a KV cache")
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
