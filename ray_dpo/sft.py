"""SFT warm start ("Preferred-FT" in the DPO paper): NLL on response tokens of (prompt, response) pairs.

    sft_ds = read_sft(config.sft.path, tokenizer=tok, max_len=..., max_prompt_len=...)
    result = train_sft(config, sft_ds, init_checkpoint=ckpt, run_id=..., tracking_uri=..., pad_id=tok.pad_id)

Same worker machinery as DPO (`ray_dpo.train.run_training`): optimizer, schedule, DDP, checkpoints and resume are
shared; only the task differs. The loss is the mean NLL over every response token of the GLOBAL batch.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from torch import Tensor, nn

from ray_dpo.config import Config
from ray_dpo.dpo import model_logits, response_mask_from_lengths, token_logps
from ray_dpo.errors import UserError
from ray_dpo.train import Task, TrainResult, run_training


def _tokenize(
    batch: pd.DataFrame, *, tokenizer, max_len: int, max_prompt_len: int, prompt_column: str, response_column: str
) -> pd.DataFrame:
    tokens, prompt_lens, response_lens = [], [], []
    for prompt, response in zip(
        tokenizer.encode_batch(batch[prompt_column].tolist()),
        tokenizer.encode_batch(batch[response_column].tolist()),
        strict=True,
    ):
        prompt = [tokenizer.bos_id, *prompt.tolist()]
        response = [*response.tolist(), tokenizer.eos_id]
        if len(prompt) + len(response) > max_len:  # keep the prompt's end, then as much response as fits
            prompt = prompt[-max_prompt_len:]
            response = response[: max_len - len(prompt)]
        tokens.append(np.asarray(prompt + response, dtype=np.int64))
        prompt_lens.append(len(prompt))
        response_lens.append(len(response))
    return pd.DataFrame({"tokens": tokens, "prompt_len": prompt_lens, "response_len": response_lens})


def read_sft(
    path: str,
    *,
    tokenizer,
    max_len: int,
    max_prompt_len: int,
    prompt_column: str = "prompt",
    response_column: str = "response",
) -> ray.data.Dataset:
    """(prompt, response) Parquet -> rows `tokens` ([bos, prompt, response, eos]), `prompt_len`, `response_len`."""
    if max_prompt_len >= max_len:
        raise UserError(f"config: data.max_prompt_len={max_prompt_len} must be < data.max_len={max_len}")
    ds = ray.data.read_parquet(path)
    missing = [c for c in (prompt_column, response_column) if c not in ds.schema().names]
    if missing:
        raise UserError(f"sft: {path} has no column(s) {missing} (set sft.prompt_column / sft.response_column)")
    tokenize = functools.partial(
        _tokenize,
        tokenizer=tokenizer,
        max_len=max_len,
        max_prompt_len=max_prompt_len,
        prompt_column=prompt_column,
        response_column=response_column,
    )
    return ds.map_batches(tokenize, batch_format="pandas")


def collate_sft(batch: dict[str, np.ndarray], *, pad_id: int) -> dict[str, Tensor]:
    """Right-pad `tokens` to the batch's longest row."""
    rows = batch["tokens"]
    tokens = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.int64)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.int64)  # copies: Ray hands read-only arrays
    return {
        "tokens": tokens,
        "prompt_len": torch.tensor(batch["prompt_len"], dtype=torch.int64),  # copy: Ray arrays are read-only
        "response_len": torch.tensor(batch["response_len"], dtype=torch.int64),
    }


def _response_mask(batch: dict[str, Tensor]) -> Tensor:
    tokens = batch["tokens"]
    return response_mask_from_lengths(tokens.shape[1], batch["prompt_len"], batch["response_len"])[:, 1:]


def make_sft_task(config: Config, loop: dict[str, Any], model: nn.Module, device: torch.device) -> Task:
    eval_model = getattr(model, "module", model)

    def score(batch: dict[str, Tensor], training: bool):
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens, mask = batch["tokens"], _response_mask(batch)
        logps = token_logps(model_logits(model if training else eval_model, tokens[:, :-1]), tokens[:, 1:])
        nll_sum = -logps.masked_fill(~mask, 0.0).sum()
        processed = (batch["prompt_len"] + batch["response_len"]).sum().item()
        return nll_sum, {"loss": nll_sum.detach()}, float(mask.sum().item()), float(processed)

    return Task(
        collate=functools.partial(collate_sft, pad_id=loop["pad_id"]),
        count=lambda batch: float(_response_mask(batch).sum().item()),  # normalise by GLOBAL response tokens
        score=score,
        metric_names=("loss",),
    )


def train_sft(
    config: Config,
    sft_ds: ray.data.Dataset,
    *,
    init_checkpoint: str,
    run_id: str | None,
    tracking_uri: str | None,
    pad_id: int,
) -> TrainResult:
    """SFT for `sft.epochs` at `sft.lr`, global batch `sft.batch_size`; metrics `sft/*`. Ray run `<run_name>-sft`
    (re-running resumes it like DPO)."""
    s = config.sft
    return run_training(
        make_sft_task,
        config,
        name=f"{config.train.run_name}-sft",
        datasets={"train": sft_ds},
        batch_size=s.batch_size,
        epochs=s.epochs,
        lr=s.lr,
        init_checkpoint=init_checkpoint,
        run_id=run_id,
        tracking_uri=tracking_uri,
        pad_id=pad_id,
        prefix="sft",
    )
