"""What a training worker optimises: a `Task` turns collated rows into (loss sum, metric sums, count, tokens).

Two tasks run on the same loop (`train.loop`): `dpo` (the preference loss of `ray_dpo.core.dpo.DPO`) and `sft`
(NLL of response tokens, the warm start that becomes the reference: the DPO paper's "Preferred-FT").
Sums, not means: the loop divides by the count of the GLOBAL batch, so the loss does not depend on how rows are
split over workers and micro-batches. Losses that read statistics of the batch (aot's sorts, bco_pair's reward
shift, sft's token mean) get them from the whole global batch (`Task.prepare`), for the same reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ray_dpo.core.dpo import DPO, mix_into, parameter_pairs
from ray_dpo.core.kinds import is_peft
from ray_dpo.core.logps import LogpsModel, core_model, scored_logps
from ray_dpo.core.losses import METRICS, BatchStats, PairLogps, RunningMean, batch_stats, gather_pairs
from ray_dpo.core.pairs import layout_tokens, response_mask_from_lengths, scored_counts
from ray_dpo.stages import models
from ray_dpo.stages.train import parallel, shard_load
from ray_dpo.stages.train.shard_load import ShardSpec
from ray_dpo.stages.train.spec import WorkerSpec

Batch = dict[str, Tensor]


@dataclass
class Task:
    """`collate` numpy rows -> tensors; `count(batch)` the units a batch holds (pairs for DPO, response tokens for
    SFT); `score(batch, training, context)` -> (loss_sum, metric_sums, count, tokens processed), sums over those
    units. Around them, for tasks that need it: `prepare(batches, training)` -> one `context` per micro-batch of a
    step, or of the validation split (every rank calls it, a collective); `after_step(step)` once the optimizer
    stepped; `state()` (JSON, into state.json) and `tensors()` (weights besides the model's, saved with it) are
    what a resume needs to continue. `ratios`: (metric, numerator, denominator) of sums `score` also returns,
    reported as the ratio of their sums over the global batch (the padded fraction: padding over the positions the
    model ran)."""

    collate: Callable[[dict[str, np.ndarray]], Batch]
    count: Callable[[Batch], float]
    score: Callable[[Batch, bool, Any], tuple[Tensor, dict[str, Tensor], float, float]]
    metric_names: tuple[str, ...]
    prepare: Callable[[list[Batch], bool], list[Any]] = lambda batches, training: [None] * len(batches)
    after_step: Callable[[int], None] = lambda step: None
    state: Callable[[], dict[str, Any]] = dict
    tensors: Callable[[], dict[str, Tensor]] = dict
    ratios: tuple[tuple[str, str, str], ...] = ()

    @property
    def summed(self) -> tuple[str, ...]:
        """Every sum `score` returns: the per-unit metrics, then the ratios' terms."""
        return (*self.metric_names, *dict.fromkeys(term for _, *terms in self.ratios for term in terms))

    def metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """Per-unit metrics and ratios from the global sums."""
        out = {k: sums[k] / max(count, 1.0) for k in self.metric_names}
        return out | {name: sums[num] / max(sums[den], 1.0) for name, num, den in self.ratios}


def live_reference(spec: WorkerSpec, model: nn.Module, device: torch.device) -> nn.Module | None:
    """The reference module of `dpo.reference=live` for a loss that uses one, else None."""
    d, t = spec.config.dpo, spec.config.train
    if d.reference != "live" or not d.uses_reference:
        return None  # reference-free: nothing loaded
    if is_peft(core_model(model)):  # LoRA: the same base, no second copy of it
        if d.sync_ref_model:  # TR-DPO: the adapter set the trained one is synced into
            return LogpsModel(core_model(model), adapter=models.REFERENCE_ADAPTER)
        return LogpsModel(core_model(model), adapters_disabled=True)  # the base with adapters off
    # identical on every rank: it comes from one checkpoint. bf16 halves its memory, unless TR-DPO updates it: a soft
    # update held in bf16 would round every mixture
    dtype = torch.bfloat16 if t.precision == "bf16" and not d.sync_ref_model else torch.float32
    if t.strategy == "fsdp":  # sharded like the policy: each rank holds and reads only its shard of it
        shards = ShardSpec(bf16_compute=False, dtype=dtype, frozen=True)
        return shard_load.build_sharded(spec.reference_checkpoint, device, spec=shards, seed=t.seed).eval()
    frozen = models.load(spec.reference_checkpoint, device, dtype=dtype).eval().requires_grad_(False)
    if t.compile:  # compiled like the policy: its forward is a quarter of a step's FLOPs
        frozen.compile()
    return LogpsModel(frozen)


def _no_rows(with_reference: bool, device: torch.device) -> PairLogps:
    """A rank's part of the global batch before its micro-batches: none, but with the columns every rank gathers
    (a rank may hold no validation rows)."""
    empty = torch.zeros(0, dtype=torch.float64, device=device)
    return PairLogps(empty, empty, empty, empty, *((empty, empty) if with_reference else ()))


def synced_tensors(model: nn.Module, reference: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """TR-DPO: name -> (reference tensor, policy tensor) that a sync mixes; a LoRA reference is its adapter set.
    Sharded (FSDP) tensors pair shard with shard: pair them after sharding."""
    if isinstance(reference, LogpsModel) and reference.adapter is not None:
        return {name: (ref, pol) for name, ref, pol in models.reference_adapter_pairs(core_model(model))}
    return parameter_pairs(reference, model)


def dpo_task(spec: WorkerSpec, model: nn.Module, device: torch.device, resumed: dict[str, Any]) -> Task:
    """`resumed`: `Task.state()` as the checkpoint a run resumes from saved it ({} on a fresh run)."""
    from ray_dpo.stages.data import PreferenceCollateFn  # imported on the worker: ray_dpo.stages.data pulls in Ray Data

    d = spec.config.dpo
    loss_spec = d.loss_spec()
    reference = live_reference(spec, model, device)
    pack_len = spec.config.data.pack_len if spec.config.data.packing else None
    kwargs = dict(
        pad_id=spec.pad_id,
        reference=d.reference,
        ref_model=reference,
        prefix_sharing=d.prefix_sharing,
        **d.loss_options(),
        pack_len=pack_len,
    )
    # validation (and the statistics pass) run the unwrapped module: ranks may hold different numbers of val rows,
    # DDP hooks would hang
    train_dpo, val_dpo = DPO(model, **kwargs), DPO(parallel.unwrap(model), **kwargs)
    running = RunningMean(**resumed.get("bco_running", {}))  # bco_pair's shift continues across a resume
    synced = synced_tensors(model, reference) if d.sync_ref_model else {}

    def prepare(batches: list[Batch], training: bool) -> list[tuple[BatchStats, tuple[Tensor, Tensor] | None] | None]:
        """The global batch's statistics (validation: the whole split's, so that val metrics do not depend on how
        its rows are split over ranks and micro-batches), each micro-batch's rows of them, and its reference
        log-probs when scored here (for the loss pass to reuse). A no-grad pass over this rank's micro-batches,
        gathered over ranks: every rank calls it, one with no rows too."""
        if not loss_spec.needs_batch_stats:
            return [None] * len(batches)
        with_reference = loss_spec.needs_policy_scores and val_dpo.reference != "none"  # as batch_pairs gives
        parts, references = [_no_rows(with_reference, device)], []
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                if loss_spec.needs_policy_scores:
                    pairs = val_dpo.batch_pairs(batch)
                    parts.append(pairs)
                    references.append(None if pairs.ref_chosen is None else (pairs.ref_chosen, pairs.ref_rejected))
                else:  # sft's token mean: the token counts are all it reads
                    chosen, rejected = scored_counts(batch)
                    zeros = torch.zeros(len(chosen), dtype=torch.float32, device=device)
                    parts.append(PairLogps(zeros, zeros, chosen, rejected))
                    references.append(None)
        everything, start = gather_pairs(PairLogps.cat(parts))  # on the device: NCCL rejects CPU tensors
        if training:
            stats = batch_stats(loss_spec, everything, running)  # once per optimizer step: the running mean moves
        else:  # the reward shift training has reached, not the split's own (unless nothing trained yet)
            stats = batch_stats(loss_spec, everything)
            if loss_spec.bco_reward_shift and running.count:
                stats.bco_shift = torch.tensor(running.mean, dtype=torch.float64, device=device)
        contexts = []
        for part, ref in zip(parts[1:], references, strict=True):
            contexts.append((stats.rows(start, start + len(part)), ref))
            start += len(part)
        return contexts

    def score(batch: Batch, training: bool, context=None):
        positions, pair_tokens = layout_tokens(batch, prefix_sharing=d.prefix_sharing, pack_len=pack_len)  # host
        batch = {k: v.to(device) for k, v in batch.items()}
        stats, ref = context if context is not None else (None, None)
        dpo = train_dpo if training else val_dpo
        pairs = dpo.batch_pairs(batch, reference=ref)
        out = dpo.loss(pairs, stats)
        n = out.count
        tokens = (2 * batch["prompt_len"] + batch["chosen_len"] + batch["rejected_len"]).sum().item()
        sums = {k: out.metrics[k] * n for k in METRICS}
        sums |= {"padding_tokens": float(positions - pair_tokens), "input_positions": float(positions)}
        return out.loss * n, sums, float(n), float(tokens)

    def after_step(step: int) -> None:
        if d.sync_ref_model and step % d.ref_model_sync_steps == 0:
            # under FSDP: the shards are what is mixed, and what the next forward gathers
            parallel.reshard(model)
            if reference is not None:
                parallel.reshard(reference)
            mix_into(list(synced.values()), d.ref_model_mixup_alpha)

    return Task(
        collate=PreferenceCollateFn(spec.pad_id),
        count=lambda batch: float(batch["chosen"].shape[0]),
        score=score,
        metric_names=METRICS,
        prepare=prepare,
        after_step=after_step,
        state=lambda: {"bco_running": dataclasses.asdict(running)} if loss_spec.bco_reward_shift else {},
        tensors=lambda: {name: ref for name, (ref, _) in synced.items()},
        ratios=(("padded_fraction", "padding_tokens", "input_positions"),),
    )


def _sft_mask(batch: Batch) -> Tensor:
    tokens = batch["tokens"]
    return response_mask_from_lengths(tokens.shape[1], batch["prompt_len"], batch["response_len"])[:, 1:]


def sft_task(spec: WorkerSpec, model: nn.Module, device: torch.device, resumed: dict[str, Any]) -> Task:
    from ray_dpo.stages.data import SFTCollateFn

    def score(batch: Batch, training: bool, context=None):
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


TASKS: dict[str, Callable[[WorkerSpec, nn.Module, torch.device, dict[str, Any]], Task]] = {
    "dpo": dpo_task,
    "sft": sft_task,
}
