"""Pair scoring on an actor pool: sequence log-probs of chosen and rejected responses under one or more models.

`score_pairs_pool(dataset, {"ref": checkpoint}, ...)` adds `<name>_chosen_logp` and `<name>_rejected_logp` to every
row of a `read_preferences` dataset: the reference pass (`add_reference_logps`: columns `ref_chosen_logp`,
`ref_rejected_logp`, so training workers hold only the policy, `dpo.reference=precomputed`). Each actor loads its
models ONCE (a callable class in `map_batches`); the scoring itself is `ray_dpo.core.pairs.score_batch`, the
trainer's. Rows go through as Arrow tables, so their token columns reach the trainer with their types.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import ray
import torch
from ray.data.dataset import MaterializedDataset
from ray.train import Checkpoint
from torch import nn

from ray_dpo.core.pairs import score_batch
from ray_dpo.errors import UserError
from ray_dpo.stages import models as loader
from ray_dpo.stages.data import collate_preferences

Model = str | os.PathLike | Checkpoint | nn.Module  # a checkpoint (directory, URI, staged) or a module (pickled)


class PairScorer:
    """Ray Data callable class: `{name: model}`, loaded once per actor; adds `<name>_{chosen,rejected}_logp`."""

    def __init__(self, models: dict[str, Model], *, prefix_sharing: bool, device: str, bf16: bool):
        loader.reuse_freed_memory()
        self.device = torch.device(device)
        dtype = torch.bfloat16 if bf16 else None  # as the trainer holds a live reference
        self.models = {
            name: (m if isinstance(m, nn.Module) else loader.load(m, self.device, dtype=dtype))
            .to(self.device, dtype=dtype)
            .eval()
            .requires_grad_(False)
            for name, m in models.items()
        }
        self.prefix_sharing = prefix_sharing
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The rows as they came (Arrow in, Arrow out: token columns keep their list<int32> type for the trainer's
        collate), plus the log-prob columns."""
        rows = {k: batch[k].to_numpy(zero_copy_only=False) for k in ("prompt", "chosen", "rejected")}
        # pad id 0 is a valid id for any vocabulary; padding is right of every scored token, so under a causal
        # model its value cannot change the result (the masks come from the lengths, not from pad_id)
        tensors = {k: v.to(self.device) for k, v in collate_preferences(rows, pad_id=0).items()}
        with torch.inference_mode(), self.autocast:
            for name, model in self.models.items():
                scored = score_batch(model, tensors, prefix_sharing=self.prefix_sharing)
                chosen, rejected = scored.sequence("sum")  # sums: each loss normalises them itself
                batch = batch.append_column(f"{name}_chosen_logp", pa.array(chosen.float().cpu().numpy()))
                batch = batch.append_column(f"{name}_rejected_logp", pa.array(rejected.float().cpu().numpy()))
        return batch


def score_pairs_pool(
    dataset: ray.data.Dataset,
    models: dict[str, Model],
    *,
    prefix_sharing: bool = False,
    bf16: bool = False,
    batch_size: int = 32,
    concurrency: int = 1,
    num_gpus: float = 0,
    num_cpus: float | None = None,
) -> MaterializedDataset:
    """`dataset` with `<name>_chosen_logp`, `<name>_rejected_logp` (float32) for each model, MATERIALIZED, row order
    kept. concurrency: actors in the pool; num_gpus per actor (> 0 puts the models on cuda); num_cpus per actor,
    default 0.5 on CPU so a 2-CPU machine keeps room for the read tasks (a pool of 1-CPU actors there can hang).
    The log-probs are sums over each response's tokens, whatever the loss (it divides by token counts itself);
    `bf16`: models held in bf16 and run under bf16 autocast, as the trainer's live reference under
    `train.precision=bf16`."""
    if concurrency < 1 or batch_size < 1:
        raise UserError(f"concurrency and batch_size must be >= 1, got {concurrency} and {batch_size}")
    for name, model in models.items():
        local = isinstance(model, (str, os.PathLike)) and not isinstance(model, Checkpoint)  # Checkpoint is PathLike
        if local and "://" not in str(model) and not Path(model).is_dir():
            raise UserError(f"{name} checkpoint: {model} is not a directory")
    if concurrency > 1 and isinstance(dataset, MaterializedDataset) and dataset.num_blocks() < concurrency:
        dataset = dataset.repartition(concurrency)  # one block feeds one actor: give every actor work
    scored = dataset.map_batches(
        PairScorer,
        fn_constructor_kwargs=dict(
            models=models,
            prefix_sharing=prefix_sharing,
            device="cuda" if num_gpus else "cpu",
            bf16=bf16,
        ),
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=num_cpus if num_cpus is not None else (1.0 if num_gpus else 0.5),
        num_gpus=num_gpus,
    )
    scored.context.execution_options.preserve_order = True  # keep a bucketed order intact
    return scored.materialize()


def add_reference_logps(dataset: ray.data.Dataset, reference: Model, **pool) -> MaterializedDataset:
    """`dataset` + `ref_chosen_logp`, `ref_rejected_logp` (the training batch contract's names)."""
    return score_pairs_pool(dataset, {"ref": reference}, **pool)
