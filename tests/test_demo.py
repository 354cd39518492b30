"""The built-in demo: the sort-letters data generator, its reward, and `python pipelines/align.py` end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ray_dpo.errors import UserError
from ray_dpo.recipe.demo import exact_match_reward, sort_answer, write_sort_task

ROOT = Path(__file__).resolve().parent.parent


def _neighbour_replaced(chosen: str, rejected: str) -> bool:
    """`rejected` is `chosen` with one letter replaced by its alphabet neighbour, still in order."""
    if len(chosen) != len(rejected) or list(rejected) != sorted(rejected):
        return False
    return [abs(ord(a) - ord(b)) for a, b in zip(chosen, rejected, strict=True) if a != b] == [1]


def test_sort_task_files_hold_what_the_demo_needs(tmp_path):
    paths = write_sort_task(tmp_path / "a", rows=400, seed=0)
    train, val, sft = (pd.read_parquet(paths[k]) for k in ("train", "val", "sft"))
    assert list(train.columns) == list(val.columns) == ["prompt", "chosen", "rejected"]
    assert list(sft.columns) == ["prompt", "response"]
    assert (len(train), len(val), len(sft)) == (400, 64, 400)
    prompts = [*train.prompt, *val.prompt, *sft.prompt]
    assert len(set(prompts)) == len(prompts), "held-out prompts are never trained on"

    for table in (train, val):
        assert exact_match_reward(table.prompt.tolist(), table.chosen.tolist()) == [1.0] * len(table)
        assert exact_match_reward(table.prompt.tolist(), table.rejected.tolist()) == [0.0] * len(table)
        # rejected answers are plausible: as long as the answer, or one letter off
        assert ((table.rejected.str.len() - table.chosen.str.len()).abs() <= 1).all()
        # among them a letter replaced by its alphabet neighbour, still in order ("abi" for "abj")
        replaced = [_neighbour_replaced(c, r) for c, r in zip(table.chosen, table.rejected, strict=True)]
        assert 0 < sum(replaced) < len(table) / 4
    sft_correct = sum(exact_match_reward(sft.prompt.tolist(), sft.response.tolist())) / len(sft)
    assert 0.15 < sft_correct < 0.5, "an imperfect SFT set: most answers carry the neighbour mix-up"
    assert (sft.response.map(sorted) == sft.prompt.map(lambda p: sorted(sort_answer(p)))).all(), "only the order errs"

    again = write_sort_task(tmp_path / "b", rows=800, seed=0)
    pd.testing.assert_frame_equal(pd.read_parquet(again["val"]).iloc[:64], val)  # held-out set independent of rows
    assert not pd.read_parquet(write_sort_task(tmp_path / "c", rows=400, seed=1)["val"]).equals(val)


def test_exact_match_reward():
    assert exact_match_reward(["sort: qbdka =", "sort: cba =", "sort: cba ="], [" abdkq", "abc\n", "acb"]) == [
        1.0,
        1.0,
        0.0,
    ]
    with pytest.raises(UserError, match="not a demo prompt"):
        exact_match_reward(["what is 2+2?"], ["4"])
    with pytest.raises(UserError, match="too large"):
        write_sort_task("/nonexistent", rows=10**6, seed=0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_end_to_end_policy_beats_reference_and_logs_the_samples(tmp_path):
    """`python pipelines/align.py` with no --config runs configs/demo.yaml: generator -> SFT -> DPO -> eval.

    The demo's own settings (a shorter run learns too little to show anything: 800 rows and 80 steps gave a policy
    at 0.52), only written under tmp_path and without the model-registry step.
    """
    from mlflow import MlflowClient

    from ray_dpo.stages.evaluate import SAMPLES_PAGE, SAMPLES_TABLE
    from ray_dpo.stages.tracking import load_table

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env |= {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    overrides = ["output_dir=out", "train.storage_path=out/ray", "tracking.registered_model=null"]
    cmd = [sys.executable, str(ROOT / "pipelines" / "align.py"), *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # the console: a line per stage, progress lines, the summary last; Ray's and MLflow's own logs elsewhere
    lines = proc.stderr.splitlines() + proc.stdout.splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert proc.stdout.splitlines()[-1].startswith("eval implicit-reward accuracy:"), proc.stdout
    assert not [line for line in proc.stderr.splitlines() if not line.startswith(("[ray-dpo]", "sft ", "dpo "))], (
        proc.stderr
    )

    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ray-dpo-demo").experiment_id])
    metrics = run.data.metrics
    # MLflow as its users browse it: the data as run inputs, system metrics, where the run came from
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val"} and all(d.dataset.digest for d in inputs.values())
    assert inputs["train"].tags[0].value == "training" and "sort_train.parquet" in inputs["train"].dataset.source
    assert any(key.startswith("system/cpu_utilization") for key in metrics), sorted(metrics)
    assert "align.py" in run.data.tags["mlflow.source.name"] and run.data.tags["mlflow.note.content"]
    assert metrics["eval/num_prompts"] == 250 and metrics["eval/num_pairs"] == 250
    # the demo's promise: a mediocre reference, a policy that sorts with pure DPO (measured: 0.212 -> 0.988)
    assert metrics["eval/reward/reference"] < 0.6 <= 0.9 <= metrics["eval/reward/policy"], metrics
    assert metrics["eval/win_rate"] > 0.6 and metrics["eval/kl_seq"] > 0
    assert metrics["eval/implicit_reward_accuracy"] > 0.8
    table = load_table(uri, run.info.run_id, SAMPLES_TABLE)
    assert len(table) == 250
    assert table["policy_reward"].mean() == pytest.approx(metrics["eval/reward/policy"])
    assert exact_match_reward(table.prompt.tolist(), table.policy_response.tolist()) == table.policy_reward.tolist()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {SAMPLES_TABLE, SAMPLES_PAGE} <= artifacts
