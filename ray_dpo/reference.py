"""Stage 2 (optional): reference log-probs as dataset columns, computed by an actor pool.

`add_reference_logps(dataset, checkpoint_or_model, ...)` adds `ref_chosen_logp` and `ref_rejected_logp`
(float32) to every row of a `read_preferences` dataset, so training workers hold only the policy model
(`DPO(..., precomputed_reference=True)`). The model is loaded ONCE per actor (a callable class in
`map_batches`), from a checkpoint directory (`checkpoint.load_model`) or from an `nn.Module` passed in
(pickled into each actor).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import ray
import torch
from ray.data.dataset import MaterializedDataset
from torch import nn

from ray_dpo.checkpoint import load_model
from ray_dpo.data import collate_preferences
from ray_dpo.dpo import response_mask_from_lengths, sequence_logps
from ray_dpo.errors import UserError


class ReferenceScorer:
    """Ray Data callable class: one model per actor, scores chosen and rejected in one forward pass."""

    def __init__(self, checkpoint_or_model: str | os.PathLike | nn.Module, reduction: str, device: str):
        if isinstance(checkpoint_or_model, nn.Module):
            model = checkpoint_or_model
        else:
            model = load_model(checkpoint_or_model, device=device)
        self.model = model.to(device).eval().requires_grad_(False)
        self.reduction, self.device = reduction, device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # pad id 0 is a valid id for any vocabulary; padding is right of every scored token, so under a causal
        # model its value cannot change the result (the mask comes from the lengths, not from pad_id).
        tensors = collate_preferences(batch, pad_id=0)
        size, width = tensors["chosen"].shape
        seqs = torch.cat((tensors["chosen"], tensors["rejected"])).to(self.device)
        prompt_len = tensors["prompt_len"].repeat(2).to(self.device)
        response_len = torch.cat((tensors["chosen_len"], tensors["rejected_len"])).to(self.device)
        mask = response_mask_from_lengths(width, prompt_len, response_len)
        with torch.inference_mode():
            logps = sequence_logps(self.model, seqs, mask, self.reduction).float().cpu().numpy()
        batch["ref_chosen_logp"] = logps[:size]
        batch["ref_rejected_logp"] = logps[size:]
        return batch


def add_reference_logps(
    dataset: ray.data.Dataset,
    checkpoint_or_model: str | os.PathLike | nn.Module,
    *,
    batch_size: int = 32,
    concurrency: int = 1,
    num_gpus: float = 0,
    reduction: str = "sum",
    num_cpus: float | None = None,
) -> ray.data.Dataset:
    """Return `dataset` with `ref_chosen_logp`, `ref_rejected_logp` (float32) columns, MATERIALIZED.

    concurrency: actors in the pool (`ActorPoolStrategy(size=concurrency)`). num_gpus: per actor (> 0 puts
    the model on cuda). num_cpus: per actor; default 0.5 on CPU so a 2-CPU machine still has room for other
    Ray tasks (a pool of 1-CPU actors on 2 CPUs can hang, see RAY-FACTS), 1 with a GPU.
    reduction: "sum" (DPO paper) or "mean"; must match the trainer's `DPO(reduction=...)`.
    Materialized because the pass is expensive and must not rerun each epoch; row order is kept.
    """
    if reduction not in ("sum", "mean"):
        raise UserError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if concurrency < 1 or batch_size < 1:
        raise UserError(f"concurrency and batch_size must be >= 1, got {concurrency} and {batch_size}")
    if not isinstance(checkpoint_or_model, nn.Module):
        path = Path(checkpoint_or_model)
        if "://" not in str(checkpoint_or_model) and not path.is_dir():
            raise UserError(f"reference checkpoint: {path} is not a directory")
    if num_cpus is None:
        num_cpus = 1.0 if num_gpus else 0.5
    device = "cuda" if num_gpus else "cpu"
    if concurrency > 1 and isinstance(dataset, MaterializedDataset) and dataset.num_blocks() < concurrency:
        dataset = dataset.repartition(concurrency)  # one block feeds one actor: give every actor work
    scored = dataset.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs=dict(checkpoint_or_model=checkpoint_or_model, reduction=reduction, device=device),
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    scored.context.execution_options.preserve_order = True  # keep a bucketed order intact
    return scored.materialize()
