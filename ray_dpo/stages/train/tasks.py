"""What a training worker optimises: a `Task` turns collated rows into (loss sum, metric sums, count, tokens).

Two tasks run on the same loop (`train.loop`): `dpo` (the preference loss of `ray_dpo.core.dpo.DPO`) and `sft`
(NLL of response tokens, the warm start that becomes the reference: the DPO paper's "Preferred-FT").
Sums, not means: the loop divides by the count of the GLOBAL batch, so the loss does not depend on how rows are
split over workers and micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ray_dpo.core.dpo import DPO
from ray_dpo.core.kinds import is_peft
from ray_dpo.core.logps import LogpsModel, core_model, scored_logps
from ray_dpo.core.pairs import layout_tokens, response_mask_from_lengths
from ray_dpo.stages import models
from ray_dpo.stages.train import parallel, shard_load
from ray_dpo.stages.train.shard_load import ShardSpec
from ray_dpo.stages.train.spec import WorkerSpec

DPO_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class Task:
    """`collate` numpy rows -> tensors; `count(batch)` the units a batch holds (pairs for DPO, response tokens for
    SFT); `score(batch, training)` -> (loss_sum, metric_sums, count, tokens processed), sums over those units.
    `ratios`: (metric, numerator, denominator) of sums `score` also returns, reported as the ratio of their sums
    over the global batch (the padded fraction: padding over the positions the model ran)."""

    collate: Callable[[dict[str, np.ndarray]], dict[str, Tensor]]
    count: Callable[[dict[str, Tensor]], float]
    score: Callable[[dict[str, Tensor], bool], tuple[Tensor, dict[str, Tensor], float, float]]
    metric_names: tuple[str, ...]
    ratios: tuple[tuple[str, str, str], ...] = ()

    @property
    def summed(self) -> tuple[str, ...]:
        """Every sum `score` returns: the per-unit metrics, then the ratios' terms."""
        return (*self.metric_names, *dict.fromkeys(term for _, *terms in self.ratios for term in terms))

    def metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """Per-unit metrics and ratios from the global sums."""
        out = {k: sums[k] / max(count, 1.0) for k in self.metric_names}
        return out | {name: sums[num] / max(sums[den], 1.0) for name, num, den in self.ratios}


def dpo_task(spec: WorkerSpec, model: nn.Module, device: torch.device) -> Task:
    from ray_dpo.stages.data import PreferenceCollateFn  # imported on the worker: ray_dpo.stages.data pulls in Ray Data

    d, t = spec.config.dpo, spec.config.train
    pack_len = spec.config.data.pack_len if spec.config.data.packing else None
    reference = None
    if d.reference == "live" and is_peft(core_model(model)):  # the base with adapters off: no second copy of it
        reference = LogpsModel(core_model(model), adapters_disabled=True)
    elif d.reference == "live":  # identical on every rank: it comes from one checkpoint; bf16 halves its memory
        dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
        if t.strategy == "fsdp":  # sharded like the policy: each rank holds and reads only its shard of it
            shards = ShardSpec(bf16_compute=False, dtype=dtype, frozen=True)
            reference = shard_load.build_sharded(spec.reference_checkpoint, device, spec=shards, seed=t.seed).eval()
        else:
            frozen = models.load(spec.reference_checkpoint, device, dtype=dtype).eval().requires_grad_(False)
            if t.compile:  # compiled like the policy: its forward is a quarter of a step's FLOPs
                frozen.compile()
            reference = LogpsModel(frozen)
    kwargs = dict(
        beta=d.beta,
        pad_id=spec.pad_id,
        loss_type=d.loss_type,
        label_smoothing=d.label_smoothing,
        rpo_alpha=d.rpo_alpha,
        reference=d.reference,
        ref_model=reference,
        reduction=d.reduction,
        prefix_sharing=d.prefix_sharing,
        pack_len=pack_len,
    )
    # validation runs the unwrapped module: ranks may hold different numbers of val rows, DDP hooks would hang
    train_dpo, val_dpo = DPO(model, **kwargs), DPO(parallel.unwrap(model), **kwargs)

    def score(batch: dict[str, Tensor], training: bool):
        positions, pair_tokens = layout_tokens(batch, prefix_sharing=d.prefix_sharing, pack_len=pack_len)  # host
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, metrics = (train_dpo if training else val_dpo).batch_loss(batch)
        n = batch["chosen"].shape[0]
        tokens = (2 * batch["prompt_len"] + batch["chosen_len"] + batch["rejected_len"]).sum().item()
        sums = {k: metrics[k] * n for k in DPO_METRICS}
        sums |= {"padding_tokens": float(positions - pair_tokens), "input_positions": float(positions)}
        return loss * n, sums, float(n), float(tokens)

    return Task(
        collate=PreferenceCollateFn(spec.pad_id),
        count=lambda batch: float(batch["chosen"].shape[0]),
        score=score,
        metric_names=DPO_METRICS,
        ratios=(("padded_fraction", "padding_tokens", "input_positions"),),
    )


def _sft_mask(batch: dict[str, Tensor]) -> Tensor:
    tokens = batch["tokens"]
    return response_mask_from_lengths(tokens.shape[1], batch["prompt_len"], batch["response_len"])[:, 1:]


def sft_task(spec: WorkerSpec, model: nn.Module, device: torch.device) -> Task:
    from ray_dpo.stages.data import SFTCollateFn

    def score(batch: dict[str, Tensor], training: bool):
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens, mask = batch["tokens"], _sft_mask(batch)
        logps = scored_logps(model if training else parallel.unwrap(model), tokens[:, :-1], tokens[:, 1:], mask)
        nll_sum = -logps.sum()  # 0 where not scored
        processed = (batch["prompt_len"] + batch["response_len"]).sum().item()
        return nll_sum, {"loss": nll_sum.detach()}, float(mask.sum().item()), float(processed)

    return Task(
        collate=SFTCollateFn(spec.pad_id),
        count=lambda batch: float(_sft_mask(batch).sum().item()),  # normalise by GLOBAL response tokens
        score=score,
        metric_names=("loss",),
    )


TASKS: dict[str, Callable[[WorkerSpec, nn.Module, torch.device], Task]] = {"dpo": dpo_task, "sft": sft_task}
