"""A run's lifecycle, and the one owner of its MLflow runs (a job's run, a sweep's parent run and its trials' runs).

    with open_run(config, address=args.address) as run:   # checks -> Ray -> MLflow run (created or resumed)
        result = align(run)

`open_run`: every check that needs no Ray (`ray_dpo.recipe.checks`), nothing written; then Ray (local, or
`--address` / `RAY_ADDRESS`; an already running Ray is used as it is), synthetic data when asked for, and the
MLflow run: created, or resumed when the same name ran before (its id is kept in the run directory), the config
logged (credentials redacted); FINISHED at the end, FAILED on any error. A sweep trial's run is opened with
`open_trial_run` and closed with `close_trial_run`, both here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ray_dpo.config import Config, flatten, save_config
from ray_dpo.core.encoding import Encoding
from ray_dpo.errors import in_stage, set_log_file
from ray_dpo.recipe.checks import Checked, RunKind, check
from ray_dpo.recipe.console import Console
from ray_dpo.stages import storage, tracking

RUN_ID_FILE = "mlflow_run_id"
ERROR_TAG = "ray_dpo.error"  # on a failed trial's run: the last line of its traceback


@dataclass(frozen=True)
class DataPaths:
    """Where the run reads its data: the config's paths, or the demo task's files staged in storage."""

    train: str | None
    val: str | None
    sft: str | None


@dataclass
class Run:
    """An open run: what every stage needs. The config is frozen; what the run derives lives here."""

    config: Config  # paths made absolute
    encoding: Encoding  # the one encoding spec (tokenizer, max lengths, chat template), saved with every checkpoint
    data: DataPaths
    tracking_uri: str
    run_id: str  # the MLflow run the stages log into
    run_dir: Path  # driver-local: the run's config.yaml, MLflow run id
    name: str  # what the run's files are named after in storage: `<train.storage_path>/<name>/...`
    console: Console  # the one place stages print to
    kind: RunKind = "align"
    status: str = "FINISHED"  # how the MLflow run ends when no error escaped (a sweep with failed trials: FAILED)

    @property
    def tokenizer(self):
        return self.encoding.tokenizer

    def staged(self, *parts: str) -> tuple[str, ...]:
        """Where the run stages what every node reads: `<train.storage_path>/<name>/staged/<parts>`."""
        return (self.name, "staged", *parts)


def start_ray(address: str | None, console: Console) -> None:
    """Start (or join) Ray, its logs to its session directory unless verbose. A running Ray is used as is."""
    import ray

    if not ray.is_initialized():
        if address is None and not os.environ.get("RAY_ADDRESS"):
            address = "local"  # never attach by surprise to another `ray start` on this machine
        with console.captured() as printed:
            context = ray.init(address=address, log_to_driver=console.verbose, configure_logging=console.verbose)
        session = context.address_info.get("session_dir")
        console.log_to(os.path.join(session, "logs") if session else None)
        if session:
            set_log_file(os.path.join(session, "logs", "ray-dpo-driver.log"))
        logging.getLogger("ray").info("ray.init printed: %s", printed.getvalue().strip())
    if not console.verbose:
        ray.data.DataContext.get_current().enable_progress_bars = False
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    gpus = f", {resources['GPU']:.0f} GPUs" if resources.get("GPU") else ""
    console.stage(f"Ray: {nodes} node{'s' if nodes > 1 else ''}, {resources.get('CPU', 0):.0f} CPUs{gpus}")


def _stage_demo_task(config: Config, name: str, run_dir: Path) -> DataPaths:
    """`data.synthetic=sort`: write the demo task and stage it in the run's storage (read tasks run on any node);
    its files stand in wherever the config leaves a path unset."""
    from ray_dpo.recipe.demo import write_sort_task

    local = write_sort_task(run_dir / "data" / "sort", rows=config.data.synthetic_rows, seed=config.data.seed)
    files = storage.stage_directory(run_dir / "data" / "sort", config.train.storage_path, name, "staged", "sort")
    paths = {k: storage.uri(files.filesystem, f"{files.path}/{Path(v).name}") for k, v in local.items()}
    return DataPaths(
        config.data.train_path or paths["train"], config.data.val_path or paths["val"], config.sft.path or paths["sft"]
    )


def _identity(config: Config, kind: RunKind) -> tuple[Path, str, str, dict[str, str]]:
    """(run directory, storage name, MLflow run name, tags) of a run kind."""
    out = Path(config.output_dir)
    name = config.tracking.run_name or config.train.run_name
    if kind == "sweep":
        tags = {"ray_dpo.kind": "sweep", "ray_dpo.sweep": config.tune.name}
        return out / "sweeps" / config.tune.name, config.tune.name, config.tune.name, tags
    if kind == "eval":
        tags = {"ray_dpo.kind": "eval"}
        return out / "runs" / f"{config.train.run_name}-eval", config.train.run_name, f"{name}-eval", tags
    return out / "runs" / config.train.run_name, config.train.run_name, name, {"ray_dpo.kind": "align"}


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
    checked: Checked | None = None,
) -> Iterator[Run]:
    """Check, start Ray, open the MLflow run; close it FINISHED (or `run.status`), or FAILED on an error.

    `run_id`: log into this existing run and leave it open afterwards (`pipelines/evaluate.py --run-id`).
    align and sweep runs resume their MLflow run when the same `train.run_name` / `tune.name` ran before; an eval
    run is new each time. `params` are logged besides the flattened config. `checked`: the checks already ran.
    """
    console = console or Console()
    console.quiet_libraries()
    with in_stage("checks"):
        checked = checked or check(config, kind)
    config = checked.config
    uri = tracking_uri or tracking.resolve_tracking_uri(config.tracking.uri, config.output_dir)
    tracking.check_tracking_uri(uri)
    # ---- from here on things start and are written
    with in_stage("Ray start"):
        start_ray(address, console)
    c = config  # every path a worker, actor or trial opens must be visible from every node
    keys = {"train.storage_path": c.train.storage_path, "data.train_path": c.data.train_path}
    keys |= {"data.val_path": c.data.val_path, "sft.path": c.sft.path, "train.init_checkpoint": c.train.init_checkpoint}
    storage.check_shared(keys)
    run_dir, name, run_name, tags = _identity(config, kind)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = DataPaths(c.data.train_path, c.data.val_path, c.sft.path)
    if c.data.synthetic == "sort":
        data = _stage_demo_task(config, name, run_dir)
    all_params = {**flatten(tracking.redacted_config(config).to_dict()), **tracking.redacted(params or {})}
    owned = run_id is None
    if owned:
        run_id = _open_mlflow_run(config, kind, run_dir, run_name, tags, uri, all_params)
        tracking.set_tags(uri, run_id, _source_tags(kind, config))
    console.stage(f"MLflow: run {run_id} in {tracking.redact(uri)}")
    run = Run(config, checked.encoding, data, uri, run_id, run_dir, name, console, kind)
    monitor = tracking.start_system_metrics(uri, run_id) if owned else None
    try:
        tracking.log_artifact(uri, run_id, save_config(tracking.redacted_config(config), run_dir / "config.yaml"))
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
    model = config.model.hf_path or f"{config.model.dim}x{config.model.depth} TransformerLM"
    loss = config.dpo.loss_type if isinstance(config.dpo.loss_type, str) else " + ".join(config.dpo.loss_type)
    tags = {
        "mlflow.source.name": " ".join(sys.argv) or "python",
        "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_ID") else "LOCAL",
        "mlflow.note.content": (
            f"ray-dpo {kind}: DPO ({loss}, beta={config.dpo.beta}) of {model} on "
            f"{config.data.train_path or config.data.synthetic}, {config.train.num_workers} "
            f"{config.train.strategy.upper()} workers"
        ),
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except OSError:
        pass  # no git: nothing to record
    return tracking.redacted(tags)


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


# ------------------------------------------------------------------------------------------------ sweep trials

TrialStatus = Literal["completed", "early_stopped", "errored"]


def open_trial_run(
    uri: str, parent_run_id: str, *, experiment: str, trial_id: str, name: str, config: Config, params: dict
) -> str:
    """The MLflow run of one sweep trial, nested under the sweep's run: found again by its tags when the trial is
    retried or the sweep restored (one run per trial), else created with the trial's config as params."""
    keys = {"ray_dpo.trial_id": trial_id}
    run_id = tracking.find_child_run(uri, parent_run_id, keys)
    if run_id is None:
        run_id = tracking.start_run(
            uri,
            experiment=experiment,
            run_name=name,
            params=flatten(tracking.redacted_config(config).to_dict()),
            tags={"ray_dpo.sweep": config.tune.name, **keys, **params},
            parent_run_id=parent_run_id,
        )
    return run_id


def close_trial_run(uri: str, run_id: str, status: TrialStatus, *, reason: str = "", retried: bool = False) -> None:
    """End a trial's run: FINISHED (completed, or stopped early by the scheduler: tagged so), or FAILED with why."""
    if status == "early_stopped":
        tracking.mark_early_stopped(uri, run_id, reason)
    elif status == "errored":
        tracking.set_tags(uri, run_id, {ERROR_TAG: reason})
    if status != "errored" and retried:  # a failed attempt's reason no longer holds
        tracking.delete_tag(uri, run_id, ERROR_TAG)
    tracking.end_run(uri, run_id, "FAILED" if status == "errored" else "FINISHED")
