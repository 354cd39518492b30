"""x-transformers' `AutoregressiveWrapper`: code written for x-transformers runs as is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ray_dpo.core.sampling import FilterFn, Prompts, beam_search, generate, identity, top_k


class AutoregressiveWrapper(nn.Module):
    """x-transformers' `AutoregressiveWrapper` surface: `generate`, `beam_search` and the next-token loss.

    Differences from the seed, all fixes: variable-length prompts are masked instead of attended as pads,
    beam search supports eos, `generator` makes sampling reproducible. Prompts may be (B, N) or (N,).
    """

    def __init__(self, net: nn.Module, ignore_index: int = -100, pad_value: int = 0):
        super().__init__()
        self.net, self.ignore_index, self.pad_value = net, ignore_index, pad_value
        config = getattr(net, "config", None)
        self.max_seq_len = getattr(net, "max_seq_len", getattr(config, "max_seq_len", None))

    def generate(
        self,
        prompts: Prompts,
        seq_len: int,
        eos_token: int | None = None,
        temperature: float = 1.0,
        prompt_lens: Tensor | None = None,
        filter_logits_fn: str | FilterFn = top_k,  # the seed's default
        restrict_to_max_seq_len: bool = True,
        amateur_model: nn.Module | Sequence[nn.Module] | None = None,
        filter_kwargs: dict | None = None,
        contrastive_decode_kwargs: dict | Sequence[dict] | None = None,
        cache_kv: bool = True,
        generator: torch.Generator | None = None,
        padding_side: Literal["left", "right"] = "right",
    ) -> Tensor:
        single = isinstance(prompts, Tensor) and prompts.dim() == 1
        out = generate(
            self.net,
            prompts.unsqueeze(0) if single else prompts,
            seq_len,
            temperature=temperature,
            filter_logits_fn=filter_logits_fn,
            filter_kwargs=filter_kwargs,
            eos_token=eos_token,
            pad_id=self.pad_value,
            prompt_lens=prompt_lens,
            padding_side=padding_side,
            cache_kv=cache_kv,
            generator=generator,
            amateur_model=amateur_model,
            contrastive_decode_kwargs=contrastive_decode_kwargs,
            restrict_to_max_seq_len=restrict_to_max_seq_len,
        )
        return out[0] if single else out

    def beam_search(
        self,
        prompts: Prompts,
        seq_len: int,
        beams: int = 4,
        return_beams_and_scores: bool = False,
        eos_token: int | None = None,
        temperature: float = 1.0,
        stochastic: bool = False,
        prompt_lens: Tensor | None = None,
        filter_logits_fn: str | FilterFn | None = identity,
        restrict_to_max_seq_len: bool = True,
        filter_kwargs: dict | None = None,
        cache_kv: bool = True,
        length_penalty: float = 1.0,
        generator: torch.Generator | None = None,
        padding_side: Literal["left", "right"] = "right",
    ) -> Tensor | tuple[Tensor, Tensor]:
        single = isinstance(prompts, Tensor) and prompts.dim() == 1
        result = beam_search(
            self.net,
            prompts.unsqueeze(0) if single else prompts,
            seq_len,
            beams,
            eos_token=eos_token,
            length_penalty=length_penalty,
            return_beams_and_scores=return_beams_and_scores,
            temperature=temperature,
            stochastic=stochastic,
            filter_logits_fn=filter_logits_fn,
            filter_kwargs=filter_kwargs,
            pad_id=self.pad_value,
            prompt_lens=prompt_lens,
            padding_side=padding_side,
            cache_kv=cache_kv,
            generator=generator,
            restrict_to_max_seq_len=restrict_to_max_seq_len,
        )
        if not single:
            return result
        if return_beams_and_scores:
            return result[0][:, 0], result[1][:, 0]
        return result[0]

    def forward(self, x: Tensor, return_outputs: bool = False, lens: Tensor | None = None):
        """Next-token cross-entropy over (B, N) tokens; positions >= lens (or equal to ignore_index) are ignored."""
        if lens is not None:
            x = x.masked_fill(torch.arange(x.shape[1], device=x.device) >= lens.unsqueeze(-1), self.ignore_index)
        inp, target = x.masked_fill(x == self.ignore_index, self.pad_value), x[:, 1:]
        logits = self.net(inp)[:, :-1]
        loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=self.ignore_index)
        return (loss, logits) if return_outputs else loss
