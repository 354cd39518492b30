"""`pipelines/align.py`: end to end on configs/tiny.yaml (real Ray, real SQLite MLflow store) and one-line errors."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import pipeline_main

from ray_dpo.errors import UserError, find_user_error, root_cause

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_align_end_to_end_through_a_crash_and_a_rerun(ray_session, tmp_path):
    """`pipelines/align.py` on configs/tiny.yaml with prefix sharing and bf16 on, only `data.train_path` +
    `data.val_fraction` set, relative output paths (they must reach the Ray workers, which chdir, as absolute).

    The first run dies (rank 1 exits at the start of step 6, no restarts left): one readable line, its MLflow run
    FAILED. Re-running the same train.run_name resumes training AND the run: ONE MLflow run, FINISHED, with params,
    every step's sft/train/val metrics once, the final checkpoint as artifacts, evaluation of exactly the held-out
    rows, and a registered model that loads back with the same logits as the checkpoint."""
    from mlflow import MlflowClient

    from ray_dpo.core.checkpoint import load_model
    from ray_dpo.core.encoding import Encoding
    from ray_dpo.core.tokenizer import ByteTokenizer
    from ray_dpo.recipe.demo import write_sort_task
    from ray_dpo.stages.data import read_preferences, split_train_val
    from ray_dpo.stages.evaluate import SAMPLES_TABLE
    from ray_dpo.stages.serving import load_registered_model
    from ray_dpo.stages.tracking import load_table

    files = write_sort_task(tmp_path / "sort", rows=160, seed=0)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env |= {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    script = str(ROOT / "pipelines" / "align.py")
    cmd = [sys.executable, script, "--config", TINY, "output_dir=out", "train.storage_path=out/ray"]
    cmd += ["dpo.prefix_sharing=true", "train.precision=bf16"]  # the speed switches, through DDP workers
    cmd += ["data.synthetic=null", f"data.train_path={files['train']}", "data.val_fraction=0.25"]
    cmd += [f"sft.path={files['sft']}", "eval.enabled=true", "eval.num_prompts=1000", "eval.max_new_tokens=8"]
    cmd += ["train.max_failures=0"]
    # steps 4 and 5 are logged before the crash and trained again after it: each must still be logged once
    crash = env | {"RAY_DPO_FAIL_AT": f"5:1:{tmp_path / 'failed-once'}"}
    first = subprocess.run(cmd, cwd=tmp_path, env=crash, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and (tmp_path / "failed-once").exists(), first.stderr[-4000:]
    # not the user's mistake: one readable last line naming the stage and the log that holds the traceback
    last = first.stderr.strip().splitlines()[-1]
    failed = re.fullmatch(r"error: train and evaluate failed: (.+) \(full log: (\S+)\)", last)
    assert failed and "Traceback" not in first.stderr, first.stderr[-4000:]
    assert "Traceback" in Path(failed.group(2)).read_text()
    run_id = (out / "runs" / "tiny" / "mlflow_run_id").read_text().strip()
    uri = f"sqlite:///{out / 'mlflow.db'}"  # the default store: <output_dir>/mlflow.db
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FAILED"

    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"MLflow run:       {run_id}" in proc.stdout and f"tracking URI:     {uri}" in proc.stdout
    checkpoint = re.search(r"final checkpoint: (\S+) \(6 steps\)", proc.stdout).group(1)
    model_uri = re.search(r"registered model: (\S+)", proc.stdout).group(1)
    experiment = client.get_experiment_by_name("ray-dpo-tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id], "one MLflow run per job: never one per worker or attempt"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and not any(k.startswith("ray_dpo.resumed.") for k in run.data.tags)
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.dim"] == "32"
    assert run.data.params["dpo.prefix_sharing"] == "True" and run.data.params["train.precision"] == "bf16"
    history = lambda key: [m.step for m in client.get_metric_history(run_id, key)]
    assert history("train/loss") == [1, 2, 3, 4, 5, 6], "no step logged twice after the rerun"
    assert history("val/rewards/accuracies") == [3, 6]
    assert history("perf/tokens_per_s") == [1, 2, 3, 4, 5, 6]
    assert history("sft/loss") == list(range(1, 11))  # SFT warm start: 160 pairs / 16, same MLflow run
    artifacts = {a.path for a in client.list_artifacts(run_id, "checkpoints/final")}
    assert {"checkpoints/final/model.safetensors", "checkpoints/final/state.json"} <= artifacts
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}

    # held out: the evaluated prompts are exactly the validation split's, none of the rows trained on
    tok = ByteTokenizer()
    pairs, _ = read_preferences(files["train"], encoding=Encoding(tok, max_len=64, max_prompt_len=32))
    train_rows, val_rows = split_train_val(pairs, 0.25, seed=0)
    prompt_texts = lambda ds: {tok.decode(row["prompt"]) for row in ds.take_all()}
    samples = load_table(uri, run_id, SAMPLES_TABLE)
    assert sorted(samples["prompt"]) == sorted(prompt_texts(val_rows)) and len(samples) == 40
    assert not set(samples["prompt"]) & prompt_texts(train_rows)

    policy, encoding = load_registered_model(model_uri, uri)
    expected = load_model(checkpoint).eval()
    tokens = torch.tensor([encoding.prompt("sort: dcba", room=64)])
    with torch.no_grad():
        torch.testing.assert_close(policy.eval()(tokens), expected(tokens), atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_row_is_our_one_line_without_ray_error_logs(tmp_path):
    """A bad row (on_bad_row=error): exit 2 with our line last, and no Ray ERROR lines or tracebacks before it:
    the row is found on the driver, never raised inside a Ray task (that aborts the dataset and Ray logs it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {k: [f" {k} {i}" for i in range(20)] for k in ("prompt", "chosen", "rejected")}
    rows["chosen"][7] = None
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table(rows), path)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    script = str(ROOT / "pipelines" / "align.py")
    cmd = [sys.executable, script, "--config", TINY, "output_dir=out", "data.synthetic=null", f"data.train_path={path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path}: row 7: column 'chosen' is null")
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and not re.search(r"\bERROR\b", output), output[-4000:]


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["train.lrr=1e-3"], "train.lrr"),
        (["data.synthetic=null", "data.train_path=/nonexistent/pairs.parquet"], "data.train_path"),
        (["tracking.uri=http://127.0.0.1:{port}"], "127.0.0.1:{port}"),
    ],
    ids=["bad-key", "missing-data", "unreachable-mlflow"],
)
def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, overrides, names):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = _free_port()
    out = tmp_path / "out"
    argv = ["--config", TINY, f"output_dir={out}", f"train.storage_path={out}/ray"]
    argv += [o.format(port=port) for o in overrides]
    assert pipeline_main("align")(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert names.format(port=port) in err
    assert not out.exists()


def test_find_user_error_unwraps_ray_errors():
    cause = UserError("data: bad row")

    wrapped = RuntimeError("Training failed")  # the shape of ray.train.WorkerGroupError: failures by rank
    wrapped.worker_failures = {0: RuntimeError("ok"), 1: RuntimeError("task failed")}
    wrapped.worker_failures[1].__cause__ = cause
    assert find_user_error(wrapped) is cause
    assert find_user_error(RuntimeError("no user error")) is None
    assert root_cause(wrapped) is cause
