"""Ray Tune over any config keys (`tune.search_space`: `dpo.beta` x `train.lr`, `dpo.loss_type`, ...): one trial is
the stage graph's `train_and_evaluate`, on data and a reference the sweep prepares once.

    result = run_sweep(load_config("configs/sweep.yaml"))   # -> SweepResult(table, best_config_path, ...)

setup  checks (nothing written), Ray, the sweep's MLflow run; then once: data, starting weights (the reference),
       reference log-probs (`dpo.reference=precomputed`, and `live` with `dpo.reference_cache` unless the search
       space changes them: `trial_reference`).
run    a Tune FUNCTION trainable (Ray 2.60, Train V2): each trial opens its nested MLflow run, fits a TorchTrainer
       with `TuneReportCallback` (every validation of rank 0 reaches Tune and ASHA while training runs), evaluates.
save   `results.csv` (one row per trial, a column per searched key), plots, `best_config.yaml`, all in MLflow.

Where things live: Tune's experiment state and every trial's Train run in `train.storage_path` (Tune's under
`<tune.name>/tune`, a trial's as `<tune.name>-<trial id>`: a cluster needs no shared disk); on the driver,
`<output_dir>/sweeps/<tune.name>/` holds what the driver writes (`trials/<trial id>.jsonl`: every Tune event, written
by the driver; the table, plots, best config).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ray_dpo.config import Config, flatten, override, save_config
from ray_dpo.recipe import stages
from ray_dpo.recipe.checks import check, search_values
from ray_dpo.recipe.console import Console
from ray_dpo.recipe.run import Run, close_trial_run, open_run, open_trial_run
from ray_dpo.stages import storage, tracking

logger = logging.getLogger(__name__)
FAIL_ENV = "RAY_DPO_SWEEP_FAIL"  # a marker path: the first trial to start makes it and raises (retry/restore tests)
START_KEY = "sweep/start"  # in the result a trial reports before training: its MLflow run id rides along
DONE_KEY = "sweep/done"  # in the result a trial reports after eval: without it a TERMINATED trial was stopped early
RUN_ID_KEY = "mlflow_run_id"
EVENT_KEY = "sweep/event"  # the driver's records of Tune's callbacks: start, complete, error, recover
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


@dataclass
class SweepResult:
    sweep_dir: Path
    parent_run_id: str  # the sweep's MLflow run; trials are nested under it
    tracking_uri: str
    table: Any  # pandas.DataFrame: one row per trial (also results.csv)
    table_path: Path
    plots: list[Path]
    searched: list[str]  # the dotted keys the sweep searched: a column each in the table
    best_trial_id: str | None  # None when no trial completed
    best_config: Config | None
    best_config_path: Path | None  # YAML for `pipelines/align.py --config`
    best_metrics: dict[str, float] = field(default_factory=dict)
    status_counts: dict[str, int] = field(default_factory=dict)  # completed / early_stopped / errored / unfinished


def run_sweep(
    config: Config, *, address: str | None = None, tracking_uri: str | None = None, console: Console | None = None
) -> SweepResult:
    """Run (or resume: same `tune.name`) the sweep described by `config.tune`; log everything to MLflow. Checks come
    first, before anything is written or Ray starts. Trials that errored or were interrupted are retried by calling
    this again."""
    checked = check(config, "sweep")
    with open_run(
        config, address=address, kind="sweep", tracking_uri=tracking_uri, console=console, checked=checked
    ) as run:
        result = _sweep(run)
        run.status = "FAILED" if result.status_counts["errored"] + result.status_counts["unfinished"] else "FINISHED"
    return result


def _sweep(run: Run) -> SweepResult:
    config = run.config
    # ---- setup: the shared work, once
    data = stages.load_data(run)
    reference = stages.starting_weights(run)
    trials_config, why = trial_reference(config)
    if why:
        run.console.stage(f"reference: {why}")
    data = stages.with_reference_logps(replace(run, config=trials_config), data, reference)
    total_steps = config.train.max_steps or config.train.epochs * (data.train.count() // config.train.batch_size)
    shared = {
        "config": trials_config.to_dict(),
        "encoding": run.encoding,
        "reference": reference,
        "mlflow_run": (run.tracking_uri, run.run_id),
        "fail": os.environ.get(FAIL_ENV),
    }
    # An empty head bundle + one bundle for the trial's own tasks: Tune refuses tasks a trial launches (the trainer's
    # row-dealing tasks) unless a bundle other than the trial actor's has room for them. Train workers and Ray Data
    # (SPREAD) schedule outside this placement group.
    trainable = tune.with_resources(
        tune.with_parameters(_trial, data=data, shared=shared),
        tune.PlacementGroupFactory([{}, {"CPU": config.tune.cpus_per_trial}]),
    )
    # ---- run: a fresh Tuner, or Tuner.restore of the same sweep name
    # Results before the first validation carry no val/* metric: ASHA skips them, Tune's strict check must too.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    experiment = storage.join(config.train.storage_path, run.name, "tune")
    log = TrialLog(str(run.run_dir / "trials"), run.console)
    if tune.Tuner.can_restore(experiment):
        # resume_errored, not restart_errored: a restarted trial gets a NEW trial id (a new MLflow run and Train run
        # name), a resumed one keeps its id; with no Tune checkpoint it starts over, and Ray Train resumes from the
        # trial's latest Train checkpoint (same run name).
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(config),
            tune_config=_tune_config(config, total_steps),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=storage.join(config.train.storage_path, run.name),
                # then an errored trial waits for a re-run of the sweep (Tuner.restore)
                failure_config=tune.FailureConfig(max_failures=config.tune.max_failures),
                callbacks=[log],
                verbose=1 if run.console.verbose else 0,
            ),
        )
    tuner.fit()
    # ---- save: table, MLflow trial runs closed, plots, best config
    return _save(run)


# --------------------------------------------------------------------------------------------- setup helpers


# keys that change the reference's log-probs (or whether the loss has a reference): a sweep searching one of them
# keeps a live reference in every trial
REFERENCE_KEYS = ("dpo.reference", "dpo.loss_type", "dpo.reduction", "dpo.prefix_sharing", "train.precision")
REFERENCE_PREFIXES = ("data.", "model.", "sft.", "train.init_checkpoint")


def trial_reference(config: Config) -> tuple[Config, str]:
    """The config the trials run with, and why (a console line; "" when nothing changes). With `dpo.reference=live`
    and `dpo.reference_cache`, the sweep scores the pairs under the reference ONCE, before the trials, and the
    trials run `dpo.reference=precomputed`: the same log-probs (the pass scores as a live reference does), without a
    reference model or its forward passes in any trial. Searching a key that changes those log-probs keeps the
    reference live in every trial."""
    d = config.dpo
    if d.reference != "live" or not d.reference_cache:
        return config, ""
    changes = [k for k in config.tune.search_space if k in REFERENCE_KEYS or k.startswith(REFERENCE_PREFIXES)]
    if changes:
        return config, f"live in every trial (tune.search_space searches {changes[0]}, which changes its log-probs)"
    return override(config, {"dpo.reference": "precomputed"}), "log-probs scored once for all trials (precomputed)"


def search_space(config: Config) -> dict[str, Any]:
    """`tune.search_space` (checked) -> Tune's param space, dotted keys kept."""
    space = {}
    for key, (kind, values) in search_values(config).items():
        if kind == "loguniform":
            space[key] = tune.loguniform(*values)
        elif kind == "uniform":
            space[key] = tune.uniform(*values)
        else:
            space[key] = tune.grid_search(values) if kind == "grid" else tune.choice(values)
    return space


def concurrent_trials(config: Config) -> int:
    """`tune.max_concurrent_trials`, lowered so that one whole CPU always stays free.

    Ray Data map tasks (the Train input filter, eval's column projection) request 1 CPU each, hard-coded. A trial
    holds its own share, its Train workers' or its eval actors' CPUs while waiting on such tasks: if concurrent
    trials hold more than `CPUs - 1` between them, each waits for a task that can never start (seen on 2 CPUs).
    """
    from ray_dpo.stages.evaluate import eval_gpus

    t = config.tune
    workers = config.train.num_workers * config.train.cpus_per_worker
    eval_actors = config.eval.concurrency * (1.0 if eval_gpus(config) else 0.5) if config.eval.enabled else 0.0
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
    return min(t.max_concurrent_trials, fits)


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
        max_concurrent_trials=concurrent_trials(config),
        scheduler=scheduler,
        search_alg=search_alg,
    )


def _optuna(seed: int):
    """Optuna's TPE, fed only the results that carry the ranking metric (validation steps: a trial also reports
    before its first validation); a trial that ends between validations ends with its last validated result."""
    from ray.tune.search.optuna import OptunaSearch  # checked importable before the sweep starts

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


def trial_name(config: Config, trial_id: str) -> str:
    return f"{config.tune.name}-{trial_id}"  # its own Ray Train run: checkpoints never collide


def _trial(params: dict[str, Any], *, data: stages.Data, shared: dict) -> None:
    """One trial: its nested MLflow run, then the stage graph's train + eval step from the shared reference."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_dpo.config import config_from_dict

    trial_id = tune.get_context().get_trial_id()
    base = config_from_dict(shared["config"])
    config = override(base, params, where="tune.search_space")
    name, (uri, parent_run_id) = trial_name(base, trial_id), shared["mlflow_run"]
    run_id = open_trial_run(
        uri,
        parent_run_id,
        experiment=base.tracking.experiment,
        trial_id=trial_id,
        name=name,
        config=config,
        params=params,
    )
    tune.report({START_KEY: 1.0, RUN_ID_KEY: run_id})  # the driver learns the run id even if ASHA stops us
    _maybe_fail(shared["fail"], trial_id)
    trained = stages.train_and_evaluate(
        config,
        data,
        shared["reference"],
        encoding=shared["encoding"],
        name=name,
        mlflow_run=(uri, run_id),
        callbacks=[TuneReportCallback()],
    )
    final = {**trained.metrics, **trained.eval_metrics, "step": trained.steps}
    tune.report({**final, DONE_KEY: 1.0, RUN_ID_KEY: run_id, "checkpoint_path": trained.uri})


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
    """Driver side: every Tune event of a trial appended to `<dir>/<trial id>.jsonl` (its config, each result, how it
    ended: the records survive restores and need no shared filesystem), and one console line per finished trial."""

    def __init__(self, directory: str, console: Console):
        self.directory, self.console = directory, console

    def _append(self, trial, row: dict[str, Any]) -> None:
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, f"{trial.trial_id}.jsonl"), "a") as out:
            out.write(json.dumps(row, default=str) + "\n")

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._append(trial, {EVENT_KEY: "start", "config": dict(trial.config)})

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._append(trial, {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and v == v})

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._append(trial, {EVENT_KEY: "complete"})
        last = trial.last_result or {}
        params = _describe(trial.config)
        if DONE_KEY in last:
            shown = [k for k in ("eval/kl_seq", "eval/sampled_reward/policy", "eval/reward/policy") if k in last]
            ranked = next((k for k in last if k.startswith("val/rewards/")), "step")
            values = ", ".join(f"{k}={last[k]:.3g}" for k in [ranked, *shown] if k in last)
            self.console.stage(f"trial {trial.trial_id} ({params}) done: {values}")
        else:
            self.console.stage(f"trial {trial.trial_id} ({params}) stopped early at step {last.get('step', '?')}")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        error = trial_error(trial)
        self._append(trial, {EVENT_KEY: "recover", "error": error})
        self.console.stage(f"trial {trial.trial_id} failed: {error} (retrying it)")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        error = trial_error(trial)
        self._append(trial, {EVENT_KEY: "error", "error": error})
        self.console.stage(f"trial {trial.trial_id} failed: {error} (re-run the same command to retry it)")


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_text(v, '.3g')}" for k, v in params.items())


def _text(value: Any, number: str = "g") -> str:
    """A searched value as the command line writes it: 0.1, ipo, [sigmoid, sft] (a list of loss types)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v, number) for v in value) + "]"
    return format(value, number) if isinstance(value, float) else str(value)


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


def _status(history: list[dict[str, Any]]) -> str:
    """How a trial stands, from its records: its last ending event decides (a retried trial ends again)."""
    ends = [r[EVENT_KEY] for r in history if r.get(EVENT_KEY) in ("complete", "error")]
    if not ends:
        return "unfinished"
    if ends[-1] == "error":
        return "errored"
    return "completed" if any(DONE_KEY in r for r in history) else "early_stopped"


# --------------------------------------------------------------------------------------------- save


def _save(run: Run) -> SweepResult:
    import pandas as pd

    config, sweep_dir, uri = run.config, run.run_dir, run.tracking_uri
    searched = list(config.tune.search_space)
    records = _records(sweep_dir)
    rows = []
    for trial_id, history in records.items():
        params = next((r["config"] for r in history if r.get(EVENT_KEY) == "start"), {})
        last: dict[str, Any] = {}
        for r in history:  # latest value of each metric (a restarted trial re-reports some steps)
            last.update({k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        status = _status(history)
        errors = [r["error"] for r in history if r.get(EVENT_KEY) == "error"]
        row = {
            "trial_id": trial_id,
            "status": status,
            "attempts": sum(START_KEY in r for r in history),
            **{key: params.get(key) for key in searched},
            "step": last.get("step"),
            **{k: last.get(k) for k in dict.fromkeys((config.tune.metric, *TABLE_METRICS))},
            RUN_ID_KEY: next((r[RUN_ID_KEY] for r in history if RUN_ID_KEY in r), None),
            "error": errors[-1] if status == "errored" and errors else "",
        }
        rows.append(row)
        if row[RUN_ID_KEY] and status != "unfinished":
            reason = f"{config.tune.scheduler} at step {row['step']}" if status == "early_stopped" else row["error"]
            close_trial_run(uri, row[RUN_ID_KEY], status, reason=reason, retried=row["attempts"] > 1)
    table = pd.DataFrame(rows)
    table_path = sweep_dir / "results.csv"
    # list values (dpo.loss_type: [sigmoid, sft]) as the command line writes them, not as Python's repr
    shown = table.assign(**{k: table[k].map(_text) for k in searched if k in table})
    shown.to_csv(table_path, index=False)
    tracking.log_artifact(uri, run.run_id, table_path)

    plots = [
        p
        for p in (
            _frontier_plot(table, searched, sweep_dir),
            _val_curves_plot(config, records, table, searched, sweep_dir),
        )
        if p
    ]
    for plot in plots:
        tracking.log_artifact(uri, run.run_id, plot, "plots")

    best_trial_id, best_config, best_path, best_metrics = _best(config, table, sweep_dir)
    if best_trial_id is not None:
        tracking.log_artifact(uri, run.run_id, best_path)
        tracking.set_tags(uri, run.run_id, {"best_trial_id": best_trial_id})
        tracking.log_metrics(uri, run.run_id, {f"best/{k}": v for k, v in best_metrics.items()})
    statuses = table["status"] if len(table) else pd.Series([], dtype=str)
    counts = {s: int((statuses == s).sum()) for s in ("completed", "early_stopped", "errored", "unfinished")}
    return SweepResult(
        sweep_dir=sweep_dir,
        parent_run_id=run.run_id,
        tracking_uri=uri,
        table=table,
        table_path=table_path,
        plots=plots,
        searched=searched,
        best_trial_id=best_trial_id,
        best_config=best_config,
        best_config_path=best_path,
        best_metrics=best_metrics,
        status_counts=counts,
    )


def _best(config: Config, table, sweep_dir: Path) -> tuple[str | None, Config | None, Path | None, dict]:
    """Best completed trial by `tune.metric` / `tune.mode` (early-stopped trials never saw the whole run)."""
    metric = config.tune.metric
    if not len(table) or metric not in table:
        return None, None, None, {}
    ranked = table[(table["status"] == "completed") & table[metric].notna()]
    if ranked.empty:
        return None, None, None, {}
    best = ranked.loc[ranked[metric].idxmax() if config.tune.mode == "max" else ranked[metric].idxmin()]
    params = {k: best[k] for k in config.tune.search_space}
    # a fresh align run name: reusing the sweep's would resume the sweep's (finished) trial runs
    best_config = override(config, params)
    best_config = replace(best_config, train=replace(best_config.train, run_name=f"{config.tune.name}-best"))
    path = save_config(tracking.redacted_config(best_config), sweep_dir / "best_config.yaml")
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


def _label(row, searched: list[str]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_text(row[k])}" for k in searched)


def _frontier_plot(table, searched: list[str], sweep_dir: Path) -> Path | None:
    """Reward vs KL(policy || reference) per completed trial with standard errors: the DPO paper's frontier when the
    sweep searches beta (lower beta, more KL). Points are coloured by the first numeric searched key (beta when it
    is searched) and labelled with every searched value. Both axes are estimated from samples of each policy."""
    from matplotlib.colors import LogNorm, Normalize

    # without a reward function the greedy reward, else the implicit-reward accuracy on held-out pairs stands in
    y_key = next(
        (k for k in ("eval/sampled_reward/policy", "eval/reward/policy") if k in table and table[k].notna().any()),
        "eval/implicit_reward_accuracy",
    )
    if "eval/kl_seq" not in table or y_key not in table:
        return None
    points = table[table["eval/kl_seq"].notna() & table[y_key].notna()]
    if points.empty:
        return None  # eval.enabled=false: no KL measured
    fig = _figure()
    ax = fig.add_subplot()
    error = lambda key: points[key].astype(float).to_numpy() if key in points else None
    ax.errorbar(points["eval/kl_seq"], points[y_key], xerr=error("eval/kl_seq_se"), yerr=error(f"{y_key}_se"),
                fmt="none", ecolor="0.6", elinewidth=1, capsize=2, zorder=1)  # fmt: skip
    numeric = [k for k in searched if points[k].map(lambda v: isinstance(v, (int, float))).all()]
    colour = "dpo.beta" if "dpo.beta" in numeric else (numeric[0] if numeric else None)
    if colour is not None:
        values = points[colour].astype(float)
        positive = (values > 0).all()
        norm = (LogNorm if positive else Normalize)(
            vmin=values.min(), vmax=values.max() * (1.0001 if values.min() == values.max() else 1)
        )
        dots = ax.scatter(points["eval/kl_seq"], points[y_key], c=values, cmap="viridis", norm=norm, s=60, zorder=2)
        fig.colorbar(dots, ax=ax, label=colour)
    else:
        ax.scatter(points["eval/kl_seq"], points[y_key], s=60, zorder=2)
    for _, p in points.iterrows():
        ax.annotate(
            _label(p, searched), (p["eval/kl_seq"], p[y_key]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xlabel("KL(policy || reference) per sequence, from policy samples (eval/kl_seq ± s.e.)")
    ax.set_ylabel(f"{y_key} ± s.e." if f"{y_key}_se" in points else y_key)
    ax.set_title("Reward vs KL frontier (one point per completed trial)")
    ax.grid(alpha=0.3)
    path = sweep_dir / "plots" / "reward_vs_kl.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _val_curves_plot(config: Config, records: dict, table, searched: list[str], sweep_dir: Path) -> Path | None:
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
        ax.plot(
            steps,
            [curve[s] for s in steps],
            style,
            marker="o",
            label=f"{row['trial_id']} {_label(row, searched)} ({row['status']})",
        )
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


def best_values(result: SweepResult) -> dict[str, Any]:
    """The best trial's value of every searched key."""
    flat = flatten(result.best_config.to_dict()) if result.best_config is not None else {}
    return {key: flat.get(key) for key in result.searched}
