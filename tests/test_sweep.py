"""Ray Tune sweep: 4 trials with ASHA on the tiny config, MLflow parent + nested runs, best config, plots, and an
interrupted sweep resumed with Tuner.restore. Real local Ray (shared fixture), real SQLite MLflow store."""

from pathlib import Path

import numpy as np
import pytest
from conftest import pipeline_main, wait_for_placement_groups_removed

from ray_dpo.config import ConfigError, load_config, override
from ray_dpo.recipe.demo import write_sort_task
from ray_dpo.recipe.sweep import FAIL_ENV, run_sweep

ROOT = Path(__file__).resolve().parent.parent
SWEEP_YAML = ROOT / "configs" / "sweep.yaml"


def _child_runs(uri: str, parent_run_id: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def _small_sweep(tmp_path: Path, *overrides: str):
    """The sweep config on 96 generated sort-task pairs, 4 steps, no evaluation. No SFT (explicit data paths): a
    fresh seeded reference is enough here and saves a Train run per sweep."""
    paths = write_sort_task(tmp_path / "data", rows=96, seed=0)
    base = [f"output_dir={tmp_path}", f"train.storage_path={tmp_path / 'ray'}", "data.synthetic=null"]
    base += [f"data.train_path={paths['train']}"]
    base += [f"data.val_path={paths['val']}", "eval.enabled=false", "train.max_steps=4", "train.checkpoint_every=4"]
    return load_config(SWEEP_YAML, [*base, *overrides])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tune.search_space={train.lrr: {grid: [0.1]}}"], "unknown key 'train.lrr'"),
        (["tune.search_space={train.lr: {normal: [0, 1]}}"], "tune.search_space.train.lr must be one of"),
        (["tune.search_space={train.lr: {loguniform: [0, 1]}}"], "tune.search_space.train.lr.loguniform needs"),
        (["tune.search_space={dpo.beta: {grid: [fast]}}"], "dpo.beta must be float"),
        (["tune.metric=eval/kl_seq"], "tune.scheduler=asha needs a metric reported during training"),
        (["tune.name=../x"], "tune.name must be a plain directory name"),
    ],
)
def test_bad_sweep_settings_fail_before_anything_runs(tmp_path, overrides, message, capsys):
    main = pipeline_main("sweep")

    config = load_config(SWEEP_YAML, [f"output_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        run_sweep(config, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["--config", str(SWEEP_YAML), f"output_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.split("(")[0] in err[0]
    assert not (tmp_path / "sweeps").exists()  # checked before anything was written


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_trial_asha_sweep_logs_nested_runs_best_config_and_frontier(ray_session, mlflow_uri, tmp_path):
    import matplotlib.image

    config = load_config(
        SWEEP_YAML, [f"output_dir={tmp_path}", f"train.storage_path={tmp_path / 'ray'}", "tune.reduction_factor=4"]
    )
    # Deterministic grid: two useful learning rates and two that cannot move the policy. The first trials to reach
    # ASHA's rung (step 2) include a useful one, so a later useless trial (margin ~0) falls below the cutoff.
    space = {"train.lr": {"grid": [3e-3, 1e-8, 1e-3, 1e-9]}, "dpo.beta": {"choice": [0.1, 0.5]}}
    config = override(config, {"tune.search_space": space, "tune.num_samples": 1})

    result = run_sweep(config, tracking_uri=mlflow_uri)

    table = result.table
    statuses = table[["trial_id", "status", "step", "error"]].to_string()
    assert len(table) == 4 and set(table["status"]) <= {"completed", "early_stopped"}, statuses
    assert result.status_counts["early_stopped"] >= 1, table.to_string()
    assert result.status_counts["completed"] >= 1
    stopped = table[table["status"] == "early_stopped"]
    assert (stopped["step"] < config.train.max_steps).all()  # stopped before the end of training
    assert (table[table["status"] == "completed"]["step"] == config.train.max_steps).all()
    completed = table[table["status"] == "completed"]
    assert completed["eval/kl_seq"].notna().all() and completed["eval/reward/policy"].notna().all()

    # MLflow: one parent run with 4 nested runs; early-stopped ones tagged; metrics over steps in each child
    children = _child_runs(mlflow_uri, result.parent_run_id)
    assert len(children) == 4
    assert {r.info.run_id for r in children} == set(table["mlflow_run_id"])
    early = {r.info.run_id for r in children if r.data.tags.get("ray_dpo.early_stopped") == "true"}
    assert early == set(stopped["mlflow_run_id"])
    assert all(r.info.status == "FINISHED" for r in children)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    done_run = completed["mlflow_run_id"].iloc[0]
    assert [m.step for m in client.get_metric_history(done_run, "val/loss")] == [2, 4, 6]
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"results.csv", "best_config.yaml", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert plots == {"plots/reward_vs_kl.png", "plots/val_curves.png"}

    # best config: the best completed trial by the configured metric; loads back as a valid config
    best_row = completed.loc[completed[config.tune.metric].idxmax()]
    assert result.best_trial_id == best_row["trial_id"]
    best = load_config(result.best_config_path)
    assert best.train.lr == pytest.approx(best_row["train.lr"]) and best.dpo.beta == best_row["dpo.beta"]
    assert best.model == config.model and best.train.max_steps == config.train.max_steps
    # the user's storage path holds the sweep: Tune's state and every trial's Train run (a cluster needs no shared disk)
    storage = Path(config.train.storage_path)
    assert (storage / config.tune.name / "tune").is_dir()
    assert all((storage / f"{config.tune.name}-{t}").is_dir() for t in table["trial_id"])

    frontier = matplotlib.image.imread(result.sweep_dir / "plots" / "reward_vs_kl.png")
    assert frontier.shape[0] > 100 and frontier.shape[1] > 100 and np.ptp(frontier[..., :3]) > 0.5
    wait_for_placement_groups_removed(ray_session)  # early-stopped trials gave their workers' CPUs back


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupted_sweep_restores_without_rerunning_finished_trials(ray_session, mlflow_uri, tmp_path, monkeypatch):
    config = _small_sweep(
        tmp_path, "tune.scheduler=fifo", "tune.num_samples=1", "train.checkpoint_every=2", "tune.max_failures=0"
    )
    config = override(config, {"tune.search_space": {"train.lr": {"grid": [3e-3, 1e-3]}}})
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ENV, str(marker))  # one trial raises once; no retries: the first run ends with it errored

    first = run_sweep(config, tracking_uri=mlflow_uri)
    assert marker.is_file()
    assert first.status_counts == {"completed": 1, "early_stopped": 0, "errored": 1, "unfinished": 0}
    assert first.best_trial_id == first.table[first.table["status"] == "completed"]["trial_id"].iloc[0]
    errored = first.table[first.table["status"] == "errored"].iloc[0]
    assert errored["error"].startswith("RuntimeError: sweep: trial") and "failed on purpose" in errored["error"]
    failed_run = next(r for r in _child_runs(mlflow_uri, first.parent_run_id) if r.info.status == "FAILED")
    assert failed_run.data.tags["ray_dpo.error"] == errored["error"]  # the reason, beside the run in MLflow

    second = run_sweep(config, tracking_uri=mlflow_uri)  # same sweep name: Tuner.restore
    assert second.status_counts["completed"] == 2
    assert second.parent_run_id == first.parent_run_id
    attempts = dict(zip(second.table["trial_id"], second.table["attempts"], strict=True))
    done_first = first.table[first.table["status"] == "completed"]["trial_id"].iloc[0]
    errored_first = first.table[first.table["status"] == "errored"]["trial_id"].iloc[0]
    assert attempts == {done_first: 1, errored_first: 2}  # the finished trial did not run again
    children = _child_runs(mlflow_uri, first.parent_run_id)
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)  # the retry reused its run
    assert not any("ray_dpo.error" in r.data.tags for r in children)  # the failed attempt's reason went with it
    assert load_config(second.best_config_path).train.max_steps == 4


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_optuna_search_with_asha_retries_a_failed_trial(ray_session, mlflow_uri, tmp_path, monkeypatch, capsys):
    """`tune.search_alg=optuna` (TPE) proposes the trials; ASHA still stops weak ones; every trial a nested run.
    One trial fails once: the sweep retries it (tune.max_failures=1, the default) and it keeps its MLflow run."""
    config = _small_sweep(
        tmp_path, "tune.search_alg=optuna", "tune.name=optuna", "tune.num_samples=4", "tune.reduction_factor=4"
    )
    space = {"train.lr": {"loguniform": [1e-9, 1e-2]}, "dpo.beta": {"choice": [0.1, 0.5]}}
    config = override(config, {"tune.search_space": space})
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ENV, str(marker))
    result = run_sweep(config, tracking_uri=mlflow_uri)
    assert marker.is_file()
    statuses = result.table[["trial_id", "status", "attempts", "step", "error"]].to_string()
    assert len(result.table) == 4 and set(result.table["status"]) <= {"completed", "early_stopped"}, statuses
    assert sorted(result.table["attempts"]) == [1, 1, 1, 2], statuses
    retried = result.table.loc[result.table["attempts"] == 2, "trial_id"].iloc[0]
    assert f"trial {retried} failed: RuntimeError: sweep: trial {retried} failed on purpose" in capsys.readouterr().err
    assert result.table["train.lr"].nunique() == 4, "Optuna proposed four different learning rates"
    children = _child_runs(mlflow_uri, result.parent_run_id)
    assert len(children) == 4 and {r.info.run_id for r in children} == set(result.table["mlflow_run_id"])
    with pytest.raises(ConfigError, match="is a grid, use choice"):
        run_sweep(
            override(config, {"tune.search_space": {"train.lr": {"grid": [1e-3, 1e-2]}}}), tracking_uri=mlflow_uri
        )
