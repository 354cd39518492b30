"""Per-token log-probs of scored targets without the (B, N, V) logits tensor.

The plain path, `token_logps(model(tokens), targets)`, keeps fp32 logits for every position: at a 128k vocabulary
and 4 x 2048 tokens that is ~8 GB per micro-batch, and as much again for their gradient. Here the model body runs to
hidden states, only the scored positions are gathered (no head FLOPs on prompt or padding), and `target_logps` runs
the output projection + log-softmax over `chunk_size` rows at a time. Its backward recomputes each chunk's logits,
so at most one chunk of (chunk_size, V) logits is alive at any moment, in forward or backward.

`scored_logps(model, tokens, targets, mask)` takes `TransformerLM` (through `torch.compile` / DDP wrappers) and plain
Hugging Face causal LMs; any other module falls back to the full-logits path. Torch only: no Ray, no MLflow.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ray_dpo.core.attention import PairBlocks, SharedPrefixMask
from ray_dpo.core.kernels import onednn_mm_t, use_onednn
from ray_dpo.core.kinds import inner_model, is_hf, peft_base, unwrap
from ray_dpo.core.model import TransformerLM

DEFAULT_CHUNK_SIZE = 1024  # rows per chunk: at V = 128k, 0.5 GB of fp32 logits (vs ~8 GB for 4 x 2048 tokens)


# --- the chunked head ------------------------------------------------------------------------------------------------


class _ChunkedTargetLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] per row, chunk by chunk; backward recomputes each chunk.

    d logp / d logits = onehot(target) - softmax, so backward needs only the per-row logsumexp from forward.
    Matmuls run in `dtype` (the autocast dtype, or the inputs' own); logsumexp and softmax always in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, dtype: torch.dtype):
        ctx.set_materialize_grads(False)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        out = hidden.new_empty(hidden.shape[0], dtype=torch.promote_types(dtype, torch.float32))
        lse = torch.empty_like(out)
        with torch.autocast(hidden.device.type, enabled=False):  # casts are explicit: no autocast surprises inside
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                z = _logits(hidden[rows].to(dtype), w, b)
                target_logit = z.gather(1, targets[rows, None]).squeeze(1)
                peak = z.amax(1, keepdim=True)
                lse[rows] = z.sub_(peak).exp_().sum(1).log_() + peak.squeeze(1)  # in place: one (chunk, V) buffer
                out[rows] = target_logit - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_out is None or not (need_h or need_w or need_b):
            return None, None, None, None, None, None
        dtype, chunk_size = ctx.dtype, ctx.chunk_size
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = lse.dtype  # fp32, or fp64 for fp64 inputs: gradients are summed over chunks in it
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h, g_out = hidden[rows].to(dtype), grad_out[rows, None].to(lse.dtype)
                g = _logits(h, w, b).sub_(lse[rows, None]).exp_().mul_(-g_out)  # -softmax * grad
                g = g.scatter_add_(1, targets[rows, None], g_out).to(dtype)  # + onehot * grad
                onednn = use_onednn(g, w)
                if need_h:
                    grad_h[rows] = onednn_mm_t(g, w.t()) if onednn else g @ w
                if need_w:
                    if onednn:
                        grad_w += onednn_mm_t(g.t(), h.t())
                    elif dtype == acc:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += (g.t() @ h).to(acc)
                if need_b:
                    grad_b += g.to(acc).sum(0)
        cast = lambda grad, like: None if grad is None else grad.to(like.dtype)
        return grad_h, cast(grad_w, weight), cast(grad_b, bias), None, None, None


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(rows, V) logits of one chunk in at least fp32; a fresh tensor, so callers may modify it in place."""
    if use_onednn(hidden, weight):  # fp32 CPU: oneDNN, as model.linear
        return onednn_mm_t(hidden, weight, bias)
    z = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    return z.to(torch.promote_types(z.dtype, torch.float32))  # a no-op in fp32; a copy from bf16


def target_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """log p(targets) under logits `hidden @ weight.T + bias`: `(M, D), (V, D), (M,) -> (M,)`, fp32 (fp64 from fp64).

    Never holds more than `chunk_size` rows of logits. Differentiable w.r.t. `hidden`, `weight` and `bias`; a weight
    tied to an embedding accumulates both gradients through autograd as usual. Under `torch.autocast` the matmuls run
    in the autocast dtype (as `nn.Linear` would) with fp32 master weights; logsumexp is always fp32.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _ChunkedTargetLogps.apply(hidden, weight, bias, targets, chunk_size, dtype)


# --- models: body to hidden states, head only where scored ---------------------------------------------------------

# Hugging Face configs whose causal-LM head post-processes the logits (softcapping, scaling, vocabulary trimming):
# attribute -> values under which it does nothing. `hidden @ lm_head.weight.T` would silently differ otherwise.
_HF_LOGIT_POSTPROCESSING = {
    "final_logit_softcapping": (None,),  # Gemma 2/3: cap * tanh(logits / cap)
    "logits_soft_cap": (None,),  # RecurrentGemma
    "logit_scale": (None, 1, 1.0),  # Cohere: logits * scale
    "logits_scaling": (None, 1, 1.0),  # Granite: logits / s, MiniCPM3: hidden / s, HyperCLOVAX: logits * s
    "lm_head_multiplier": (None, 1, 1.0),  # Falcon-H1
}


def _hf_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder body, lm_head) of a Hugging Face causal LM; None if `model` is not one; ValueError if the head
    does more than `hidden @ lm_head.weight.T + bias`."""
    if not is_hf(model):
        return None
    config = model.config
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"scored_logps: {name} is an encoder-decoder model; it needs decoder-only causal LMs")
    head, body = model.get_output_embeddings(), model.get_decoder()
    children = {id(child) for child in model.children()}
    if not isinstance(head, nn.Linear) or body is head or children != {id(body), id(head)}:
        raise ValueError(
            f"scored_logps: {name} is not `decoder body -> one plain nn.Linear lm_head` (its head is "
            f"{type(head).__name__}, its children {[type(c).__name__ for c in model.children()]}); the chunked head "
            "would not reproduce its logits. Use the full-logits path for this model."
        )
    if next(model.parameters(recurse=False), None) is not None:
        raise ValueError(f"scored_logps: {name} has parameters outside its body and head (a logit scale?)")
    for attr, neutral in _HF_LOGIT_POSTPROCESSING.items():
        value = getattr(config, attr, None)
        if value not in neutral:
            raise ValueError(
                f"scored_logps: {name} post-processes its logits ({attr}={value}), which the chunked head does not "
                "reproduce. Use the full-logits path for this model."
            )
    unpadded = getattr(config, "unpadded_vocab_size", None)
    if unpadded is not None and unpadded != head.out_features:
        raise ValueError(f"scored_logps: {name} trims its logits to unpadded_vocab_size={unpadded}")
    return body, head


def scoring_path(model: nn.Module) -> str:
    """How `scored_logps` scores `model`: "transformer_lm" or "hf" (chunked head) or "full_logits" (any other
    module). Raises ValueError for Hugging Face models it cannot score exactly; cheap, so callers can check early."""
    inner, crossed = unwrap(model)
    inner = peft_base(inner)
    if isinstance(inner, TransformerLM):
        return "transformer_lm"
    if _hf_parts(inner) is None:
        return "full_logits"
    if crossed:  # DDP syncs gradients only for graphs built through its own forward, which returns full logits
        raise ValueError(
            f"scored_logps: a Hugging Face model inside {type(model).__name__} would skip the wrapper's forward "
            "(and DDP's gradient sync). Pass the bare model, or use the full-logits path."
        )
    return "hf"


def scored_logps(
    model: nn.Module,
    tokens: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    source: Tensor | None = None,
    positions: Tensor | None = None,
    attn_mask: Tensor | SharedPrefixMask | PairBlocks | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """log p(targets[b, t]) where `mask[b, t]`, 0 elsewhere: `(B, N) tokens, (B, T) targets, (B, T) mask -> (B, T)`.

    targets[b, t] is scored by the model output at position `source[b, t]` of `tokens` (default t, so pass
    `tokens = seq[:, :-1], targets = seq[:, 1:]`). The output projection runs only on scored positions, chunked.
    positions / attn_mask: passed to the model (TransformerLM's `positions` / `attn_mask`, including a
    `SharedPrefixMask` or `PairBlocks`; a Hugging Face model's `position_ids` / `attention_mask`). Equal to
    `token_logps(model(tokens).logits, targets)` under the mask, gradients included.
    """
    if isinstance(unwrap(model)[0], LogpsModel):  # its forward scores: through DDP / FSDP, gradients synced
        return model(tokens, targets, mask, source=source, positions=positions, attn_mask=attn_mask)
    mask = mask.bool()
    rows, cols = mask.nonzero(as_tuple=True)  # one host sync: how many tokens are scored
    src = cols if source is None else source[rows, cols]
    path = scoring_path(model)
    if path == "full_logits":
        kwargs = {k: v for k, v in (("positions", positions), ("attn_mask", attn_mask)) if v is not None}
        output = model(tokens, **kwargs)
        logits = getattr(output, "logits", output)[rows, src]  # only the scored rows are log-softmaxed
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logps = logits.gather(1, targets[rows, cols, None]).squeeze(1) - logits.logsumexp(1)
    else:
        if path == "transformer_lm":  # call the outer module: DDP's forward (and gradient sync) and compile stay on
            # no position before the first scored one needs the last block's queries and feed-forward
            first = int(src.min()) if len(src) else 0
            hidden = model(tokens, positions=positions, attn_mask=attn_mask, return_hidden=True, hidden_from=first)
            src = src - first
            head = inner_model(model).to_logits
        else:
            body, head = _hf_parts(inner_model(model))
            if isinstance(attn_mask, (SharedPrefixMask, PairBlocks)):  # packed rows: a 4-D mask + position ids
                # additive (0 / most negative), which every attention implementation of transformers reads alike
                dtype = head.weight.dtype
                attn_mask = torch.zeros((), dtype=dtype, device=tokens.device).masked_fill(
                    ~attn_mask.dense(), torch.finfo(dtype).min
                )
            out = body(input_ids=tokens, attention_mask=attn_mask, position_ids=positions, use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logps = target_logps(hidden[rows, src], head.weight, targets[rows, cols], bias=head.bias, chunk_size=chunk_size)
    return logps.new_zeros(mask.shape).index_put((rows, cols), logps)


class LogpsModel(nn.Module):
    """A model whose forward returns scored log-probs (body and chunked head inside `forward`): the module a trainer
    wraps in DDP or FSDP, so that gradient synchronisation sees the head too, for any model kind.

    `adapters_disabled=True` scores a PEFT model with its LoRA adapters off: the base model, the frozen reference of
    LoRA training, without a second copy of its weights. `adapter="reference"` scores it with that named adapter set
    active instead of the trained one: a reference that moves (TR-DPO), still without a second base.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        adapters_disabled: bool = False,
        adapter: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        super().__init__()
        if adapters_disabled and adapter is not None:
            raise ValueError("LogpsModel: adapters_disabled=True and adapter=... exclude each other")
        self.model, self.adapters_disabled, self.adapter = model, adapters_disabled, adapter
        self.chunk_size = chunk_size

    @property
    def is_view(self) -> bool:
        """A view of another module's weights (a LoRA model with its adapters off or switched): their training mode
        and gradients belong to that module."""
        return self.adapters_disabled or self.adapter is not None

    def train(self, mode: bool = True) -> LogpsModel:
        if not self.is_view:
            super().train(mode)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> LogpsModel:
        if not self.is_view:
            super().requires_grad_(requires_grad)
        return self

    def forward(self, tokens: Tensor, targets: Tensor, mask: Tensor, **kwargs) -> Tensor:
        if self.adapters_disabled:
            context = self.model.disable_adapter()
        elif self.adapter is not None:
            context = active_adapter(self.model, self.adapter)
        else:
            context = contextlib.nullcontext()
        with context:
            return scored_logps(self.model, tokens, targets, mask, chunk_size=self.chunk_size, **kwargs)


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str):
    """Run a PEFT model with its adapter set `name` instead of the active one, switching each LoRA layer's active
    adapter and nothing else. Not peft's `set_adapter`: it also flips the adapters' requires_grad, and FSDP2 keeps
    the requires_grad its unsharded parameters had at their first all-gather."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    active = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = name
    try:
        yield
    finally:
        for layer, previous in zip(layers, active, strict=True):
            layer._active_adapter = previous


def core_model(model: nn.Module) -> nn.Module:
    """The model a trainer holds, without its DDP / compile / LogpsModel wrappers (PEFT kept)."""
    model = unwrap(model)[0]
    return unwrap(model.model)[0] if isinstance(model, LogpsModel) else model
