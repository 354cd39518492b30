"""Decoding: greedy, temperature, top-k / top-p / min-p / top-a, beam search with eos, contrastive decoding.

`generate(model, prompts, seq_len, ...)` and `beam_search(...)` return only the new tokens. They use
`TransformerLM`'s preallocated KV cache, per-row RoPE positions and padding masks, and also work (recomputing the
whole prefix each step) with any module mapping tokens (B, N) to logits (B, N, V), and with Hugging Face causal LMs
(their own KV cache). x-transformers' wrapper is `ray_dpo.core.compat.AutoregressiveWrapper`.

Batch layout: prompts are LEFT-padded so every row shares one cache length (the cache has a single `length`);
pad keys are masked and each row's positions are shifted so its first real token sits at position 0. A row's
output therefore does not depend on the other rows of its batch.

Speed: a TransformerLM steps through `ray_dpo.core.decode_step.DecodeStep`, its forward fused for one token per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from ray_dpo.core.decode_step import DecodeMode, DecodeStep, fusable
from ray_dpo.core.kinds import is_hf
from ray_dpo.core.tokenizer import ByteTokenizer

Prompts = Tensor | Sequence[Tensor]
FilterFn = Callable[..., Tensor]

# --------------------------------------------------------------------------------------------------------------
# logit filters (seed semantics; they act on the last dim and return logits with dropped tokens at -inf)


def top_k(logits: Tensor, frac_num_tokens: float = 0.1, k: int | None = None) -> Tensor:
    """Keep the k largest logits; k defaults to ceil(frac_num_tokens * vocab)."""
    num_tokens = logits.shape[-1]
    k = math.ceil(frac_num_tokens * num_tokens) if k is None else k
    if k < 1:  # the seed silently turns every logit into -inf (NaN probabilities)
        raise ValueError(f"top_k: k must be >= 1, got {k}")
    values, indices = logits.topk(min(k, num_tokens), dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def top_p(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Nucleus: the smallest top set whose probability exceeds `thres` (the token crossing it is kept)."""
    sorted_logits, sorted_indices = logits.sort(dim=-1, descending=True)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # shifted by one: a token is dropped only if the mass *before* it already exceeds thres (the top one never is)
    sorted_logits[..., 1:].masked_fill_(cum_probs[..., :-1] > thres, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_indices, sorted_logits)


def min_p(logits: Tensor, min_p: float = 0.1) -> Tensor:
    """Drop tokens with p < min_p * p_max (Nguyen et al. 2024, arXiv:2407.01082)."""
    probs = logits.softmax(dim=-1)
    limit = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < limit, float("-inf"))


def top_a(logits: Tensor, min_p_pow: float = 2.0, min_p_ratio: float = 0.02) -> Tensor:
    """Drop tokens with p < min_p_ratio * p_max ** min_p_pow."""
    probs = logits.softmax(dim=-1)
    limit = probs.amax(dim=-1, keepdim=True).pow(min_p_pow) * min_p_ratio
    return logits.masked_fill(probs < limit, float("-inf"))


FILTER_LOGITS_FN: dict[str, FilterFn] = {"top_k": top_k, "top_p": top_p, "min_p": min_p, "top_a": top_a}


def identity(logits: Tensor, *args, **kwargs) -> Tensor:
    return logits


def contrastive_decode_fn(
    expert_logits: Tensor, amateur_logits: Tensor, alpha: float = 0.1, beta: float = 0.5
) -> Tensor:
    """(1 + beta) * expert - beta * amateur, restricted to tokens with expert logit >= ln(alpha) + max(expert).

    O'Brien & Lewis 2023 (arXiv:2309.09117), appendix A, algorithm 2. Implausible tokens get the most negative
    finite value (as the seed), so the arg-max expert token always survives and softmax never sees all -inf.
    """
    cutoff = math.log(alpha) + expert_logits.amax(dim=-1, keepdim=True)
    diffs = (1 + beta) * expert_logits - beta * amateur_logits
    return diffs.masked_fill(expert_logits < cutoff, -torch.finfo(expert_logits.dtype).max)


def _resolve_filter(filter_logits_fn: str | FilterFn | None) -> FilterFn | None:
    if isinstance(filter_logits_fn, str):
        if filter_logits_fn not in FILTER_LOGITS_FN:
            raise ValueError(f"filter_logits_fn={filter_logits_fn!r}: choose one of {', '.join(FILTER_LOGITS_FN)}")
        return FILTER_LOGITS_FN[filter_logits_fn]
    return None if filter_logits_fn is identity else filter_logits_fn


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    filter_fn: FilterFn | None = None,
    filter_kwargs: dict | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, V) logits -> (B,) tokens. temperature 0 is greedy; the filter sees unscaled logits (as the seed)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if filter_fn is not None:
        logits = filter_fn(logits, **(filter_kwargs or {}))
    probs = (logits if temperature == 1 else logits / temperature).softmax(dim=-1)  # x / 1 == x: one kernel fewer
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------------------------------
# prompts -> one left-padded (B, P) tensor + lengths


def _prepare_prompts(
    prompts: Prompts, prompt_lens: Tensor | None, padding_side: Literal["left", "right"]
) -> tuple[Tensor, Tensor]:
    if isinstance(prompts, Tensor) and prompts.dim() == 2:
        b, n = prompts.shape
        if prompt_lens is None:
            return prompts, torch.full((b,), n, device=prompts.device)
        lens = torch.as_tensor(prompt_lens, device=prompts.device)
        if int(lens.min()) < 1 or int(lens.max()) > n:
            raise ValueError(f"prompt_lens must lie in [1, {n}], got {lens.tolist()}")
        shift = (n - lens).unsqueeze(-1)
        idx = torch.arange(n, device=prompts.device) - shift  # left-aligned source index of each target slot
        if padding_side == "right":
            tokens = prompts.gather(1, idx.clamp(min=0))
        elif padding_side == "left":
            tokens = prompts
        else:
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        # pad slots get token 0: masked anyway, and pad_id may lie outside the model's vocabulary
        tokens = tokens.masked_fill(idx < 0, 0)
        return tokens[:, n - int(lens.max()) :], lens
    if prompt_lens is not None:
        raise ValueError("prompt_lens is derived from the list of prompts; pass one or the other")
    if isinstance(prompts, Tensor) or len(prompts) == 0:
        raise ValueError("prompts: a (B, N) tensor or a non-empty list of 1-D tensors")
    lens = torch.tensor([len(p) for p in prompts], device=prompts[0].device)
    if int(lens.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    tokens = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long, device=prompts[0].device)
    for row, prompt in enumerate(prompts):
        tokens[row, tokens.shape[1] - len(prompt) :] = prompt
    return tokens, lens


def _has_cache_api(model: Callable) -> bool:
    """Our protocol (TransformerLM): `init_cache`, and forward takes positions / attn_mask / cache."""
    return callable(getattr(model, "init_cache", None))


@contextmanager
def _eval_mode(*models: Callable):
    modules = [m for m in models if isinstance(m, nn.Module)]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was_training, strict=True):
            m.train(training)


# --------------------------------------------------------------------------------------------------------------
# one model fed token by token


class _Decoder:
    """Feeds a left-padded batch to one model; `prefill()` / `step(token)` return next-token logits (B, V).

    With the cache API: one prefill forward into a cache sized for the whole generation, then one single-token step
    per new token. A `TransformerLM` steps through `DecodeStep` (its forward fused for one token); another model
    with the cache API through its forward, with a slice of a preallocated key-padding mask when a row is padded.
    Without a cache the whole prefix is recomputed every step.
    """

    def __init__(
        self,
        model: Callable,
        tokens: Tensor,
        lens: Tensor,
        max_new: int,
        cache_kv: bool,
        crop: int | None,
        decode: DecodeMode = "eager",
    ):
        self.model, self.hf = model, is_hf(model)  # its own KV cache, padding mask, position ids
        self.capable = _has_cache_api(model) or self.hf
        b, p = tokens.shape
        total = p + max_new
        self.seq = tokens.new_zeros(b, total)  # every token fed so far (the uncached path re-reads it)
        self.seq[:, :p] = tokens
        self.n = p
        pad = p - lens
        self.padded = bool((pad > 0).any())
        if self.padded and not self.capable:
            raise ValueError("a model without positions/attn_mask support needs equal-length prompts")
        slots = torch.arange(total, device=tokens.device)
        self.key_valid = slots >= pad.unsqueeze(-1) if self.padded else None  # (B, total)
        self.positions = (slots - pad.unsqueeze(-1)).clamp(min=0) if self.padded else slots
        self.cache = model.init_cache(b, total) if cache_kv and self.capable and not self.hf else None
        self.hf_cache = None  # a Hugging Face model's past_key_values, grown by its own forward
        self.crop = None if self.capable else crop
        self.cache_kv = cache_kv
        self.fused = None
        if self.cache is not None and fusable(model, tokens.device):
            self.fused = DecodeStep(model, self.cache, self.positions, self.key_valid, decode)
        elif decode != "eager":
            raise ValueError(f"decode={decode!r} needs a TransformerLM with the KV cache on, outside autocast")

    def _block_mask(self, n: int) -> Tensor:
        # causal & not-a-pad-key; pad queries see themselves so no softmax row is all False (NaN in SDPA)
        causal = torch.ones(n, n, dtype=torch.bool, device=self.seq.device).tril()
        return (causal & self.key_valid[:, None, None, :n]) | torch.eye(n, dtype=torch.bool, device=self.seq.device)

    def _hf(self, tokens: Tensor, start: int, cache: bool) -> Tensor:
        """Logits of the last of `tokens` (fed from slot `start` on) from a Hugging Face model, with its cache."""
        end = start + tokens.shape[1]
        mask = self.key_valid[:, :end].long() if self.padded else None
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=self.positions[:, start:end] if self.padded else None,
            past_key_values=self.hf_cache if cache else None,
            use_cache=cache,
        )
        if cache:
            self.hf_cache = out.past_key_values
        return out.logits[:, -1]

    def _full(self, cache) -> Tensor:
        x, n = self.seq[:, : self.n], self.n
        if self.hf:
            return self._hf(x, 0, self.cache_kv)
        if not self.capable:
            return self.model(x[:, -self.crop :] if self.crop else x)[:, -1]
        if not self.padded:
            return self.model(x, cache=cache)[:, -1]
        return self.model(x, positions=self.positions[:, :n], attn_mask=self._block_mask(n), cache=cache)[:, -1]

    def prefill(self) -> Tensor:
        return _float(self._full(self.cache))

    def step(self, token: Tensor) -> Tensor:
        n = self.n
        self.n += 1
        if self.hf and self.cache_kv:
            return _float(self._hf(token.unsqueeze(-1), n, True))
        if self.cache is None:  # only the uncached path re-reads the sequence
            self.seq[:, n] = token
            return _float(self._full(None))
        if self.fused is not None:
            return _float(self.fused(token))
        if not self.padded:
            return _float(self.model(token.unsqueeze(-1), cache=self.cache)[:, -1])
        positions, mask = self.positions[:, n : n + 1], self.key_valid[:, None, None, : n + 1]
        return _float(self.model(token.unsqueeze(-1), positions=positions, attn_mask=mask, cache=self.cache)[:, -1])

    def reorder(self, rows: Tensor) -> None:
        if self.padded:
            self.key_valid, self.positions = self.key_valid.index_select(0, rows), self.positions.index_select(0, rows)
        if self.hf_cache is not None:
            self.hf_cache.reorder_cache(rows)
            return
        if self.cache is None:  # only the uncached path re-reads the sequence
            self.seq = self.seq.index_select(0, rows)
            return
        self.cache.reorder(rows)
        if self.fused is not None:
            self.fused.reorder(rows)


def _float(logits: Tensor) -> Tensor:
    # sample and score in at least fp32 (bf16 autocast logits), keep fp64 when the model runs in it
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _by_length(fn: Callable[[Tensor, Tensor], tuple[Tensor, ...]], tokens: Tensor, lens: Tensor, pad_id: int):
    """Run `fn` per group of equal prompt length (models without a padding mask); reassemble in row order.

    fn returns tensors with the batch first; the first holds tokens along its last dim (groups differ in width).
    """
    groups = [(lens == length).nonzero().squeeze(-1) for length in lens.unique().tolist()]
    results = [fn(tokens[rows][:, tokens.shape[1] - int(lens[rows[0]]) :], lens[rows]) for rows in groups]
    width = max(r[0].shape[-1] for r in results)
    merged = []
    for i in range(len(results[0])):
        first = results[0][i]
        shape = (len(lens), *first.shape[1:-1], width) if i == 0 else (len(lens), *first.shape[1:])
        out = first.new_full(shape, pad_id) if i == 0 else first.new_empty(shape)
        for rows, r in zip(groups, results, strict=True):
            out[rows, ..., : r[i].shape[-1]] = r[i]
        merged.append(out)
    return tuple(merged)


# --------------------------------------------------------------------------------------------------------------
# sampling


def generate(
    model: Callable,
    prompts: Prompts,
    seq_len: int,
    *,
    temperature: float = 1.0,
    filter_logits_fn: str | FilterFn | None = None,
    filter_kwargs: dict | None = None,
    eos_token: int | None = None,
    pad_id: int = ByteTokenizer.pad_id,
    prompt_lens: Tensor | None = None,
    padding_side: Literal["left", "right"] = "right",
    cache_kv: bool = True,
    generator: torch.Generator | None = None,
    amateur_model: Callable | Sequence[Callable] | None = None,
    contrastive_decode_kwargs: dict | Sequence[dict] | None = None,
    restrict_to_max_seq_len: bool = True,
    decode: DecodeMode = "eager",
) -> Tensor:
    """Sample up to `seq_len` new tokens per prompt; returns them as (B, <= seq_len).

    prompts: a list of 1-D tensors, or a (B, N) tensor (padded on `padding_side` when `prompt_lens` is given).
    temperature 0 is greedy. filter_logits_fn: 'top_k' | 'top_p' | 'min_p' | 'top_a' | callable, with
    filter_kwargs. eos_token: a row stops at its first generated eos (the eos is kept, later slots are pad_id);
    the output is trimmed to the longest row. amateur_model: one or several models for contrastive decoding,
    applied in turn with their contrastive_decode_kwargs (default alpha=0.1, beta=0.5); disables the filter as
    the seed does. restrict_to_max_seq_len: for cache-less modules with `max_seq_len`, feed only that many last
    tokens (the seed's sliding window; our model uses RoPE and a cache sized for the whole sequence instead).
    decode: how a TransformerLM's single-token step runs: "eager" (fused kernels, the default) or "compile"
    (torch.compile; on a 2-core CPU slower than eager, and seconds of compiling per shape).
    """
    amateurs = () if amateur_model is None else _as_tuple(amateur_model)
    cd_kwargs = _contrastive_kwargs(contrastive_decode_kwargs, len(amateurs))
    filter_fn = None if amateurs else _resolve_filter(filter_logits_fn)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    tokens, lens = _prepare_prompts(prompts, prompt_lens, padding_side)
    models = (model, *amateurs)

    def run(tokens: Tensor, lens: Tensor) -> tuple[Tensor]:
        crop = [getattr(m, "max_seq_len", None) if restrict_to_max_seq_len else None for m in models]
        decoders = [_Decoder(m, tokens, lens, seq_len, cache_kv, c, decode) for m, c in zip(models, crop, strict=True)]
        return (
            _sample_loop(
                decoders, cd_kwargs, seq_len, temperature, filter_fn, filter_kwargs, eos_token, pad_id, generator
            ),
        )

    with _eval_mode(*models), torch.inference_mode():
        if not all(map(_has_cache_api, models)) and int(lens.min()) != int(lens.max()):
            out = _by_length(run, tokens, lens, pad_id)[0]
        else:
            out = run(tokens, lens)[0]
    return out.clone()  # a normal tensor: inference tensors cannot enter autograd (e.g. a DPO step on samples)


def _sample_loop(decoders, cd_kwargs, seq_len, temperature, filter_fn, filter_kwargs, eos_token, pad_id, generator):
    b, device = decoders[0].seq.shape[0], decoders[0].seq.device
    out = torch.full((b, seq_len), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    emitted = torch.zeros(b, dtype=torch.long, device=device)  # tokens written per row, eos included
    check_every = 1 if device.type == "cpu" else 8  # `.all()` is a host sync on accelerators
    logits, token = [d.prefill() for d in decoders], out[:, 0]
    for t in range(seq_len):
        if t:
            logits = [d.step(token) for d in decoders]
        next_logits = logits[0]
        for amateur_logits, kwargs in zip(logits[1:], cd_kwargs, strict=True):
            next_logits = contrastive_decode_fn(next_logits, amateur_logits, **kwargs)
        token = sample_next(next_logits, temperature, filter_fn, filter_kwargs, generator)
        if eos_token is None:
            out[:, t] = token
            continue
        out[:, t] = token.masked_fill(finished, pad_id)  # finished rows keep decoding (batch shape) but write pad
        emitted += ~finished
        finished |= token == eos_token
        if (t + 1) % check_every == 0 and bool(finished.all()):
            break
    return out if eos_token is None else out[:, : int(emitted.max())]


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _contrastive_kwargs(kwargs: dict | Sequence[dict] | None, n: int) -> list[dict]:
    if kwargs is None:
        return [dict(alpha=0.1, beta=0.5)] * n
    kwargs = list(_as_tuple(kwargs))
    if len(kwargs) == 1:
        kwargs = kwargs * n
    if len(kwargs) != n:
        raise ValueError(f"{n} amateur models but {len(kwargs)} contrastive_decode_kwargs")
    return kwargs


# --------------------------------------------------------------------------------------------------------------
# beam search


def beam_search(
    model: Callable,
    prompts: Prompts,
    seq_len: int,
    beams: int = 4,
    *,
    eos_token: int | None = None,
    length_penalty: float = 1.0,
    return_beams_and_scores: bool = False,
    temperature: float = 1.0,
    stochastic: bool = False,
    filter_logits_fn: str | FilterFn | None = None,
    filter_kwargs: dict | None = None,
    pad_id: int = ByteTokenizer.pad_id,
    prompt_lens: Tensor | None = None,
    padding_side: Literal["left", "right"] = "right",
    cache_kv: bool = True,
    generator: torch.Generator | None = None,
    restrict_to_max_seq_len: bool = True,
    decode: DecodeMode = "eager",
) -> Tensor | tuple[Tensor, Tensor]:
    """Beam search; returns the best continuation (B, <= seq_len), or (beams, B, n) tokens and (beams, B) scores.

    Score = summed log-prob of the new tokens; with eos_token it is divided by length ** length_penalty (new
    tokens, eos included) and hypotheses ending in eos are kept aside, the search stopping for a row once no live
    beam can beat its `beams` finished ones. stochastic: candidates are picked by Gumbel-perturbed filtered
    logits / temperature (the seed's stochastic beam search) and ranked by their true scores. decode: as `generate`.
    """
    filter_fn = _resolve_filter(filter_logits_fn)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    tokens, lens = _prepare_prompts(prompts, prompt_lens, padding_side)
    crop = getattr(model, "max_seq_len", None) if restrict_to_max_seq_len else None

    def run(tokens: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        dec = _Decoder(model, tokens, lens, seq_len, cache_kv, crop, decode)
        opts = (eos_token, length_penalty, temperature, stochastic, filter_fn, filter_kwargs, pad_id, generator)
        return _beam_loop(dec, seq_len, beams, *opts)

    with _eval_mode(model), torch.inference_mode():
        if not _has_cache_api(model) and int(lens.min()) != int(lens.max()):
            out, scores = _by_length(run, tokens, lens, pad_id)
        else:
            out, scores = run(tokens, lens)
    out, scores = out.clone(), scores.clone()  # normal tensors, usable in autograd
    if not return_beams_and_scores:
        return out[:, 0]
    return out.transpose(0, 1), scores.transpose(0, 1)


def _beam_loop(
    dec, seq_len, k, eos_token, length_penalty, temperature, stochastic, filter_fn, filter_kwargs, pad_id, gen
):
    b, device = dec.seq.shape[0], dec.seq.device
    rows = torch.arange(b, device=device).unsqueeze(-1)
    log_probs = dec.prefill().log_softmax(dim=-1).repeat_interleave(k, dim=0)
    dec.reorder(rows.squeeze(-1).repeat_interleave(k))
    # only beam 0 is real at the start; the others' -inf keeps duplicates of its children out of the top k
    scores = torch.full((b, k), float("-inf"), dtype=log_probs.dtype, device=device)
    scores[:, 0] = 0.0
    hist = torch.full((b * k, seq_len), pad_id, dtype=torch.long, device=device)
    # finished hypotheses: a sorted pool of k per row (normalised score, tokens, length)
    pool_scores = torch.full_like(scores, float("-inf"))
    pool_tokens = torch.full((b, k, seq_len), pad_id, dtype=torch.long, device=device)
    pool_lens = torch.zeros(b, k, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    lp = length_penalty if eos_token is not None else 0.0  # without eos every hypothesis has the same length
    n_cand = min(2 * k, log_probs.shape[-1])  # 2k per beam: at most k candidates end in eos, k stay alive
    t = -1
    for t in range(seq_len):
        if t:
            log_probs = dec.step(hist[:, t - 1]).log_softmax(dim=-1)
        select = log_probs
        if stochastic and temperature > 0:
            select = filter_fn(log_probs, **(filter_kwargs or {})) if filter_fn else log_probs
            u = torch.rand(select.shape, generator=gen, device=device, dtype=select.dtype)
            select = select / temperature - (-(u.clamp(min=1e-20)).log()).clamp(min=1e-20).log()
        cand = select.topk(n_cand, dim=-1).indices  # (b*k, c)
        cand_scores = scores.view(-1, 1) + log_probs.gather(-1, cand)
        if select is not log_probs:  # never pick a token the filter dropped
            cand_scores = cand_scores.masked_fill(select.gather(-1, cand) == float("-inf"), float("-inf"))
        cand_scores = cand_scores.view(b, -1)
        top_scores, top = cand_scores.topk(min(2 * k, cand_scores.shape[-1]), dim=-1)  # (b, 2k)
        top_tokens, top_parents = cand.view(b, -1).gather(1, top), top // n_cand
        is_eos = top_tokens == eos_token if eos_token is not None else torch.zeros_like(top_tokens, dtype=torch.bool)

        if eos_token is not None:  # merge candidates ending in eos into the finished pool
            norm = (top_scores / (t + 1) ** lp).masked_fill(~is_eos | done.unsqueeze(-1), float("-inf"))
            cand_hist = hist.view(b, k, seq_len).gather(1, top_parents.unsqueeze(-1).expand(-1, -1, seq_len))
            cand_hist[:, :, t] = top_tokens
            pool_scores, keep = torch.cat((pool_scores, norm), dim=1).topk(k, dim=1)
            pool_tokens = torch.cat((pool_tokens, cand_hist), dim=1).gather(
                1, keep.unsqueeze(-1).expand(-1, -1, seq_len)
            )
            pool_lens = torch.cat((pool_lens, torch.full_like(top_tokens, t + 1)), dim=1).gather(1, keep)

        scores, alive = top_scores.masked_fill(is_eos, float("-inf")).topk(k, dim=1)
        parents = (rows * k + top_parents.gather(1, alive)).view(-1)
        hist = hist.index_select(0, parents)
        hist[:, t] = top_tokens.gather(1, alive).view(-1)
        if t + 1 == seq_len:
            break
        dec.reorder(parents)
        if eos_token is not None:
            # log-probs only fall, so a live beam's best future normalised score is its score at the most
            # favourable remaining length; the row is done once the pool is full and none can beat it
            bound = torch.maximum(scores / (t + 2) ** lp, scores / seq_len**lp).amax(dim=1)
            done |= (pool_scores[:, -1] > float("-inf")) & (pool_scores[:, -1] >= bound)
            if bool(done.all()):
                break

    # live beams that ran out of length compete with the finished ones
    norm = (scores / (t + 1) ** lp).masked_fill(done.unsqueeze(-1), float("-inf"))
    pool_scores, keep = torch.cat((pool_scores, norm), dim=1).topk(k, dim=1)
    pool_tokens = torch.cat((pool_tokens, hist.view(b, k, seq_len)), dim=1).gather(
        1, keep.unsqueeze(-1).expand(-1, -1, seq_len)
    )
    pool_lens = torch.cat((pool_lens, torch.full_like(scores, t + 1, dtype=torch.long)), dim=1).gather(1, keep)
    return pool_tokens[..., : int(pool_lens.max())], pool_scores
