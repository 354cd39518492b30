"""Pair scoring on an actor pool: sequence log-probs of chosen and rejected responses under one or more models.

`score_pairs_pool(dataset, {"ref": checkpoint}, ...)` adds `<name>_chosen_logp` and `<name>_rejected_logp` to every
row of a `read_preferences` dataset. Two stages use it: the optional reference pass (`add_reference_logps`: columns
`ref_chosen_logp`, `ref_rejected_logp`, so training workers hold only the policy, `dpo.reference=precomputed`) and
evaluation (policy and reference on held-out pairs, for the implicit-reward accuracy). Each actor loads its models
ONCE (a callable class in `map_batches`); the scoring itself is `ray_dpo.core.pairs.score_batch`, the trainer's.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
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

    def __init__(self, models: dict[str, Model], *, reduction: str, prefix_sharing: bool, device: str):
        loader.reuse_freed_memory()
        self.device = torch.device(device)
        self.models = {
            name: (m if isinstance(m, nn.Module) else loader.load(m, self.device))
            .to(self.device)
            .eval()
            .requires_grad_(False)
            for name, m in models.items()
        }
        self.reduction, self.prefix_sharing = reduction, prefix_sharing

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # pad id 0 is a valid id for any vocabulary; padding is right of every scored token, so under a causal
        # model its value cannot change the result (the masks come from the lengths, not from pad_id)
        tensors = {k: v.to(self.device) for k, v in collate_preferences(batch, pad_id=0).items()}
        with torch.inference_mode():
            for name, model in self.models.items():
                scored = score_batch(model, tensors, prefix_sharing=self.prefix_sharing)
                chosen, rejected = scored.sequence(self.reduction)
                batch[f"{name}_chosen_logp"] = chosen.float().cpu().numpy()
                batch[f"{name}_rejected_logp"] = rejected.float().cpu().numpy()
        return batch


def map_batches_no_restarts(dataset: ray.data.Dataset, fn, **kwargs) -> ray.data.Dataset:
    """`dataset.map_batches(fn, **kwargs)` whose actors are never restarted: a crashed actor fails the pass at once.

    Ray Data restarts actors by default, and Ray logs an error for every actor whose constructor arguments live in
    the object store and may restart. `max_restarts=0` has no named parameter in Ray 2.60, only the
    `ray_remote_args` it deprecates, so that one warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(fn, max_restarts=0, **kwargs)


def score_pairs_pool(
    dataset: ray.data.Dataset,
    models: dict[str, Model],
    *,
    reduction: str = "sum",
    prefix_sharing: bool = False,
    batch_size: int = 32,
    concurrency: int = 1,
    num_gpus: float = 0,
    num_cpus: float | None = None,
) -> MaterializedDataset:
    """`dataset` with `<name>_chosen_logp`, `<name>_rejected_logp` (float32) for each model, MATERIALIZED, row order
    kept. concurrency: actors in the pool; num_gpus per actor (> 0 puts the models on cuda); num_cpus per actor,
    default 0.5 on CPU so a 2-CPU machine keeps room for the read tasks (a pool of 1-CPU actors there can hang).
    reduction must match the trainer's (`ray_dpo.core.losses.default_reduction`)."""
    if reduction not in ("sum", "mean"):
        raise UserError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if concurrency < 1 or batch_size < 1:
        raise UserError(f"concurrency and batch_size must be >= 1, got {concurrency} and {batch_size}")
    for name, model in models.items():
        local = isinstance(model, (str, os.PathLike)) and not isinstance(model, Checkpoint)  # Checkpoint is PathLike
        if local and "://" not in str(model) and not Path(model).is_dir():
            raise UserError(f"{name} checkpoint: {model} is not a directory")
    if concurrency > 1 and isinstance(dataset, MaterializedDataset) and dataset.num_blocks() < concurrency:
        dataset = dataset.repartition(concurrency)  # one block feeds one actor: give every actor work
    scored = map_batches_no_restarts(
        dataset,
        PairScorer,
        fn_constructor_kwargs=dict(
            models=models, reduction=reduction, prefix_sharing=prefix_sharing, device="cuda" if num_gpus else "cpu"
        ),
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus if num_cpus is not None else (1.0 if num_gpus else 0.5),
        num_gpus=num_gpus,
    )
    scored.context.execution_options.preserve_order = True  # keep a bucketed order intact
    return scored.materialize()


def add_reference_logps(
    dataset: ray.data.Dataset, reference: Model, *, reduction: str = "sum", **pool
) -> MaterializedDataset:
    """`dataset` + `ref_chosen_logp`, `ref_rejected_logp` (the training batch contract's names)."""
    return score_pairs_pool(dataset, {"ref": reference}, reduction=reduction, **pool)
