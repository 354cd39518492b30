"""Ray Tune sweep over the DPO stage (`dpo.beta` x `train.lr`, or any dotted config key): one trial = train + eval.

    result = run_sweep(load_config("configs/sweep.yaml"))   # -> SweepResult(best_config_path, parent_run_id, ...)

Layout (Ray 2.60, Train V2): a Tune FUNCTION trainable (`_trial`) builds and fits a TorchTrainer through
`stages.train.train_dpo` with `TuneReportCallback` in the trainer's RunConfig, so every validation report of rank 0
reaches Tune (and ASHA) while training runs. Shared work happens once in the sweep driver: data loading, the SFT
warm start / reference checkpoint, the eval prompts; trials get the materialized datasets via `tune.with_parameters`.

Everything lives under `<output_dir>/sweeps/<tune.name>/`: `reference/` (starting weights), `tune/` (Tune's
experiment state: `Tuner.restore` continues it), `train/<name>-<trial id>/` (each trial's Ray Train run and
checkpoints), `trials/<trial id>.jsonl` (every Tune result, written by the driver), `results.csv`,
`best_config.yaml`, `plots/`, `mlflow_run_id`. MLflow: one parent run per sweep, one nested run per trial.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ray_dpo import recipe
from ray_dpo.config import Config, ConfigError, config_from_dict, flatten, save_config
from ray_dpo.recipe.console import Console
from ray_dpo.stages import tracking

logger = logging.getLogger(__name__)
FAIL_ENV = "RAY_DPO_SWEEP_FAIL"  # a marker path: the first trial to start makes it and raises (retry/restore tests)
START_KEY = "sweep/start"  # in the result a trial reports before training: its MLflow run id rides along
DONE_KEY = "sweep/done"  # in the result a trial reports after eval: without it a TERMINATED trial was stopped early
RUN_ID_KEY = "mlflow_run_id"
ERROR_TAG = "ray_dpo.error"  # on an errored trial's MLflow run: the last line of its traceback
SEARCH_KINDS = ("grid", "choice", "loguniform", "uniform")
TABLE_METRICS = (
    "val/loss",
    "val/rewards/accuracies",
    "val/rewards/margins",
    "eval/reward/policy",
    "eval/sampled_reward/policy",
    "eval/sampled_reward/policy_se",
    "eval/kl_seq",
    "eval/kl_seq_se",
    "eval/win_rate",
    "eval/implicit_reward_accuracy",
)


class SweepError(ConfigError):
    """A bad `tune.*` setting (search space, metric, name); the message names the key."""


@dataclass
class SweepResult:
    sweep_dir: Path
    parent_run_id: str  # the sweep's MLflow run; trials are nested under it
    tracking_uri: str
    table: Any  # pandas.DataFrame: one row per trial (also results.csv)
    table_path: Path
    plots: list[Path]
    best_trial_id: str | None  # None when no trial completed
    best_config: Config | None
    best_config_path: Path | None  # YAML for `pipelines/align.py --config`
    best_metrics: dict[str, float] = field(default_factory=dict)
    status_counts: dict[str, int] = field(default_factory=dict)  # completed / early_stopped / errored / unfinished


# --------------------------------------------------------------------------------------------- entry point


def run_sweep(
    config: Config, *, address: str | None = None, tracking_uri: str | None = None, console: Console | None = None
) -> SweepResult:
    """Run (or resume: same `tune.name`) the sweep described by `config.tune`; log everything to MLflow.

    Checks come first, before anything is written or Ray starts (`ray_dpo.recipe.open_run`). Trials that errored or
    were interrupted are retried by calling this again.
    """
    # ---- setup: checks (nothing written), then the shared work, once
    space = search_space(config)
    _check_tune(config)
    config = copy.deepcopy(config)
    # the SFT warm start (a Ray Train run named `<run_name>-sft`) and every trial's run live under the sweep dir
    sweep_dir = Path(config.output_dir) / "sweeps" / config.tune.name
    config.train.run_name, config.train.storage_path = config.tune.name, str(sweep_dir / "train")
    with recipe.open_run(config, address=address, kind="sweep", tracking_uri=tracking_uri, console=console) as run:
        result = _sweep(run, space)
        run.status = "FAILED" if result.status_counts["errored"] + result.status_counts["unfinished"] else "FINISHED"
    return result


def _sweep(run: recipe.Run, space: dict[str, Any]) -> SweepResult:
    config, sweep_dir, uri, parent_run_id = run.config, run.run_dir, run.tracking_uri, run.run_id
    train_ds, val_ds = recipe.load_data(run)
    reference = recipe.starting_weights(run)
    if config.dpo.reference == "precomputed":
        train_ds, val_ds = recipe.precompute_reference(run, [train_ds, val_ds], reference)
    # held-out prompts: the validation split's rows, limited and materialized once here (a read task per trial would
    # need a CPU while the trials' eval actors hold theirs)
    prompts_ds = val_ds.limit(config.eval.num_prompts).materialize() if config.eval.enabled else None
    total_steps = config.train.max_steps or config.train.epochs * (train_ds.count() // config.train.batch_size)
    shared = {
        "config": config.to_dict(),
        "reference": reference,
        "tracking_uri": uri,
        "parent_run_id": parent_run_id,
        "pad_id": run.tokenizer.pad_id,
        "total_steps": total_steps,
        "fail": os.environ.get(FAIL_ENV),
    }
    # An empty head bundle + one bundle for the trial's own tasks: Tune refuses tasks a trial launches (the trainer's
    # row-numbering tasks) unless a bundle other than the trial actor's has room for them. Train workers and Ray
    # Data (SPREAD) schedule outside this placement group.
    trainable = tune.with_resources(
        tune.with_parameters(_trial, train_ds=train_ds, val_ds=val_ds, prompts_ds=prompts_ds, shared=shared),
        tune.PlacementGroupFactory([{}, {"CPU": config.tune.cpus_per_trial}]),
    )

    _fit_concurrency(config)

    # ---- run: a fresh Tuner, or Tuner.restore of the same sweep name
    # Results before the first validation carry no val/* metric: ASHA skips them, Tune's strict check must too.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    experiment = sweep_dir / "tune"
    if tune.Tuner.can_restore(str(experiment)):
        # resume_errored, not restart_errored: a restarted trial gets a NEW trial id (a new MLflow run and Train run
        # name), a resumed one keeps its id; with no Tune checkpoint it starts over, and Ray Train resumes from the
        # trial's latest Train checkpoint (same run name).
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=_tune_config(config, total_steps),
            run_config=tune.RunConfig(
                name=experiment.name,
                storage_path=str(sweep_dir),
                # then an errored trial waits for a re-run of the sweep (Tuner.restore)
                failure_config=tune.FailureConfig(max_failures=config.tune.max_failures),
                callbacks=[TrialLog(str(sweep_dir / "trials"), run.console)],
                verbose=1 if run.console.verbose else 0,
            ),
        )
    grid = tuner.fit()

    # ---- save: table, MLflow child-run status, plots, best config
    return _save(config, grid, sweep_dir, uri, parent_run_id)


# --------------------------------------------------------------------------------------------- setup helpers


def search_space(config: Config) -> dict[str, Any]:
    """`tune.search_space` -> Tune's param space (dotted keys kept). Each key must be a real config key."""
    space: dict[str, Any] = {}
    if not config.tune.search_space:
        raise SweepError("config: tune.search_space is empty (e.g. {dpo.beta: {grid: [0.1, 0.5]}})")
    for key, spec in config.tune.search_space.items():
        where = f"tune.search_space.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
            raise SweepError(f"config: {where} must be one of {{{'|'.join(SEARCH_KINDS)}: [...]}}, got {spec!r}")
        ((kind, values),) = spec.items()
        if not isinstance(values, list) or not values:
            raise SweepError(f"config: {where}.{kind} must be a non-empty list, got {values!r}")
        if key.startswith("tune.") or key in ("train.run_name", "train.storage_path"):
            raise SweepError(f"config: {where}: the sweep sets this key itself")
        if kind in ("loguniform", "uniform"):
            try:
                low, high = (float(v) for v in values)  # PyYAML reads 3e-4 as a string
            except (TypeError, ValueError):
                raise SweepError(f"config: {where}.{kind} must be [low, high] numbers, got {values!r}") from None
            if not low < high or (kind == "loguniform" and low <= 0):
                raise SweepError(f"config: {where}.{kind} needs 0 < low < high (low > 0 for loguniform): {values}")
            space[key] = tune.loguniform(low, high) if kind == "loguniform" else tune.uniform(low, high)
            samples = [low, high]
        else:
            space[key] = tune.grid_search(values) if kind == "grid" else tune.choice(values)
            samples = values
        for value in samples:  # unknown keys and bad values fail here, naming the key
            trial_config(config, {key: value})
    return space


def trial_config(config: Config, params: dict[str, Any]) -> Config:
    """`config` with a trial's dotted params applied (and type-checked)."""
    values = config.to_dict()
    for key, value in params.items():
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise SweepError(f"config: tune.search_space: unknown key '{key}'")
            node = node[part]
        if leaf not in node:
            raise SweepError(f"config: tune.search_space: unknown key '{key}'")
        node[leaf] = value.item() if hasattr(value, "item") else value  # numpy scalars from Tune samplers
    return config_from_dict(values)


def _check_tune(config: Config) -> None:
    t = config.tune
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", t.name):
        raise SweepError(f"config: tune.name must be a plain directory name (letters, digits, . _ -), got {t.name!r}")
    if t.num_samples < 1 or t.max_concurrent_trials < 1:
        raise SweepError("config: tune.num_samples and tune.max_concurrent_trials must be >= 1")
    if t.search_alg == "optuna":
        grids = [k for k, spec in t.search_space.items() if isinstance(spec, dict) and "grid" in spec]
        if grids:
            raise SweepError(
                f"config: tune.search_alg=optuna samples: tune.search_space.{grids[0]} is a grid, use choice"
            )
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SweepError("config: tune.search_alg=optuna needs optuna: pip install -e '.[tune]'") from None
    if t.cpus_per_trial <= 0:
        raise SweepError(f"config: tune.cpus_per_trial must be > 0 (Tune rejects 0), got {t.cpus_per_trial}")
    prefix = t.metric.split("/", 1)[0]
    if prefix not in ("train", "val", "eval"):
        raise SweepError(f"config: tune.metric must be a train/*, val/* or eval/* metric, got {t.metric!r}")
    if prefix == "eval" and not config.eval.enabled:
        raise SweepError(f"config: tune.metric={t.metric} needs eval.enabled=true")
    if t.scheduler == "asha":
        if prefix == "eval":  # eval/* exists only after training: nothing for ASHA to compare on the way
            raise SweepError(f"config: tune.scheduler=asha needs a metric reported during training, got {t.metric}")
        if t.grace_period < 1 or t.reduction_factor <= 1:
            raise SweepError("config: tune.grace_period must be >= 1 and tune.reduction_factor > 1")


def _fit_concurrency(config: Config) -> None:
    """Lower `tune.max_concurrent_trials` so that one whole CPU always stays free.

    Ray Data map tasks (the Train input filter, eval's column projection) request 1 CPU each, hard-coded. A trial
    holds its own share, its Train workers' or its eval actors' CPUs while waiting on such tasks: if concurrent
    trials hold more than `CPUs - 1` between them, each waits for a task that can never start (seen on 2 CPUs).
    """
    t = config.tune
    workers = config.train.num_workers * config.train.cpus_per_worker
    eval_actors = config.eval.concurrency * (1.0 if config.eval.num_gpus else 0.5) if config.eval.enabled else 0.0
    peak = t.cpus_per_trial + max(workers, eval_actors)  # a trial trains, then evaluates: never both at once
    room = ray.cluster_resources().get("CPU", 0.0) - 1.0
    fits = max(1, math.floor(room / peak + 1e-9))
    if t.max_concurrent_trials > fits:
        logger.warning(
            "tune.max_concurrent_trials=%d lowered to %d: each trial holds up to %.2f CPUs and one CPU must stay "
            "free for Ray Data tasks (%.0f CPUs in the cluster)",
            t.max_concurrent_trials,
            fits,
            peak,
            room + 1,
        )
        t.max_concurrent_trials = fits


def _tune_config(config: Config, total_steps: int) -> tune.TuneConfig:
    t = config.tune
    scheduler = None
    if t.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # max_t one past the last step: ASHA stops a trial AT max_t, which would cut off the trial's evaluation
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=total_steps + 1,
            grace_period=min(t.grace_period, total_steps),
            reduction_factor=t.reduction_factor,
        )
    search_alg = _optuna(config.train.seed) if t.search_alg == "optuna" else None
    return tune.TuneConfig(
        metric=t.metric,
        mode=t.mode,
        num_samples=t.num_samples,
        max_concurrent_trials=t.max_concurrent_trials,
        scheduler=scheduler,
        search_alg=search_alg,
    )


def _optuna(seed: int):
    """Optuna's TPE, fed only the results that carry the ranking metric (validation steps: a trial also reports
    before its first validation); a trial that ends between validations ends with its last validated result."""
    from ray.tune.search.optuna import OptunaSearch  # checked importable in _check_tune

    class ValidatedOptuna(OptunaSearch):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.validated: dict[str, dict] = {}

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.metric in result:
                self.validated[trial_id] = result
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result is not None and self.metric not in result:
                result = self.validated.get(trial_id)
            super().on_trial_complete(trial_id, result, error=error or result is None)

    return ValidatedOptuna(seed=seed)


# --------------------------------------------------------------------------------------------- the trial


def _trial(
    params: dict[str, Any], *, train_ds: ray.data.Dataset, val_ds: ray.data.Dataset, prompts_ds, shared: dict
) -> None:
    """One trial: a nested MLflow run, DPO from the shared reference (Train reports flow to Tune), then eval."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_dpo.stages.evaluate import evaluate
    from ray_dpo.stages.train import train_dpo

    trial_id = tune.get_context().get_trial_id()
    base = config_from_dict(shared["config"])
    config = trial_config(base, params)
    config.train.run_name = f"{base.tune.name}-{trial_id}"  # own Ray Train run: checkpoints never collide
    uri = shared["tracking_uri"]
    # a retried or restored trial keeps its MLflow run
    run_id = tracking.find_child_run(uri, shared["parent_run_id"], {"ray_dpo.trial_id": trial_id})
    if run_id is None:
        run_id = tracking.start_run(
            uri,
            experiment=config.tracking.experiment,
            run_name=config.train.run_name,
            params=flatten(config.to_dict()),
            tags={"ray_dpo.sweep": base.tune.name, "ray_dpo.trial_id": trial_id, **params},
            parent_run_id=shared["parent_run_id"],
        )
    tune.report({START_KEY: 1.0, RUN_ID_KEY: run_id})  # the driver learns the run id even if ASHA stops us
    _maybe_fail(shared["fail"], trial_id)
    result = train_dpo(
        config,
        train_ds,
        val_ds,
        run_id=run_id,
        tracking_uri=uri,
        init_checkpoint=shared["reference"],
        reference_checkpoint=shared["reference"],
        pad_id=shared["pad_id"],
        callbacks=[TuneReportCallback()],
    )
    final = {**result.metrics, "step": result.steps}
    if config.eval.enabled:
        final.update(
            evaluate(
                config,
                policy_checkpoint=result.checkpoint,
                reference_checkpoint=shared["reference"],
                prompts_ds=prompts_ds,
                preference_ds=val_ds,
                tracking_uri=uri,
                run_id=run_id,
            )
        )
    tracking.end_run(uri, run_id)
    tune.report({**final, DONE_KEY: 1.0, RUN_ID_KEY: run_id, "checkpoint_path": result.uri})


def _maybe_fail(marker: str | None, trial_id: str) -> None:
    """Failure injection: the first trial to create `marker` (exclusive create: exactly one) raises, once."""
    if not marker:
        return
    try:
        with open(marker, "x") as out:
            out.write(f"trial {trial_id} failed on purpose\n")
    except FileExistsError:
        return
    raise RuntimeError(f"sweep: trial {trial_id} failed on purpose ({FAIL_ENV})")


class TrialLog(tune.Callback):
    """Driver side: append every trial result to `<dir>/<trial id>.jsonl` (survives restores: Tune keeps only the
    latest result per trial in memory; needs no shared filesystem: the driver writes it), and one console line per
    finished trial."""

    def __init__(self, directory: str, console: Console):
        self.directory, self.console = directory, console

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
        if DONE_KEY in last:
            shown = [k for k in ("eval/kl_seq", "eval/sampled_reward/policy", "eval/reward/policy") if k in last]
            values = ", ".join(f"{k}={last[k]:.3g}" for k in [self._metric(last), *shown] if k in last)
            self.console.stage(f"trial {trial.trial_id} ({params}) done: {values}")
        else:
            self.console.stage(f"trial {trial.trial_id} ({params}) stopped early at step {last.get('step', '?')}")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self.console.stage(f"trial {trial.trial_id} failed: {trial_error(trial)} (retrying it)")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.console.stage(f"trial {trial.trial_id} failed: {trial_error(trial)} (re-run the same command to retry it)")

    @staticmethod
    def _metric(result: dict) -> str:
        return next((k for k in result if k.startswith("val/rewards/")), "step")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        os.makedirs(self.directory, exist_ok=True)
        row = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and v == v}  # v == v: not NaN
        with open(os.path.join(self.directory, f"{trial.trial_id}.jsonl"), "a") as out:
            out.write(json.dumps(row, default=str) + "\n")


def trial_error(trial) -> str:
    """The last line of a failed trial's latest traceback ("ValueError: ..."); "" if it has none. Tune writes it on
    the driver first (`error_file`), into the sweep's storage later (`get_error`)."""
    local = trial.error_file
    text = Path(local).read_text() if local and os.path.exists(local) else str(trial.get_error() or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _records(sweep_dir: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for path in sorted((sweep_dir / "trials").glob("*.jsonl")):
        out[path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


# --------------------------------------------------------------------------------------------- save


def _save(config: Config, grid, sweep_dir: Path, uri: str, parent_run_id: str) -> SweepResult:
    import pandas as pd

    records = _records(sweep_dir)
    rows = []
    for trial in grid._experiment_analysis.trials:  # Trial objects: status tells early-stopped from interrupted
        history = records.get(trial.trial_id, [])
        done = any(DONE_KEY in r for r in history)
        if trial.status == "ERROR":
            status = "errored"
        elif trial.status == "TERMINATED":
            status = "completed" if done else "early_stopped"
        else:
            status = "unfinished"
        last: dict[str, Any] = {}
        for r in history:  # latest value of each metric (a restarted trial re-reports some steps)
            last.update({k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        searched = trial_config(config, {k: v for k, v in trial.config.items()})
        row = {
            "trial_id": trial.trial_id,
            "status": status,
            "attempts": sum(START_KEY in r for r in history),
            "dpo.beta": searched.dpo.beta,
            "train.lr": searched.train.lr,
            **{k: v for k, v in trial.config.items() if k not in ("dpo.beta", "train.lr")},
            "step": last.get("step"),
            **{k: last.get(k) for k in dict.fromkeys((config.tune.metric, *TABLE_METRICS))},
            RUN_ID_KEY: next((r[RUN_ID_KEY] for r in history if RUN_ID_KEY in r), None),
            "error": trial_error(trial) if status == "errored" else "",
        }
        rows.append(row)
        run_id = row[RUN_ID_KEY]
        if run_id and status == "early_stopped":
            tracking.mark_early_stopped(uri, run_id, f"{config.tune.scheduler} at step {row['step']}")
            tracking.end_run(uri, run_id, "FINISHED")
        elif run_id and status == "errored":
            tracking.set_tags(uri, run_id, {ERROR_TAG: row["error"]})
            tracking.end_run(uri, run_id, "FAILED")
        if run_id and status != "errored" and row["attempts"] > 1:  # a failed attempt's reason no longer holds
            tracking.delete_tag(uri, run_id, ERROR_TAG)
    table = pd.DataFrame(rows)
    table_path = sweep_dir / "results.csv"
    table.to_csv(table_path, index=False)
    tracking.log_artifact(uri, parent_run_id, table_path)

    plots = [p for p in (_frontier_plot(table, sweep_dir), _val_curves_plot(config, records, table, sweep_dir)) if p]
    for plot in plots:
        tracking.log_artifact(uri, parent_run_id, plot, "plots")

    best_trial_id, best_config, best_path, best_metrics = _best(config, table, sweep_dir)
    if best_trial_id is not None:
        tracking.log_artifact(uri, parent_run_id, best_path)
        tracking.set_tags(uri, parent_run_id, {"best_trial_id": best_trial_id})
        tracking.log_metrics(uri, parent_run_id, {f"best/{k}": v for k, v in best_metrics.items()})
    counts = {s: int((table["status"] == s).sum()) for s in ("completed", "early_stopped", "errored", "unfinished")}
    return SweepResult(
        sweep_dir=sweep_dir,
        parent_run_id=parent_run_id,
        tracking_uri=uri,
        table=table,
        table_path=table_path,
        plots=plots,
        best_trial_id=best_trial_id,
        best_config=best_config,
        best_config_path=best_path,
        best_metrics=best_metrics,
        status_counts=counts,
    )


def _best(config: Config, table, sweep_dir: Path) -> tuple[str | None, Config | None, Path | None, dict]:
    """Best completed trial by `tune.metric` / `tune.mode` (early-stopped trials never saw the whole run)."""
    metric = config.tune.metric
    ranked = table[(table["status"] == "completed") & table[metric].notna()]
    if ranked.empty:
        return None, None, None, {}
    best = ranked.loc[ranked[metric].idxmax() if config.tune.mode == "max" else ranked[metric].idxmin()]
    params = {k: best[k] for k in config.tune.search_space}
    best_config = trial_config(config, params)
    # a fresh align run name: reusing the sweep's would resume the sweep's (finished) SFT / trial runs
    best_config.train.run_name = f"{config.tune.name}-best"
    best_config.train.storage_path = str(Path(config.output_dir) / "ray")
    path = save_config(best_config, sweep_dir / "best_config.yaml")
    metrics = {k: float(best[k]) for k in dict.fromkeys((metric, *TABLE_METRICS)) if _is_number(best.get(k))}
    return str(best["trial_id"]), best_config, path, metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _figure(width: float = 6.4, height: float = 4.8):
    # the object API with an Agg canvas: no pyplot global state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _frontier_plot(table, sweep_dir: Path) -> Path | None:
    """Reward vs KL(policy || reference) per completed trial with standard errors, coloured by beta: the DPO paper's
    frontier (lower beta, more KL; reward rising with KL). Both are estimated from samples of each trial's policy."""
    from matplotlib.colors import LogNorm

    # without a reward function the greedy reward, else the implicit-reward accuracy on held-out pairs stands in
    y_key = next(
        (k for k in ("eval/sampled_reward/policy", "eval/reward/policy") if k in table and table[k].notna().any()),
        "eval/implicit_reward_accuracy",
    )
    points = table[table["eval/kl_seq"].notna() & table[y_key].notna()] if "eval/kl_seq" in table else table[:0]
    if points.empty:
        return None  # eval.enabled=false: no KL measured
    fig = _figure()
    ax = fig.add_subplot()
    betas = points["dpo.beta"].astype(float)
    norm = LogNorm(vmin=betas.min(), vmax=betas.max() * (1.0001 if betas.min() == betas.max() else 1))
    error = lambda key: points[key].astype(float).to_numpy() if key in points else None
    ax.errorbar(points["eval/kl_seq"], points[y_key], xerr=error("eval/kl_seq_se"), yerr=error(f"{y_key}_se"),
                fmt="none", ecolor="0.6", elinewidth=1, capsize=2, zorder=1)  # fmt: skip
    dots = ax.scatter(points["eval/kl_seq"], points[y_key], c=betas, cmap="viridis", norm=norm, s=60, zorder=2)
    for _, p in points.iterrows():
        ax.annotate(f"beta={p['dpo.beta']:g}", (p["eval/kl_seq"], p[y_key]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    fig.colorbar(dots, ax=ax, label="dpo.beta")
    ax.set_xlabel("KL(policy || reference) per sequence, from policy samples (eval/kl_seq ± s.e.)")
    ax.set_ylabel(f"{y_key} ± s.e." if f"{y_key}_se" in points else y_key)
    ax.set_title("Reward vs KL frontier (one point per completed trial)")
    ax.grid(alpha=0.3)
    path = sweep_dir / "plots" / "reward_vs_kl.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _val_curves_plot(config: Config, records: dict, table, sweep_dir: Path) -> Path | None:
    """The ranking metric (val/loss when ranking on eval/*) over steps, one line per trial; dashed = stopped early."""
    metric = config.tune.metric if not config.tune.metric.startswith("eval/") else "val/loss"
    fig = _figure(7.2, 4.8)
    ax = fig.add_subplot()
    drawn = 0
    for _, row in table.iterrows():
        curve: dict[int, float] = {}
        for r in records.get(row["trial_id"], []):
            if metric in r and "step" in r and DONE_KEY not in r:
                curve[int(r["step"])] = float(r[metric])  # a re-reported step keeps its latest value
        if not curve:
            continue
        steps = sorted(curve)
        style = "--" if row["status"] == "early_stopped" else "-"
        label = f"{row['trial_id']} beta={row['dpo.beta']:g} lr={row['train.lr']:.1e} ({row['status']})"
        ax.plot(steps, [curve[s] for s in steps], style, marker="o", label=label)
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"Validation curves per trial ({config.tune.mode} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = sweep_dir / "plots" / "val_curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
