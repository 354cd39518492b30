"""The recipe: one owner of a run's lifecycle, and the stages every pipeline composes.

    with open_run(config, address=args.address) as run:   # checks -> Ray -> MLflow run (created or resumed)
        result = align(run)                                # data -> (SFT) -> (reference pass) -> train -> eval

`open_run`: checks that write nothing (config, data paths, checkpoint, tokenizer, tracking URI), then Ray (local, or
`--address` / `RAY_ADDRESS`; an already running Ray is used as it is), synthetic data when asked for, and the
MLflow run: created, or resumed when the same name ran before (its id is kept in the run directory), the config
logged as an artifact; FINISHED at the end, FAILED on any error. `pipelines/align.py`, `pipelines/sweep.py` (via
`ray_dpo.recipe.sweep.run_sweep`) and `pipelines/evaluate.py` all go through it.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from ray.train import Checkpoint

from ray_dpo.config import Config, ConfigError, flatten, save_config
from ray_dpo.core.losses import default_reduction
from ray_dpo.core.tokenizer import PretrainedTokenizer, Tokenizer, load_tokenizer
from ray_dpo.errors import UserError
from ray_dpo.recipe.console import Console
from ray_dpo.stages import storage, tracking

RunKind = Literal["align", "sweep", "eval"]
RUN_ID_FILE = "mlflow_run_id"


@dataclass
class Run:
    """An open run: what every stage needs."""

    config: Config  # paths made absolute
    tokenizer: Tokenizer
    tracking_uri: str
    run_id: str  # the MLflow run the stages log into
    run_dir: Path  # driver-local: the run's config.yaml, MLflow run id, starting weights
    console: Console  # the one place stages print to
    status: str = "FINISHED"  # how the MLflow run ends when no error escaped (a sweep with failed trials: FAILED)


# ------------------------------------------------------------------------------------- checks (nothing written)


def _is_uri(path: str) -> bool:
    return "://" in path


def _absolute(path: str | None) -> str | None:
    return path if path is None or _is_uri(path) else str(Path(path).expanduser().resolve())


def resolve_paths(config: Config) -> Config:
    """A copy with absolute local paths: Ray workers chdir into their session dir and `ray job submit` runs
    elsewhere."""
    c = copy.deepcopy(config)
    c.output_dir = _absolute(c.output_dir)
    c.train.storage_path = _absolute(c.train.storage_path)
    c.data.train_path, c.data.val_path = _absolute(c.data.train_path), _absolute(c.data.val_path)
    c.sft.path, c.train.init_checkpoint = _absolute(c.sft.path), _absolute(c.train.init_checkpoint)
    if c.data.tokenizer != "byte":
        c.data.tokenizer = _absolute(c.data.tokenizer)
    return c


def _check_exists(key: str, path: str | None) -> None:
    if path is None or _is_uri(path):
        return  # remote paths are checked by the reader
    if not (os.path.exists(path) or glob.glob(path)):
        raise ConfigError(f"config: {key}: no such file or directory: {path}")


def check_config(config: Config) -> Tokenizer:
    """Cheap checks: data paths, checkpoint, tokenizer, vocabulary. Returns the tokenizer."""
    c = config
    if c.data.synthetic not in (None, "sort"):
        raise ConfigError(f"config: data.synthetic must be 'sort' or null, got {c.data.synthetic!r}")
    if c.data.train_path is None and c.data.synthetic is None:
        raise ConfigError("config: data.train_path is required (or data.synthetic=sort for the demo task)")
    for key, path in (("data.train_path", c.data.train_path), ("data.val_path", c.data.val_path)):
        _check_exists(key, path)
    _check_exists("sft.path", c.sft.path)
    if c.train.init_checkpoint is not None:
        _check_exists("train.init_checkpoint", str(Path(c.train.init_checkpoint) / "model.safetensors"))
    if c.model.hf_path is not None:
        return _check_hf_model(c)
    try:
        tokenizer = load_tokenizer(c.data.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"config: data.tokenizer: {err}") from None
    _check_chat(c, tokenizer, c.data.tokenizer)
    vocab = c.model.vocab_size
    if c.train.init_checkpoint is None and vocab < tokenizer.vocab_size:
        raise ConfigError(f"config: model.vocab_size={vocab} < the tokenizer's {tokenizer.vocab_size} tokens")
    if c.data.max_len > c.model.max_seq_len:
        raise ConfigError(f"config: data.max_len={c.data.max_len} exceeds model.max_seq_len={c.model.max_seq_len}")
    if not 1 <= c.data.max_prompt_len <= c.data.max_len:
        raise ConfigError(
            f"config: need 1 <= data.max_prompt_len <= data.max_len, got {c.data.max_prompt_len} and {c.data.max_len}"
        )
    return tokenizer


def _check_chat(c: Config, tokenizer: Tokenizer, where: str) -> None:
    if c.data.chat_template and not getattr(tokenizer, "has_chat_template", False):
        raise ConfigError(f"config: data.chat_template=true but the tokenizer of {where} has no chat template")


def _check_hf_model(c: Config) -> Tokenizer:
    """model.hf_path: a causal LM `AutoModelForCausalLM` loads; its (or data.tokenizer's) tokenizer; LoRA targets that
    exist. Reads configs only: no weights are loaded."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        raise ConfigError("config: model.hf_path needs transformers and peft: pip install -e '.[hf]'") from None
    path = c.model.hf_path
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"config: model.hf_path={path}: not a Hugging Face model ({str(err).splitlines()[0]})"
        ) from None
    if hf_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"config: model.hf_path={path} is a {hf_config.model_type} model, not a causal LM")
    where = c.data.tokenizer if c.data.tokenizer != "byte" else path
    try:
        tokenizer = load_tokenizer(where) if where != path else PretrainedTokenizer(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"config: data.tokenizer: {where}: {str(err).splitlines()[0]}") from None
    _check_chat(c, tokenizer, where)
    positions = getattr(hf_config, "max_position_embeddings", None)
    if positions is not None and c.data.max_len > positions:
        raise ConfigError(f"config: data.max_len={c.data.max_len} exceeds the model's {positions} positions")
    if c.model.lora_r:
        from ray_dpo.stages.models import lora_targets_match

        with torch.device("meta"):  # the module tree, no memory
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        if not lora_targets_match(skeleton, c.model.lora_target_modules):
            raise ConfigError(
                f"config: model.lora_target_modules={c.model.lora_target_modules} match no module of "
                f"{type(skeleton).__name__}"
            )
    return tokenizer


# ------------------------------------------------------------------------------------------------- lifecycle


def start_ray(address: str | None, console: Console) -> None:
    """Start (or join) Ray, its logs to its session directory unless verbose. A running Ray is used as is.
    Workers need no tracking settings: the driver logs."""
    import ray

    if not ray.is_initialized():
        if address is None and not os.environ.get("RAY_ADDRESS"):
            address = "local"  # never attach by surprise to another `ray start` on this machine
        # not verbose: workers' output and Ray's own driver logs go to the session's log files, not the console
        with console.captured() as printed:
            context = ray.init(address=address, log_to_driver=console.verbose, configure_logging=console.verbose)
        session = context.address_info.get("session_dir")
        console.log_to(os.path.join(session, "logs") if session else None)
        logging.getLogger("ray").info("ray.init printed: %s", printed.getvalue().strip())
    if not console.verbose:
        ray.data.DataContext.get_current().enable_progress_bars = False
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    gpus = f", {resources['GPU']:.0f} GPUs" if resources.get("GPU") else ""
    console.stage(f"Ray: {nodes} node{'s' if nodes > 1 else ''}, {resources.get('CPU', 0):.0f} CPUs{gpus}")


def staged(config: Config, *parts: str) -> tuple[str, ...]:
    """Where a run stages what every node reads: `<train.storage_path>/<train.run_name>/staged/<parts>`."""
    return (config.train.run_name, "staged", *parts)


def write_synthetic(config: Config, run_dir: Path) -> None:
    """`data.synthetic=sort`: write the demo task, stage it in the run's storage (read tasks run on any node) and
    use it wherever the config leaves a path unset."""
    from ray_dpo.recipe.demo import write_sort_task

    local = write_sort_task(run_dir / "data" / "sort", rows=config.data.synthetic_rows, seed=config.data.seed)
    files = storage.stage_directory(run_dir / "data" / "sort", config.train.storage_path, *staged(config, "sort"))
    paths = {k: storage.uri(files.filesystem, f"{files.path}/{Path(v).name}") for k, v in local.items()}
    config.data.train_path = config.data.train_path or paths["train"]
    config.data.val_path = config.data.val_path or paths["val"]
    config.sft.path = config.sft.path or paths["sft"]


def _run_identity(config: Config, kind: RunKind) -> tuple[Path, str, dict[str, str]]:
    """(run directory, MLflow run name, tags) of a run kind."""
    out = Path(config.output_dir)
    name = config.tracking.run_name or config.train.run_name
    if kind == "sweep":
        return out / "sweeps" / config.tune.name, config.tune.name, {"ray_dpo.kind": "sweep", "ray_dpo.sweep": name}
    if kind == "eval":
        return out / "runs" / f"{config.train.run_name}-eval", f"{name}-eval", {"ray_dpo.kind": "eval"}
    return out / "runs" / config.train.run_name, name, {"ray_dpo.kind": "align"}


@contextlib.contextmanager
def open_run(
    config: Config,
    *,
    address: str | None = None,
    kind: RunKind = "align",
    run_id: str | None = None,
    tracking_uri: str | None = None,
    params: Mapping[str, Any] | None = None,
    console: Console | None = None,
) -> Iterator[Run]:
    """Check, start Ray, open the MLflow run; close it FINISHED (or `run.status`), or FAILED on an error.

    `run_id`: log into this existing run and leave it open afterwards (`pipelines/evaluate.py --run-id`).
    align and sweep runs resume their MLflow run when the same `train.run_name` / `tune.name` ran before; an eval
    run is new each time. `params` are logged besides the flattened config.
    """
    console = console or Console()
    console.quiet_libraries()
    config = resolve_paths(config)
    tokenizer = check_config(config)
    uri = tracking_uri or tracking.resolve_tracking_uri(config.tracking.uri, config.output_dir)
    tracking.check_tracking_uri(uri)
    # ---- from here on things start and are written
    start_ray(address, console)
    c = config  # every path a worker, actor or trial opens must be visible from every node
    keys = {"train.storage_path": c.train.storage_path, "data.train_path": c.data.train_path}
    keys |= {"data.val_path": c.data.val_path, "sft.path": c.sft.path, "train.init_checkpoint": c.train.init_checkpoint}
    storage.check_shared(keys)
    run_dir, run_name, tags = _run_identity(config, kind)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.data.synthetic == "sort":
        write_synthetic(config, run_dir)
    all_params = {**flatten(config.to_dict()), **(params or {})}
    owned = run_id is None
    if owned:
        run_id = _open_mlflow_run(config, kind, run_dir, run_name, tags, uri, all_params)
        tracking.set_tags(uri, run_id, _source_tags(kind, config))
    console.stage(f"MLflow: run {run_id} in {uri}")
    run = Run(config=config, tokenizer=tokenizer, tracking_uri=uri, run_id=run_id, run_dir=run_dir, console=console)
    monitor = tracking.start_system_metrics(uri, run_id) if owned else None
    try:
        tracking.log_artifact(uri, run_id, save_config(config, run_dir / "config.yaml"))
        yield run
    except BaseException:
        if owned:
            tracking.end_run(uri, run_id, "FAILED")
        raise
    finally:
        if monitor is not None:
            monitor.finish()
    if owned:
        tracking.end_run(uri, run_id, run.status)


def _source_tags(kind: RunKind, config: Config) -> dict[str, str]:
    """Where the run came from, as the MLflow UI shows it: the command, the git commit when there is one, a note."""
    import subprocess
    import sys

    tags = {
        "mlflow.source.name": " ".join(sys.argv) or "python",
        "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_ID") else "LOCAL",
        "mlflow.note.content": (
            f"ray-dpo {kind}: DPO ({config.dpo.loss_type}, beta={config.dpo.beta}) of a "
            f"{config.model.dim}x{config.model.depth} policy on {config.data.train_path}, "
            f"{config.train.num_workers} {config.train.strategy.upper()} workers"
        ),
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except OSError:
        pass  # no git: nothing to record
    return tags


def _open_mlflow_run(config, kind, run_dir, run_name, tags, uri, params) -> str:
    experiment = config.tracking.experiment
    id_file = run_dir / RUN_ID_FILE  # a re-run of the same name logs into the same MLflow run
    if kind != "eval" and id_file.exists():
        run_id = id_file.read_text().strip()
        if tracking.resume_run(uri, run_id, experiment=experiment, params=params):
            return run_id
    run_id = tracking.start_run(uri, experiment=experiment, run_name=run_name, params=params, tags=tags)
    id_file.write_text(run_id)
    return run_id


# ------------------------------------------------------------------------------------------------- stages


def load_data(run: Run):
    """Tokenized train / val datasets; training order shuffled (seeded) unless length bucketing orders it.
    Validation is `data.val_path`, else the `data.val_fraction` held out of the training file."""
    from ray_dpo.stages.data import bucket_by_length, read_preferences, split_train_val

    d = run.config.data
    kwargs = dict(
        tokenizer=run.tokenizer,
        max_len=d.max_len,
        max_prompt_len=d.max_prompt_len,
        columns=d.columns or None,
        on_bad_row=d.on_bad_row,
    )
    train_ds, stats = read_preferences(d.train_path, **kwargs)
    all_stats = {"train": stats.as_dict()}
    uri, run_id = run.tracking_uri, run.run_id
    tracking.log_dataset(uri, run_id, name="train", source=d.train_path, digest=stats.digest, context="training")
    if d.val_path:
        val_ds, val_stats = read_preferences(d.val_path, **kwargs)
        all_stats["val"] = val_stats.as_dict()
        tracking.log_dataset(uri, run_id, name="val", source=d.val_path, digest=val_stats.digest, context="validation")
    else:
        train_ds, val_ds = split_train_val(train_ds, d.val_fraction, d.seed)
    if d.length_bucket_window > 0:
        train_ds = bucket_by_length(train_ds, d.length_bucket_window, seed=d.seed)
    else:
        train_ds = train_ds.random_shuffle(seed=d.seed).materialize()
    all_stats["train"]["rows_used"], all_stats["val_rows"] = train_ds.count(), val_ds.count()
    tracking.log_dict(uri, run_id, all_stats, "data/stats.json")
    dropped = sum(stats.dropped.values())
    run.console.stage(
        f"data: {all_stats['train']['rows_used']:,} training and {all_stats['val_rows']:,} validation pairs "
        f"({dropped:,} dropped, {stats.truncated:,} truncated; data/stats.json)"
    )
    return train_ds, val_ds


def starting_weights(run: Run) -> Checkpoint:
    """The checkpoint both the policy and the reference start from (your Hugging Face model, an init checkpoint or
    a seeded fresh TransformerLM, then the SFT warm start when `sft.path` is set), saved once with the tokenizer and
    staged in the run's storage: every rank and actor loads the same reference from it, on any node, and a re-run
    of the same run name reuses it."""
    from ray_dpo.core.model import TransformerLM
    from ray_dpo.stages import models

    config, console = run.config, run.console
    storage_path = config.train.storage_path
    found = storage.find_directory(storage_path, *staged(config, "reference"))
    if found is not None:
        console.stage(f"reference: {storage.checkpoint_uri(found)} (from an earlier run of this name)")
        return found
    hf_path = config.model.hf_path
    if hf_path is not None:
        console.stage(f"model: {hf_path} (model.dim, depth, heads and the other TransformerLM keys are ignored)")
    if hf_path is not None and config.sft.path is None and Path(hf_path).is_dir():
        # your model is the reference: its files staged as they are (no load on the driver), your tokenizer beside
        reference = storage.stage_directory(hf_path, storage_path, *staged(config, "reference"), complete=False)
        models.save_tokenizer(run.tokenizer, run.run_dir / "tokenizer")
        reference = storage.stage_directory(run.run_dir / "tokenizer", storage_path, *staged(config, "reference"))
        console.stage(f"reference: {storage.checkpoint_uri(reference)}")
        return reference
    if hf_path is not None:
        model = models.load(hf_path)
    elif config.train.init_checkpoint is not None:
        model = models.load(config.train.init_checkpoint)
    else:
        torch.manual_seed(config.train.seed)
        model = TransformerLM(config.model.transformer_config())
    if config.sft.path is not None:
        from ray_dpo.stages.data import read_sft
        from ray_dpo.stages.train import train_sft

        models.save(run.run_dir / "sft-init", model, tokenizer=run.tokenizer)
        start = storage.stage_directory(run.run_dir / "sft-init", storage_path, *staged(config, "sft-init"))
        sft_ds, _ = read_sft(
            config.sft.path,
            tokenizer=run.tokenizer,
            max_len=config.data.max_len,
            max_prompt_len=config.data.max_prompt_len,
            prompt_column=config.sft.prompt_column,
            response_column=config.sft.response_column,
            on_bad_row=config.data.on_bad_row,
            chat_template=config.data.chat_template,
        )
        progress = console.progress("sft")
        result = train_sft(
            config,
            sft_ds,
            init_checkpoint=start,
            run_id=run.run_id,
            tracking_uri=run.tracking_uri,
            pad_id=run.tokenizer.pad_id,
            progress=progress,
        )
        progress.close()
        model = models.load(result.checkpoint)
        if callable(getattr(model, "merge_and_unload", None)):  # LoRA SFT: the reference is base + SFT, merged
            model = model.merge_and_unload()
    models.save(run.run_dir / "reference", model, tokenizer=run.tokenizer)
    reference = storage.stage_directory(run.run_dir / "reference", storage_path, *staged(config, "reference"))
    console.stage(f"reference: {storage.checkpoint_uri(reference)}")
    return reference


def precompute_reference(run: Run, datasets: list, reference: Checkpoint) -> list:
    """`dpo.reference=precomputed`: reference log-probs as columns of every dataset (one actor-pool pass)."""
    from ray_dpo.stages.reference import add_reference_logps

    d = run.config.dpo
    reduction = default_reduction(d.loss_type, d.reduction)
    run.console.stage("reference log-probs: one actor-pool pass over the training and validation pairs")
    return [add_reference_logps(ds, reference, reduction=reduction, prefix_sharing=d.prefix_sharing) for ds in datasets]


def evaluate_policy(
    run: Run, policy: str | Checkpoint, reference: str | Checkpoint, prompts_ds, pairs_ds
) -> dict[str, float]:
    """Policy vs reference on held-out prompts (the `prompt` token rows of `prompts_ds`) and pairs; logged."""
    from ray_dpo.stages.evaluate import evaluate

    e = run.config.eval
    run.console.stage(f"eval: policy vs reference on {e.num_prompts} held-out prompts ({e.concurrency} actors)")
    return evaluate(
        run.config,
        policy_checkpoint=policy,
        reference_checkpoint=reference,
        prompts_ds=prompts_ds,
        preference_ds=pairs_ds,
        tracking_uri=run.tracking_uri,
        run_id=run.run_id,
    )


@dataclass
class AlignResult:
    run_id: str
    tracking_uri: str
    checkpoint: str  # URI of the final checkpoint in storage
    steps: int
    eval_metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None


def align(run: Run) -> AlignResult:
    """The align recipe: data -> starting weights (SFT) -> (reference pass) -> DPO training -> evaluation on the
    validation split (rows the policy never trained on) -> the final checkpoint and the registered model."""
    from ray_dpo.stages.train import train_dpo

    config, uri = run.config, run.tracking_uri
    train_ds, val_ds = load_data(run)
    reference = starting_weights(run)
    if config.dpo.reference == "precomputed":
        train_ds, val_ds = precompute_reference(run, [train_ds, val_ds], reference)
    progress = run.console.progress("dpo")
    trained = train_dpo(
        config,
        train_ds,
        val_ds,
        run_id=run.run_id,
        tracking_uri=uri,
        init_checkpoint=reference,
        reference_checkpoint=reference,
        pad_id=run.tokenizer.pad_id,
        progress=progress,
    )
    progress.close()
    run.console.stage(f"policy: {trained.uri} ({trained.steps} steps)")
    with storage.local_directory(trained.checkpoint) as final:
        tracking.log_artifact(uri, run.run_id, final, "checkpoints/final")
        if config.model.hf_path is not None:  # your model back, in its own format (LoRA merged; the adapter too)
            from ray_dpo.stages.serving import export_hf

            exported = export_hf(final, run.run_dir / "export")
            tracking.log_artifact(uri, run.run_id, run.run_dir / "export", "export")
            run.console.stage(f"export: {exported['model']} (a Hugging Face model directory; MLflow: export/)")
        if config.tracking.registered_model:
            from ray_dpo.stages.serving import register_model

            model_uri = register_model(uri, run.run_id, final, config.tracking.registered_model)
            run.console.stage(f"registered: {model_uri}")
    result = AlignResult(run.run_id, uri, trained.uri, trained.steps)
    if config.eval.enabled:
        result.eval_metrics = evaluate_policy(run, trained.checkpoint, reference, val_ds, val_ds)
    if config.tracking.registered_model:
        result.model_uri = model_uri
    return result


def evaluate_checkpoints(
    run: Run, checkpoint: str, reference: str, *, prompts_path: str | None = None, pairs_path: str | None = None
) -> dict[str, float]:
    """Evaluate a policy checkpoint against a reference (`pipelines/evaluate.py`). Prompts and pairs default to the
    config's validation split (`data.val_path`, or the `data.val_fraction` held out of `data.train_path`)."""
    from ray_dpo.stages.data import read_preferences, read_prompts

    c = run.config
    if pairs_path is not None:
        pairs, _ = read_preferences(
            _absolute(pairs_path),
            tokenizer=run.tokenizer,
            max_len=c.data.max_len,
            max_prompt_len=c.data.max_prompt_len,
            columns=c.data.columns or None,
            on_bad_row=c.data.on_bad_row,
        )
    elif c.data.train_path or c.data.val_path:
        _, pairs = load_data(run)
    else:
        raise UserError("evaluate: no held-out data: pass --pairs FILE.parquet or set data.val_path")
    prompts = pairs
    if prompts_path is not None:
        column = c.data.columns.get("prompt", "prompt")
        prompts = read_prompts(_absolute(prompts_path), tokenizer=run.tokenizer, column=column)
    return evaluate_policy(run, checkpoint, reference, prompts, pairs)
