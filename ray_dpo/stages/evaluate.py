"""Evaluation stage: the policy against the reference on held-out rows, with one Ray Data actor pool.

    metrics = evaluate(config, policy_checkpoint=ckpt, reference_checkpoint=ref, prompts_ds=val_ds,
                       preference_ds=val_ds, encoding=encoding, mlflow_run=(uri, run_id))   # {"eval/win_rate": ...}

run     one actor pool (`map_batches` with a callable class): every actor loads both models once (a LoRA policy on
        the reference's base holds that base once) and gets two kinds of held-out rows (the validation split: rows
        the policy never trained on): the first `eval.num_prompts` prompts, for which it decodes a response from each
        model (`eval.*`: greedy, temperature, top-k/p, min-p, top-a or beam search), scores BOTH responses under BOTH
        models (`ray_dpo.core.pairs.score_batch`, the trainer's scoring) and rewards them; and the first
        `eval.max_pairs` preference pairs, scored under both models for the implicit-reward accuracy. Prompts are cut
        to leave room for the response as `ray_dpo.core.encoding.Encoding` says (the run's, the checkpoint's own).
save    `eval/*` metrics, the samples as an MLflow table (`eval/samples.json`) and a side-by-side HTML page
        (`eval/samples.html`) that the MLflow UI renders in the run's Artifacts tab.

Metrics (`aggregate`):
  eval/reward/policy, eval/reward/reference   mean reward of each model's responses (with a reward function)
  eval/win_rate        share of prompts where the policy's reward beats the reference's; ties count half
  eval/kl_seq, _se     KL(policy || reference) per sequence: mean of log pi(y|x) - log ref(y|x) over `eval.kl_samples`
                       responses SAMPLED from the policy per prompt (temperature 1, no filter), and its standard error
                       (prompts are the independent units)
  eval/kl_token        the same summed, divided by the sampled responses' tokens
  eval/sampled_reward/{policy,reference}, _se   mean reward of those samples (with a reward function)
  eval/len/policy, eval/len/reference   mean response length in tokens (eos included when generated)
  eval/implicit_reward_accuracy   share of held-out pairs with beta*logratio(chosen) > beta*logratio(rejected)
  eval/implicit_reward_margin     mean of beta * (logratio(chosen) - logratio(rejected)) over those pairs
  eval/num_prompts, eval/num_pairs

About the KL estimate: with y SAMPLED from the policy (temperature 1, no filter), the mean of
log pi(y|x) - log ref(y|x) is an unbiased Monte-Carlo estimate of KL(pi || ref). Greedy or beam outputs are not
samples of pi (their mean difference can even be negative), so the configured decoding only fills the samples
table and the greedy reward; KL and the sampled reward always come from `eval.kl_samples` samples per prompt.
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import torch
from ray.train import Checkpoint
from torch import Tensor, nn

from ray_dpo.config import Config, ConfigError, EvalConfig
from ray_dpo.core.encoding import Encoding
from ray_dpo.core.pairs import score_batch
from ray_dpo.core.sampling import beam_search, generate
from ray_dpo.errors import UserError
from ray_dpo.stages import models, storage, tracking
from ray_dpo.stages.data import collate_preferences

RewardFn = Callable[[list[str], list[str]], list[float]]
SAMPLES_TABLE = "eval/samples.json"
SAMPLES_PAGE = "eval/samples.html"
MODELS = ("policy", "reference")
WAIT_FOR_ACTORS_S = 600  # an actor pool that cannot start in this time (no free GPU/CPU) fails instead of hanging
ACTOR_COLUMN = "_actor"  # pid of the actor that produced a row: diagnostics only, never logged
TASK_COLUMN = "_task"  # "generate" (a prompt) or "score" (a preference pair)


# ------------------------------------------------------------------------------------------------ setup helpers


def load_reward_fn(spec: str | None) -> RewardFn | None:
    """`"package.module:function"` -> the function; None -> None. A ConfigError names what is wrong."""
    if spec is None:
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"config: eval.reward_fn must look like 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"config: eval.reward_fn={spec!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"config: eval.reward_fn={spec!r}: {module_name} has no function {attr!r}")
    return fn


def check_checkpoint(key: str, path: str | os.PathLike | Checkpoint) -> str | Checkpoint:
    """The checkpoint as a local absolute path or in storage, or a UserError naming `key` when it holds no model of
    any kind the trainer writes (ours, Hugging Face, LoRA adapters, FSDP shards)."""
    if not isinstance(path, Checkpoint) and not storage.is_uri(str(path)):
        path = str(Path(path).expanduser().resolve())  # actors run in Ray's session directory
    try:
        models.kind(path)
    except (ValueError, OSError) as err:
        raise UserError(f"{key}: {str(err).splitlines()[0]}") from None
    return path


def eval_gpus(config: Config) -> float:
    """GPUs per evaluation actor: `eval.num_gpus`, by default one when training uses GPUs."""
    e = config.eval
    return e.num_gpus if e.num_gpus is not None else (1.0 if config.train.use_gpu else 0.0)


# ------------------------------------------------------------------------------------------------ actors


class PolicyReferenceEvaluator:
    """Ray Data callable class over held-out rows: a "generate" row gets a response from the policy and from the
    reference, both scored under both models (and rewarded); a "score" row (a preference pair) gets its log-probs
    under both models. Loads the two models ONCE per actor; a LoRA policy whose base is the reference holds that base
    once (the reference is the policy with its adapters off)."""

    def __init__(
        self,
        policy_checkpoint: str | Checkpoint,
        reference_checkpoint: str | Checkpoint,
        *,
        encoding: Encoding,
        device: str,
        eval_config: dict[str, Any],
        reduction: str,
        prefix_sharing: bool,
        bf16: bool,
        seed: int,
        pack_len: int | None = None,
    ):
        models.reuse_freed_memory()
        self.device = torch.device(device)
        self.encoding, self.tokenizer = encoding, encoding.tokenizer
        dtype = torch.bfloat16 if bf16 else None  # both models are frozen here
        self.models, self.contexts = models.policy_and_reference(
            policy_checkpoint, reference_checkpoint, self.device, dtype
        )
        self.e = EvalConfig(**eval_config)
        self.reduction, self.prefix_sharing, self.seed, self.pack_len = reduction, prefix_sharing, seed, pack_len
        # room for the response inside the positions the models were built for
        self.max_prompt_tokens = min(map(models.max_positions, self.models.values())) - self.e.max_new_tokens
        self.reward_fn = load_reward_fn(self.e.reward_fn)

    def _decode(self, model: nn.Module, prompts: list[Tensor], generator: torch.Generator) -> Tensor:
        e, tok = self.e, self.tokenizer
        kwargs = dict(eos_token=tok.eos_id, pad_id=tok.pad_id, filter_logits_fn=e.filter_logits_fn)
        kwargs["filter_kwargs"] = e.filter_kwargs or None
        if e.beams > 1:
            return beam_search(model, prompts, e.max_new_tokens, e.beams, temperature=e.temperature or 1.0, **kwargs)
        return generate(model, prompts, e.max_new_tokens, temperature=e.temperature, generator=generator, **kwargs)

    def _split(self, out: Tensor) -> list[np.ndarray]:
        """(B, n) generated tokens -> each row cut after its first eos (kept: it is part of the response)."""
        eos, rows = self.tokenizer.eos_id, []
        for row in out.cpu().numpy():
            ends = np.flatnonzero(row == eos)
            rows.append(row[: ends[0] + 1] if len(ends) else row)
        return rows

    def _text(self, tokens) -> str:
        tok = self.tokenizer
        return tok.decode([int(t) for t in tokens if t not in (tok.eos_id, tok.pad_id, tok.bos_id)])

    def _prompt_text(self, tokens) -> str:
        """The prompt as the model saw it: with a chat template, its markup too."""
        if self.encoding.chat_template:
            return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=False)
        return self._text(tokens)

    def _score(self, pairs: dict[str, list], *, packed: bool, pack_len: int | None = None) -> dict[str, np.ndarray]:
        """`{model}_{chosen,rejected}` sequence log-probs of each pair under each model (the trainer's scoring)."""
        tensors = {k: v.to(self.device) for k, v in collate_preferences(pairs, pad_id=0).items()}
        out = {}
        with torch.inference_mode():
            for name, model in self.models.items():
                with self.contexts[name]():
                    scored = score_batch(model, tensors, prefix_sharing=packed, pack_len=pack_len)
                    chosen, rejected = scored.sequence(self.reduction)
                out[f"{name}_chosen"], out[f"{name}_rejected"] = (x.double().cpu().numpy() for x in (chosen, rejected))
        return out

    def _respond(self, prompts: list[np.ndarray], texts: list[str], seed: int, sample: bool) -> dict[str, Any]:
        """A response from each model per prompt, both scored under both models (the two responses of a prompt as
        a pair, scored like training pairs), rewarded. `sample`: temperature 1, no filter: samples of the model."""
        e, tok = self.e, self.tokenizer
        device_prompts = [torch.as_tensor(p, dtype=torch.long, device=self.device) for p in prompts]
        out: dict[str, Any] = {}
        responses: dict[str, list[np.ndarray]] = {}
        for name, model in self.models.items():
            # the same seed for both models (common random numbers): identical models give identical responses
            generator = torch.Generator(self.device).manual_seed(seed)
            with self.contexts[name]():
                if sample:
                    kwargs = dict(eos_token=tok.eos_id, pad_id=tok.pad_id, generator=generator)
                    tokens = generate(model, device_prompts, e.max_new_tokens, temperature=1.0, **kwargs)
                else:
                    tokens = self._decode(model, device_prompts, generator)
            responses[name] = self._split(tokens)
            out[f"{name}_response"] = [self._text(r) for r in responses[name]]
            out[f"{name}_len"] = np.asarray([len(r) for r in responses[name]], dtype=np.int64)
        scored = self._score(
            {"prompt": prompts, "chosen": responses["policy"], "rejected": responses["reference"]}, packed=False
        )
        for scorer in MODELS:
            out[f"policy_logp_{scorer}"], out[f"reference_logp_{scorer}"] = (
                scored[f"{scorer}_chosen"],
                scored[f"{scorer}_rejected"],
            )
        if self.reward_fn is not None:
            for name in MODELS:
                out[f"{name}_reward"] = np.asarray(self.reward_fn(texts, out[f"{name}_response"]), dtype=np.float64)
        return out

    def _generate(self, prompt_rows: list[np.ndarray]) -> dict[str, Any]:
        prompts = self.encoding.fit_prompts(prompt_rows, self.max_prompt_tokens)
        texts = [self._text(p) for p in prompts]
        # seeded by the batch's content: samples do not depend on which actor got the batch
        seed = self.seed + zlib.crc32("\n".join(texts).encode())
        out = self._respond(prompts, texts, seed, sample=False)
        k = self.e.kl_samples
        if k:  # k samples of each model per prompt, averaged per prompt: one unit per prompt for the errors
            sampled = self._respond(
                [p for p in prompts for _ in range(k)], [t for t in texts for _ in range(k)], seed + 1, True
            )
            per_prompt = lambda x: np.asarray(x, dtype=np.float64).reshape(len(prompts), k).mean(1)
            out["sample_kl"] = per_prompt(sampled["policy_logp_policy"] - sampled["policy_logp_reference"])
            out["sample_len"] = per_prompt(sampled["policy_len"])
            for name in MODELS:
                if f"{name}_reward" in sampled:
                    out[f"sample_reward_{name}"] = per_prompt(sampled[f"{name}_reward"])
        out["prompt"] = [self._prompt_text(p) for p in prompts]
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        generate_rows = np.flatnonzero(batch[TASK_COLUMN] == "generate")
        score_rows = np.flatnonzero(batch[TASK_COLUMN] == "score")
        n = len(batch[TASK_COLUMN])
        out: dict[str, np.ndarray] = {TASK_COLUMN: batch[TASK_COLUMN], ACTOR_COLUMN: np.full(n, os.getpid())}
        parts = []
        if len(generate_rows):
            parts.append((generate_rows, self._generate([batch["prompt"][i] for i in generate_rows])))
        if len(score_rows):
            pairs = {k: [batch[k][i] for i in score_rows] for k in ("prompt", "chosen", "rejected")}
            # held-out pairs fit data.pack_len as training pairs do (generated responses may not: never packed)
            scored = self._score(pairs, packed=self.prefix_sharing, pack_len=self.pack_len)
            parts.append((score_rows, {f"{k}_logp": v for k, v in scored.items()}))
        for rows, columns in parts:  # one column per name over the whole batch: filler where a row has no value
            for name, values in columns.items():
                values = np.asarray(values)
                if name not in out:
                    out[name] = np.full(n, None, dtype=object) if values.dtype.kind in "OUS" else np.full(n, np.nan)
                out[name][rows] = values
        return out


# ------------------------------------------------------------------------------------------------ run


def _held_out_rows(prompts_ds: ray.data.Dataset, pairs_ds: ray.data.Dataset | None, e: EvalConfig) -> ray.data.Dataset:
    """The first `eval.num_prompts` prompts to generate from and the first `eval.max_pairs` pairs to score, as one
    dataset of `prompt`, `chosen`, `rejected`, `_task` rows (one pool does both)."""
    if "prompt" not in prompts_ds.columns():
        raise UserError(f"eval: the prompts dataset has no 'prompt' column (columns: {prompts_ds.columns()})")

    def tagged(ds: ray.data.Dataset, task: str) -> ray.data.Dataset:
        def add(batch: pa.Table) -> pa.Table:
            n = batch.num_rows
            empty = pa.array([[]] * n, type=batch["prompt"].type)
            columns = {k: batch[k] if k in batch.column_names else empty for k in ("prompt", "chosen", "rejected")}
            return pa.table({**columns, TASK_COLUMN: pa.array([task] * n)})

        return ds.map_batches(add, batch_format="pyarrow", batch_size=None)

    rows = tagged(prompts_ds.limit(e.num_prompts), "generate")
    if pairs_ds is not None and e.max_pairs:
        rows = rows.union(tagged(pairs_ds.select_columns(["prompt", "chosen", "rejected"]).limit(e.max_pairs), "score"))
    return rows


def _pool_kwargs(config: Config) -> dict[str, Any]:
    gpus = eval_gpus(config)
    # fractional CPUs: a pool of 1-CPU actors on a 2-CPU machine starves the read tasks and hangs
    # one task in flight per actor: a second batch goes to an idle actor instead of queueing behind the first
    return dict(
        compute=ray.data.ActorPoolStrategy(size=config.eval.concurrency, max_tasks_in_flight_per_actor=1),
        num_cpus=1.0 if gpus else 0.5,
        num_gpus=gpus,
    )


def _spread(dataset: ray.data.Dataset, actors: int) -> ray.data.Dataset:
    # one block feeds one actor: without as many blocks as actors, the rest of the pool idles
    return dataset.repartition(actors) if actors > 1 else dataset


def _start_pool_first(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """Dispatch only once every actor has loaded its models. By default Ray Data starts actors asynchronously, and
    on a busy machine the first actor up takes every block while the others are still loading."""
    dataset.context.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
    dataset.context.execution_options.preserve_order = True
    return dataset


def evaluate_rows(
    config: Config,
    *,
    policy_checkpoint: str | Checkpoint,
    reference_checkpoint: str | Checkpoint,
    prompts_ds: ray.data.Dataset,
    preference_ds: ray.data.Dataset | None,
    encoding: Encoding,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(samples, pairs) from one actor pool: one row per prompt (prompt, `{policy,reference}_response`, `_len`,
    `_logp_{policy,reference}`, `_reward`, `sample_*`) and one per held-out pair
    (`{policy,reference}_{chosen,rejected}_logp`). Prompts are token rows encoded as in training (the validation
    split, or `read_prompts`)."""
    e = config.eval
    rows = _held_out_rows(prompts_ds, preference_ds, e)
    out = _spread(rows, e.concurrency).map_batches(
        PolicyReferenceEvaluator,
        fn_constructor_kwargs=dict(
            policy_checkpoint=check_checkpoint("eval: policy checkpoint", policy_checkpoint),
            reference_checkpoint=check_checkpoint("eval: reference checkpoint", reference_checkpoint),
            encoding=encoding,
            device="cuda" if eval_gpus(config) else "cpu",
            eval_config=dataclasses.asdict(e),
            reduction=config.dpo.loss_spec().reward_reduction,  # the implicit reward as training's rewards/*
            prefix_sharing=config.dpo.prefix_sharing,
            pack_len=config.data.pack_len if config.data.packing else None,
            bf16=config.train.precision == "bf16",
            seed=config.train.seed,
        ),
        batch_size=e.batch_size,
        batch_format="numpy",
        **_pool_kwargs(config),
    )
    table = _start_pool_first(out).to_pandas()

    def rows_of(task: str) -> pd.DataFrame:  # only the columns this kind of row fills
        part = table[table[TASK_COLUMN] == task].drop(columns=[TASK_COLUMN])
        return part.loc[:, part.notna().any()].reset_index(drop=True)

    return rows_of("generate"), rows_of("score")


def aggregate(samples: pd.DataFrame, pairs: pd.DataFrame | None, *, beta: float) -> dict[str, float]:
    """`eval/*` metrics from `generate_samples` rows and `score_preferences` rows (see the module doc)."""
    if len(samples) == 0:
        raise UserError("eval: no prompts to evaluate (empty prompts dataset)")
    # plain float64 arrays: Ray's to_pandas() may hand over Arrow-backed columns with narrower arithmetic
    col = lambda df, name: np.asarray(df[name], dtype=np.float64)
    metrics = {
        "eval/num_prompts": float(len(samples)),
        "eval/len/policy": float(col(samples, "policy_len").mean()),
        "eval/len/reference": float(col(samples, "reference_len").mean()),
    }
    if "sample_kl" in samples:  # per-prompt means over samples of the policy: an unbiased estimate, with its error
        metrics["eval/kl_seq"], metrics["eval/kl_seq_se"] = mean_and_se(col(samples, "sample_kl"))
        metrics["eval/kl_token"] = float(col(samples, "sample_kl").sum() / max(col(samples, "sample_len").sum(), 1))
        for name in MODELS:
            if f"sample_reward_{name}" in samples:
                mean, se = mean_and_se(col(samples, f"sample_reward_{name}"))
                metrics[f"eval/sampled_reward/{name}"], metrics[f"eval/sampled_reward/{name}_se"] = mean, se
    if "policy_reward" in samples:
        policy, reference = col(samples, "policy_reward"), col(samples, "reference_reward")
        metrics["eval/reward/policy"] = float(policy.mean())
        metrics["eval/reward/reference"] = float(reference.mean())
        metrics["eval/win_rate"] = float(((policy > reference) + 0.5 * (policy == reference)).mean())
    if pairs is not None and len(pairs):
        chosen = beta * (col(pairs, "policy_chosen_logp") - col(pairs, "reference_chosen_logp"))
        rejected = beta * (col(pairs, "policy_rejected_logp") - col(pairs, "reference_rejected_logp"))
        metrics["eval/num_pairs"] = float(len(pairs))
        metrics["eval/implicit_reward_accuracy"] = float((chosen > rejected).mean())
        metrics["eval/implicit_reward_margin"] = float((chosen - rejected).mean())
    return metrics


# ------------------------------------------------------------------------------------------------ save


def samples_html(samples: pd.DataFrame, metrics: dict[str, float], *, limit: int = 200) -> str:
    """A self-contained HTML page: the metrics, then prompt | reference | policy side by side (green = reward 1)."""

    def cell(text: str, reward: float | None) -> str:
        style = "" if reward is None else f' style="background:{"#e6f4ea" if reward > 0 else "#fdecea"}"'
        return f"<td{style}><code>{html.escape(text)}</code></td>"

    rows = []
    has_reward = "policy_reward" in samples
    for _, row in samples.head(limit).iterrows():
        cells = [f"<td><code>{html.escape(str(row['prompt']))}</code></td>"]
        for name in ("reference", "policy"):
            reward = float(row[f"{name}_reward"]) if has_reward else None
            cells.append(cell(str(row[f"{name}_response"]), reward))
            if has_reward:
                cells.append(f"<td>{reward:.3g}</td>")
        cells.append(f"<td>{float(row['sample_kl']):.3f}</td>" if "sample_kl" in row else "<td></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    reward_head = "<th>reward</th>" if has_reward else ""
    head = (
        f"<tr><th>prompt</th><th>reference response</th>{reward_head}<th>policy response</th>{reward_head}"
        "<th>KL: mean log &pi;(y) &minus; log ref(y), y sampled from &pi;</th></tr>"
    )
    summary = "".join(f"<li><code>{html.escape(k)}</code> = {v:.4g}</li>" for k, v in sorted(metrics.items()))
    shown = f"first {limit} of {len(samples)}" if len(samples) > limit else f"all {len(samples)}"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ray-dpo eval samples</title><style>"
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}</style></head><body>"
        f"<h2>Policy vs reference</h2><ul>{summary}</ul><p>Samples ({shown}):</p>"
        f"<table>{head}{''.join(rows)}</table></body></html>"
    )


def log_results(uri: str, run_id: str, metrics: dict[str, float], samples: pd.DataFrame) -> None:
    """Metrics under `eval/*`, the sample table (`eval/samples.json`) and the HTML page (`eval/samples.html`)."""
    tracking.log_metrics(uri, run_id, metrics)
    table = samples[[c for c in samples.columns if not c.startswith("_")]]
    tracking.log_table(uri, run_id, table, SAMPLES_TABLE)
    tracking.log_text(uri, run_id, samples_html(table, metrics), SAMPLES_PAGE)


def format_summary(metrics: dict[str, float]) -> str:
    """A few lines for the end of a pipeline's output."""
    lines = []
    if "eval/reward/policy" in metrics:
        lines.append(
            f"eval reward:      reference {metrics['eval/reward/reference']:.3f} -> "
            f"policy {metrics['eval/reward/policy']:.3f} (win rate {metrics['eval/win_rate']:.3f}, "
            f"{int(metrics['eval/num_prompts'])} held-out prompts)"
        )
    if "eval/sampled_reward/policy" in metrics:
        lines.append(
            f"eval sampled reward (temperature 1): reference {metrics['eval/sampled_reward/reference']:.3f} -> "
            f"policy {metrics['eval/sampled_reward/policy']:.3f} ± {metrics['eval/sampled_reward/policy_se']:.3f}"
        )
    if "eval/kl_seq" in metrics:
        lines.append(
            f"eval KL(pi||ref): {metrics['eval/kl_seq']:.3f} ± {metrics['eval/kl_seq_se']:.3f} per sequence "
            f"({metrics['eval/kl_token']:.3f} per token), from samples of the policy"
        )
    if "eval/implicit_reward_accuracy" in metrics:
        lines.append(
            f"eval implicit-reward accuracy: {metrics['eval/implicit_reward_accuracy']:.3f} "
            f"on {int(metrics['eval/num_pairs'])} held-out pairs"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ entry point


def evaluate(
    config: Config,
    *,
    policy_checkpoint: str | Checkpoint,
    reference_checkpoint: str | Checkpoint,
    prompts_ds: ray.data.Dataset,
    preference_ds: ray.data.Dataset | None,
    encoding: Encoding,
    mlflow_run: tuple[str, str] | None = None,
) -> dict[str, float]:
    """Policy vs reference on held-out prompts and pairs (one actor pool); logged into `mlflow_run` (uri, run id)
    when given. Returns the `eval/*` metrics."""
    samples, pairs = evaluate_rows(
        config,
        policy_checkpoint=policy_checkpoint,
        reference_checkpoint=reference_checkpoint,
        prompts_ds=prompts_ds,
        preference_ds=preference_ds,
        encoding=encoding,
    )
    metrics = aggregate(samples, pairs, beta=config.dpo.beta)
    if mlflow_run is not None:
        log_results(*mlflow_run, metrics, samples)
    return metrics


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of independent units (one value per prompt: several samples of a prompt are not
    independent of each other, prompts are)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def kl_estimate(logp_policy: np.ndarray, logp_reference: np.ndarray) -> tuple[float, float]:
    """KL(policy || reference) from responses SAMPLED from the policy (temperature 1, no filter), as (prompts,
    samples) arrays of sequence log-probs: the mean of log pi(y|x) - log ref(y|x) is an unbiased estimate; returns
    (estimate, standard error), prompts as the independent units."""
    per_prompt = (np.asarray(logp_policy, np.float64) - np.asarray(logp_reference, np.float64)).mean(axis=-1)
    return mean_and_se(per_prompt)
