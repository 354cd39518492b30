"""Evaluation stage: generate from the policy AND the reference on held-out prompts with a Ray Data actor pool.

    metrics = evaluate(config, policy_checkpoint=ckpt, reference_checkpoint=ref, prompts_ds=prompts,
                       preference_ds=val_ds, tracking_uri=uri, run_id=run_id)     # {"eval/win_rate": ..., ...}

setup   resolve the reward function (`eval.reward_fn`, "module:function") and the decoding settings; fail fast.
run     1. `generate_samples`: an actor pool (`map_batches` with a callable class) in which every actor loads both
           models once and, per batch of held-out prompts (token rows of the validation split: the rows the policy
           never trained on), decodes a response from each (`eval.*`: greedy, temperature, top-k/p, min-p, top-a or
           beam search), then scores BOTH responses under BOTH models (`ray_dpo.core.pairs.score_batch`, the trainer's
           pair scoring) and, with a reward function, rewards them (prompt text = the decoded prompt tokens).
        2. `score_preferences`: the pair-scoring pool (`ray_dpo.stages.reference.score_pairs_pool`) scores the held-out
           preference pairs under both models, for the implicit-reward accuracy.
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
import ray
import torch
from ray.train import Checkpoint
from torch import Tensor, nn

from ray_dpo.config import Config, EvalConfig
from ray_dpo.core.encoding import fit_prompt_rows
from ray_dpo.core.losses import default_reduction
from ray_dpo.core.pairs import score_batch
from ray_dpo.core.sampling import beam_search, generate
from ray_dpo.errors import UserError
from ray_dpo.stages import models, tracking
from ray_dpo.stages.data import collate_preferences
from ray_dpo.stages.reference import map_batches_no_restarts, score_pairs_pool

RewardFn = Callable[[list[str], list[str]], list[float]]
SAMPLES_TABLE = "eval/samples.json"
SAMPLES_PAGE = "eval/samples.html"
MODELS = ("policy", "reference")
WAIT_FOR_ACTORS_S = 600  # an actor pool that cannot start in this time (no free GPU/CPU) fails instead of hanging
ACTOR_COLUMN = "_actor"  # pid of the actor that produced a row: diagnostics only, never logged


# ------------------------------------------------------------------------------------------------ setup helpers


def load_reward_fn(spec: str | None) -> RewardFn | None:
    """`"package.module:function"` -> the function; None -> None. A UserError names what is wrong."""
    if spec is None:
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"config: eval.reward_fn must look like 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"config: eval.reward_fn={spec!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"config: eval.reward_fn={spec!r}: {module_name} has no function {attr!r}")
    return fn


def _check_eval_config(e: EvalConfig) -> None:
    if e.max_new_tokens < 1 or e.batch_size < 1 or e.concurrency < 1 or e.beams < 1:
        raise UserError("config: eval.max_new_tokens, eval.batch_size, eval.concurrency and eval.beams must be >= 1")
    if e.temperature < 0:
        raise UserError(f"config: eval.temperature must be >= 0, got {e.temperature}")
    if e.kl_samples < 0:
        raise UserError(f"config: eval.kl_samples must be >= 0, got {e.kl_samples}")
    if e.filter_logits_fn not in (None, "top_k", "top_p", "min_p", "top_a"):
        raise UserError(
            f"config: eval.filter_logits_fn must be top_k, top_p, min_p, top_a or null, got {e.filter_logits_fn!r}"
        )


def check_checkpoint(key: str, path: str | os.PathLike | Checkpoint) -> str | Checkpoint:
    """The absolute local checkpoint directory, or a UserError naming `key` when it holds no model. Checkpoints
    in storage (a `ray.train.Checkpoint` or a URI) are opened by the actors."""
    if isinstance(path, Checkpoint) or "://" in str(path):
        return path
    path = Path(path).expanduser().resolve()  # actors run in Ray's session directory
    if not (path / "model.safetensors").is_file():
        raise UserError(f"{key}: {path} is not a checkpoint directory (no model.safetensors)")
    return str(path)


# ------------------------------------------------------------------------------------------------ actors


class PolicyReferenceGenerator:
    """Ray Data callable class: prompt token rows -> a response from the policy and from the reference, both scored
    under both models (and rewarded). Loads the two models and the tokenizer ONCE per actor."""

    def __init__(
        self,
        policy_checkpoint: str | Checkpoint,
        reference_checkpoint: str | Checkpoint,
        *,
        tokenizer: str,
        device: str,
        eval_config: dict[str, Any],
        reduction: str,
        seed: int,
    ):
        models.reuse_freed_memory()
        self.device = torch.device(device)
        # the checkpoint's own tokenizer wins: it is the one the policy was trained with
        policy, self.tokenizer = models.load_with_tokenizer(policy_checkpoint, tokenizer, self.device)
        reference = models.load(reference_checkpoint, self.device)
        self.models: dict[str, nn.Module] = {
            name: model.eval().requires_grad_(False) for name, model in zip(MODELS, (policy, reference), strict=True)
        }
        self.e = EvalConfig(**eval_config)
        self.reduction, self.seed = reduction, seed
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
            if sample:
                kwargs = dict(eos_token=tok.eos_id, pad_id=tok.pad_id, generator=generator)
                tokens = generate(model, device_prompts, e.max_new_tokens, temperature=1.0, **kwargs)
            else:
                tokens = self._decode(model, device_prompts, generator)
            responses[name] = self._split(tokens)
            out[f"{name}_response"] = [self._text(r) for r in responses[name]]
            out[f"{name}_len"] = np.asarray([len(r) for r in responses[name]], dtype=np.int64)
        pairs = {"prompt": prompts, "chosen": responses["policy"], "rejected": responses["reference"]}
        tensors = {k: v.to(self.device) for k, v in collate_preferences(pairs, pad_id=0).items()}
        with torch.inference_mode():
            for scorer, model in self.models.items():
                policy_logps, reference_logps = score_batch(model, tensors).sequence(self.reduction)
                out[f"policy_logp_{scorer}"] = policy_logps.double().cpu().numpy()
                out[f"reference_logp_{scorer}"] = reference_logps.double().cpu().numpy()
        if self.reward_fn is not None:
            for name in MODELS:
                out[f"{name}_reward"] = np.asarray(self.reward_fn(texts, out[f"{name}_response"]), dtype=np.float64)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = fit_prompt_rows(list(batch["prompt"]), self.max_prompt_tokens, self.tokenizer.bos_id)
        texts = [self._text(p) for p in prompts]
        # seeded by the batch's content: samples do not depend on which actor got the batch
        seed = self.seed + zlib.crc32("\n".join(texts).encode())
        out = self._respond(prompts, texts, seed, sample=False)
        for name in MODELS:
            out[f"{name}_response"] = np.asarray(out[f"{name}_response"], dtype=object)
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
        out["prompt"] = np.asarray(texts, dtype=object)
        out[ACTOR_COLUMN] = np.full(len(texts), os.getpid(), dtype=np.int64)
        return out


# ------------------------------------------------------------------------------------------------ run


def _pool_kwargs(config: Config) -> dict[str, Any]:
    e = config.eval
    # fractional CPUs: a pool of 1-CPU actors on a 2-CPU machine starves the read tasks and hangs
    # one task in flight per actor: a second batch goes to an idle actor instead of queueing behind the first
    return dict(
        compute=ray.data.ActorPoolStrategy(size=e.concurrency, max_tasks_in_flight_per_actor=1),
        num_cpus=1.0 if e.num_gpus else 0.5,
        num_gpus=e.num_gpus,
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


def generate_samples(
    config: Config,
    *,
    policy_checkpoint: str | Checkpoint,
    reference_checkpoint: str | Checkpoint,
    prompts_ds: ray.data.Dataset,
) -> pd.DataFrame:
    """One row per prompt: prompt, `{policy,reference}_response`, `_len`, `_logp_{policy,reference}`, `_reward`.

    `prompts_ds` has a `prompt` column of token rows, encoded as in training: the validation split of
    `read_preferences` (or `read_prompts` of a file); the first `eval.num_prompts` rows are used, in order.
    """
    e = config.eval
    _check_eval_config(e)
    load_reward_fn(e.reward_fn)  # fail here, in one line, rather than inside every actor
    if "prompt" not in prompts_ds.columns():
        raise UserError(f"eval: the prompts dataset has no 'prompt' column (columns: {prompts_ds.columns()})")
    prompts_ds = prompts_ds.select_columns(["prompt"]).limit(e.num_prompts)
    samples = map_batches_no_restarts(
        _spread(prompts_ds, e.concurrency),
        PolicyReferenceGenerator,
        fn_constructor_kwargs=dict(
            policy_checkpoint=check_checkpoint("eval: policy checkpoint", policy_checkpoint),
            reference_checkpoint=check_checkpoint("eval: reference checkpoint", reference_checkpoint),
            tokenizer=config.data.tokenizer,
            device="cuda" if e.num_gpus else "cpu",
            eval_config=dataclasses.asdict(e),
            reduction=default_reduction(config.dpo.loss_type, config.dpo.reduction),
            seed=config.train.seed,
        ),
        batch_size=e.batch_size,
        batch_format="numpy",
        **_pool_kwargs(config),
    )
    return _start_pool_first(samples).to_pandas()


def score_preferences(
    config: Config,
    *,
    policy_checkpoint: str | Checkpoint,
    reference_checkpoint: str | Checkpoint,
    preference_ds: ray.data.Dataset,
) -> pd.DataFrame:
    """`{policy,reference}_{chosen,rejected}_logp` for each row of a `read_preferences` dataset."""
    e = config.eval
    models = {
        "policy": check_checkpoint("eval: policy checkpoint", policy_checkpoint),
        "reference": check_checkpoint("eval: reference checkpoint", reference_checkpoint),
    }
    scored = score_pairs_pool(
        preference_ds,
        models,
        reduction=default_reduction(config.dpo.loss_type, config.dpo.reduction),
        prefix_sharing=config.dpo.prefix_sharing,
        batch_size=e.batch_size,
        concurrency=e.concurrency,
        num_gpus=e.num_gpus,
    )
    columns = [f"{m}_{side}_logp" for m in models for side in ("chosen", "rejected")]
    return scored.select_columns(columns).to_pandas()


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
    prompts = np.arange(len(samples))  # per-prompt means: one independent unit per prompt
    if "sample_kl" in samples:  # from samples of the policy: an unbiased estimate, with its standard error
        metrics["eval/kl_seq"], metrics["eval/kl_seq_se"] = kl_estimate(col(samples, "sample_kl"), 0.0, prompts)
        metrics["eval/kl_token"] = float(col(samples, "sample_kl").sum() / max(col(samples, "sample_len").sum(), 1))
        for name in MODELS:
            if f"sample_reward_{name}" in samples:
                mean, se = mean_and_se(col(samples, f"sample_reward_{name}"), prompts)
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
    tracking_uri: str | None,
    run_id: str | None,
) -> dict[str, float]:
    """Policy vs reference on held-out prompts (+ implicit-reward accuracy on held-out pairs); logs to MLflow when
    `tracking_uri` and `run_id` are given. Returns the `eval/*` metrics."""
    # setup + run: two actor pools, each loading both models once per actor
    kwargs = dict(policy_checkpoint=policy_checkpoint, reference_checkpoint=reference_checkpoint)
    samples = generate_samples(config, prompts_ds=prompts_ds, **kwargs)
    pairs = None if preference_ds is None else score_preferences(config, preference_ds=preference_ds, **kwargs)
    metrics = aggregate(samples, pairs, beta=config.dpo.beta)
    # save
    if tracking_uri is not None and run_id is not None:
        log_results(tracking_uri, run_id, metrics, samples)
    return metrics


def mean_and_se(values: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Mean of per-sample `values` and its standard error, with samples of one prompt (`groups`) as one unit:
    several samples of a prompt are not independent of each other, prompts are."""
    keys, index = np.unique(groups, return_inverse=True)
    per_group = np.bincount(index, weights=values) / np.bincount(index)
    if len(keys) < 2:
        return float(per_group.mean()), float("nan")
    return float(per_group.mean()), float(per_group.std(ddof=1) / np.sqrt(len(keys)))


def kl_estimate(logp_policy: np.ndarray, logp_reference: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """KL(policy || reference) from responses SAMPLED from the policy (temperature 1, no filter): the mean of
    log pi(y|x) - log ref(y|x) is an unbiased estimate; returns (estimate, standard error)."""
    return mean_and_se(np.asarray(logp_policy, np.float64) - np.asarray(logp_reference, np.float64), groups)
