"""The stage graph every pipeline composes, on an open `Run` (`ray_dpo.recipe.run`):

    data = load_data(run)                               # Parquet -> accounted token rows; train / val; order
    reference = starting_weights(run)                   # your model, an init checkpoint or a fresh one; then SFT
    data = with_reference_logps(run, data, reference)   # dpo.reference=precomputed: one pass, or the cache
    trained = train_and_evaluate(run.config, data, reference, ...)   # DPO on Ray Train, then policy vs reference
    publish(run, trained)                               # final checkpoint, export, registered model

`align` runs them in this order; a sweep trial (`ray_dpo.recipe.sweep`) is `train_and_evaluate` with Tune's report
callback, on the data and reference its sweep prepared once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.train import Checkpoint

from ray_dpo.config import Config
from ray_dpo.core.encoding import Encoding
from ray_dpo.errors import UserError, in_stage
from ray_dpo.recipe.checks import absolute
from ray_dpo.recipe.console import Console, Progress
from ray_dpo.recipe.run import Run
from ray_dpo.stages import storage, tracking
from ray_dpo.stages.data.handoff import Handoff
from ray_dpo.stages.weights import WeightSource, stage_weights


@dataclass(frozen=True)
class Data:
    train: ray.data.Dataset | Handoff  # in training order; a Handoff when training may free it as it deals it
    val: ray.data.Dataset  # rows the policy never trains on: validation, evaluation prompts and pairs


@dataclass
class Trained:
    checkpoint: Checkpoint  # the final checkpoint in storage
    steps: int
    metrics: dict[str, float]  # the last train/* and val/* metrics
    eval_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return storage.checkpoint_uri(self.checkpoint)


@dataclass
class AlignResult:
    run_id: str
    tracking_uri: str
    checkpoint: str  # URI of the final checkpoint in storage
    steps: int
    eval_metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None
    export: str | None = None  # the Hugging Face directory of a Hugging Face policy (LoRA merged), in storage


@in_stage("data")
def load_data(run: Run) -> Data:
    """Tokenized train / val datasets; training order shuffled (seeded) unless length bucketing orders it.
    Validation is `data.val_path`, else the `data.val_fraction` held out of the training file. Each step takes the
    previous one's rows (a `Handoff`) and frees them block by block: one copy of the rows in the object store."""
    from ray_dpo.stages.data import order_rows, read_preferences, split_and_order

    d, uri, run_id = run.config.data, run.tracking_uri, run.run_id
    kwargs = dict(encoding=run.encoding, columns=d.columns or None, on_bad_row=d.on_bad_row)
    read, stats = read_preferences(run.data.train, **kwargs)
    rows = Handoff(read)
    del read  # the handoff holds the read's blocks alone: ordering frees each as it is routed
    all_stats = {"train": stats.as_dict()}
    source = tracking.redact(run.data.train)
    tracking.log_dataset(uri, run_id, name="train", source=source, digest=stats.digest, context="training")
    if run.data.val:
        val_ds, val_stats = read_preferences(run.data.val, **kwargs)
        all_stats["val"] = val_stats.as_dict()
        source = tracking.redact(run.data.val)
        tracking.log_dataset(uri, run_id, name="val", source=source, digest=val_stats.digest, context="validation")
        train_ds = order_rows(rows, seed=d.seed, window=d.length_bucket_window)
    else:
        train_ds, val_ds = split_and_order(
            rows, val_fraction=d.val_fraction, seed=d.seed, window=d.length_bucket_window
        )
    all_stats["train"]["rows_used"], all_stats["val_rows"] = train_ds.count(), val_ds.count()
    tracking.log_dict(uri, run_id, all_stats, "data/stats.json")
    dropped = sum(stats.dropped.values())
    run.console.stage(
        f"data: {all_stats['train']['rows_used']:,} training and {all_stats['val_rows']:,} validation pairs "
        f"({dropped:,} dropped, {stats.truncated:,} truncated; data/stats.json)"
    )
    return Data(train_ds, val_ds)


@in_stage("starting weights")
def starting_weights(run: Run) -> Checkpoint:
    """The checkpoint both the policy and the reference start from (your Hugging Face model, an init checkpoint or
    a seeded fresh TransformerLM, then the SFT warm start when `sft.path` is set), staged once with the encoding in
    the run's storage: every rank and actor loads the same reference from it, on any node, and a re-run of the same
    run name reuses it. The driver loads no weights (`ray_dpo.stages.weights`)."""
    config, console = run.config, run.console
    storage_path, use_gpu = config.train.storage_path, config.train.use_gpu
    found = storage.find_directory(storage_path, *run.staged("reference"))
    if found is not None:
        console.stage(f"reference: {storage.checkpoint_uri(found)} (from an earlier run of this name)")
        return found
    if config.model.hf_path is not None:
        console.stage(f"model: {config.model.hf_path} (the TransformerLM keys of model.* are ignored)")
    source = WeightSource(
        config.model.hf_path or config.train.init_checkpoint, config.model.transformer_config(), config.train.seed
    )
    if run.data.sft is not None:
        from ray_dpo.stages.data import read_sft
        from ray_dpo.stages.train import train_sft

        start = stage_weights(source, storage_path, *run.staged("sft-init"), encoding=run.encoding, use_gpu=use_gpu)
        s = config.sft
        sft_ds, _ = read_sft(
            run.data.sft,
            encoding=run.encoding,
            prompt_column=s.prompt_column,
            response_column=s.response_column,
            on_bad_row=config.data.on_bad_row,
        )
        sft_rows = Handoff(sft_ds)
        del sft_ds  # dealt to the ranks and freed as it goes
        progress = console.progress("sft")
        result = train_sft(
            config,
            sft_rows,
            name=f"{run.name}-sft",
            init_checkpoint=start,
            pad_id=run.tokenizer.pad_id,
            mlflow_run=(run.tracking_uri, run.run_id),
            progress=progress,
        )
        progress.close()
        source = WeightSource(result.checkpoint)  # LoRA SFT: base + adapters, merged into the reference
    reference = stage_weights(source, storage_path, *run.staged("reference"), encoding=run.encoding, use_gpu=use_gpu)
    console.stage(f"reference: {storage.checkpoint_uri(reference)}")
    return reference


REFERENCE_TAG = "ray_dpo.reference_logps"  # MLflow tag: "computed" (the pass ran) or "reused" (from the cache)


def reference_scoring(config: Config) -> dict[str, Any]:
    """Everything that changes the reference pass's numbers, besides the weights and the encoding (the cache key)."""
    d, data = config.dpo, config.data
    return dict(  # the pass stores sums over response tokens whatever the loss: each loss normalises them itself
        precision=config.train.precision,
        prefix_sharing=d.prefix_sharing,
        pack_len=data.pack_len if data.packing else None,
    )


@in_stage("reference log-probs")
def with_reference_logps(run: Run, data: Data, reference: Checkpoint) -> Data:
    """`dpo.reference=precomputed`: reference log-probs as columns of both splits (one actor-pool pass); trainers
    then hold only the policy. None for a loss that uses no reference (sft, simpo, orpo). With `dpo.reference_cache`
    they are read from the cache when it holds every row (the same reference weights, encoding and scoring
    settings), else computed and added to it."""
    if run.config.dpo.reference != "precomputed" or not run.config.dpo.uses_reference:
        return data
    from ray_dpo.stages.reference import ReferenceCache, reference_logps, weights_digest

    d, t = run.config.dpo, run.config.train
    scoring = reference_scoring(run.config)
    pool = dict(
        prefix_sharing=d.prefix_sharing,
        pack_len=scoring["pack_len"],
        bf16=t.precision == "bf16",  # scored as the trainer's live reference would be
        batch_size=d.reference_batch_size,
        concurrency=d.reference_concurrency,
        num_gpus=d.reference_num_gpus if d.reference_num_gpus is not None else (1.0 if t.use_gpu else 0.0),
    )
    cache = None
    if d.reference_cache:
        # the digest reads every weight file: a task does it (the driver reads no weights) and keeps it beside them
        ray.get(ray.remote(weights_digest).options(num_cpus=0.5).remote(reference))
        cache = ReferenceCache.for_reference(
            t.storage_path, reference, encoding=run.encoding.to_json(), scoring=scoring
        )
    started = time.perf_counter()
    (train, reused_train), (val, reused_val) = (
        reference_logps(ds, reference, cache=cache, **pool) for ds in (data.train, data.val)
    )
    how = "reused" if cache is not None and reused_train and reused_val else "computed"
    tracking.set_tags(run.tracking_uri, run.run_id, {REFERENCE_TAG: how})
    where = f" (cache {cache.uri})" if cache is not None else ""
    run.console.stage(
        f"reference log-probs: {how} for {train.count():,} training and {val.count():,} validation pairs in "
        f"{time.perf_counter() - started:.1f} s{where}"
    )
    return Data(train, val)


@in_stage("train and evaluate")
def train_and_evaluate(
    config: Config,
    data: Data,
    reference: Checkpoint,
    *,
    encoding: Encoding,
    name: str,
    mlflow_run: tuple[str, str],
    progress: Progress | None = None,
    console: Console | None = None,
    callbacks: list | None = None,
) -> Trained:
    """The one train + eval step of every pipeline: DPO from `reference` on Ray Train (Ray run `name` in
    `train.storage_path`; re-running the same name resumes), then the policy against the reference on the validation
    split's prompts and pairs, logged into `mlflow_run` (uri, run id)."""
    from ray_dpo.stages.evaluate import evaluate
    from ray_dpo.stages.train import train_dpo

    result = train_dpo(
        config,
        data.train,
        data.val,
        name=name,
        init_checkpoint=reference,
        reference_checkpoint=reference,
        pad_id=encoding.tokenizer.pad_id,
        mlflow_run=mlflow_run,
        progress=progress,
        callbacks=callbacks,
    )
    if progress is not None:
        progress.close()
    trained = Trained(result.checkpoint, result.steps, result.metrics)
    if console is not None:
        console.stage(f"policy: {trained.uri} ({trained.steps} steps)")
    if config.eval.enabled:
        if console is not None:
            e = config.eval
            console.stage(f"eval: policy vs reference on {e.num_prompts} held-out prompts ({e.concurrency} actors)")
        trained.eval_metrics = evaluate(
            config,
            policy_checkpoint=result.checkpoint,
            reference_checkpoint=reference,
            prompts_ds=data.val,
            preference_ds=data.val,
            encoding=encoding,
            mlflow_run=mlflow_run,
        )
    return trained


@in_stage("publish")
def publish(run: Run, trained: Trained) -> tuple[str | None, str | None]:
    """The final checkpoint into MLflow, a Hugging Face policy exported (LoRA merged) into storage, the policy
    registered as an MLflow model: all from a Ray task (`ray_dpo.stages.serving.publish`), never loaded by the
    driver. Returns (registered model URI, export URI)."""
    from ray_dpo.stages.serving import publish as publish_task

    config = run.config
    published = publish_task(
        trained.checkpoint,
        tracking_uri=run.tracking_uri,
        run_id=run.run_id,
        registered_model=config.tracking.registered_model,
        export_to=(config.train.storage_path, *run.staged("export")) if run.config.model.hf_path else None,
        use_gpu=config.train.use_gpu,
    )
    if published.export:
        run.console.stage(f"export: {published.export} (a Hugging Face model directory; MLflow: export/)")
    if published.model_uri:
        run.console.stage(f"registered: {published.model_uri}")
    return published.model_uri, published.export


def align(run: Run) -> AlignResult:
    """The align recipe: data -> starting weights (SFT) -> (reference pass) -> DPO training -> evaluation on the
    validation split (rows the policy never trained on) -> the final checkpoint, exported and registered."""
    data = load_data(run)
    reference = starting_weights(run)
    data = with_reference_logps(run, data, reference)
    # nothing after training reads the training rows: training frees them as it deals them to the ranks
    data = Data(Handoff(data.train), data.val)
    trained = train_and_evaluate(
        run.config,
        data,
        reference,
        encoding=run.encoding,
        name=run.name,
        mlflow_run=(run.tracking_uri, run.run_id),
        progress=run.console.progress("dpo"),
        console=run.console,
    )
    model_uri, export = publish(run, trained)
    return AlignResult(
        run.run_id, run.tracking_uri, trained.uri, trained.steps, trained.eval_metrics, model_uri, export
    )


@in_stage("evaluate")
def evaluate_checkpoints(
    run: Run, checkpoint: str, reference: str, *, prompts_path: str | None = None, pairs_path: str | None = None
) -> dict[str, float]:
    """Evaluate a policy checkpoint against a reference (`pipelines/evaluate.py`), encoding as the policy was trained
    (`run.encoding`: the checkpoint's own). Prompts and pairs default to the config's validation split."""
    from ray_dpo.stages.data import read_preferences, read_prompts
    from ray_dpo.stages.evaluate import evaluate

    c = run.config
    if pairs_path is not None:
        pairs, _ = read_preferences(
            absolute(pairs_path), encoding=run.encoding, columns=c.data.columns or None, on_bad_row=c.data.on_bad_row
        )
    elif run.data.train or run.data.val:
        pairs = load_data(run).val
    else:
        raise UserError("evaluate: no held-out data: pass --pairs FILE.parquet or set data.val_path")
    prompts = pairs
    if prompts_path is not None:
        column = c.data.columns.get("prompt", "prompt")
        prompts = read_prompts(absolute(prompts_path), encoding=run.encoding, column=column)
    e = c.eval
    run.console.stage(f"eval: policy vs reference on {e.num_prompts} held-out prompts ({e.concurrency} actors)")
    return evaluate(
        c,
        policy_checkpoint=checkpoint,
        reference_checkpoint=reference,
        prompts_ds=prompts,
        preference_ds=pairs,
        encoding=run.encoding,
        mlflow_run=(run.tracking_uri, run.run_id),
    )
