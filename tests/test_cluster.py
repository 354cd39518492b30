"""A real cluster on one machine whose worker node cannot see the driver's disk.

Two Ray nodes: a head with 0 CPUs (only the job's driver runs there) and a worker node with 2 CPUs started inside
its own mount namespace with an empty tmpfs over the driver's private directory, so that nothing the driver writes
to its `output_dir` is visible to any Train worker, actor, Tune trial or Ray Data task. Storage is an S3 bucket
served by `moto` on 127.0.0.1, MLflow a real `mlflow server`. `ray job submit` of pipelines/align.py (the demo task,
2 DDP workers, SFT, evaluation and registration on) must succeed; a re-submit resumes the finished run. A small
sweep (pipelines/sweep.py, 2 trials) keeps the user's S3 storage path: Tune's state and the trials' checkpoints land
in the bucket, MLflow gets the parent run and its nested runs.

Needs root (`unshare -m` + `mount -t tmpfs`): CI runs as root. Every process started here runs in a process group of its
own and is stopped by killing that group (`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports, stop_process_group, wait_for_http

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "rdpo-bucket"
JOB_WITHIN_S = 900
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def _env(**extra: str) -> dict[str, str]:
    """No Ray or MLflow settings of the caller; this venv first on PATH (the job's `python` is looked up there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_TRAIN_ENABLE_PRINT_PATCH="0")
    env.update(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", **extra)
    return env


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """`moto` serving S3 on a free loopback port, with one bucket."""
    import boto3

    root = tmp_path_factory.mktemp("moto")
    (port,) = free_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    process = _start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], root / "log", _env())
    try:
        wait_for_http(f"{endpoint}/moto-api/", 60, process, root / "log")
        boto3.client("s3", endpoint_url=endpoint, **_boto(S3_ENV)).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop_process_group(process)


def _boto(env: dict[str, str]) -> dict[str, str]:
    return dict(
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


@pytest.fixture(scope="module")
def two_nodes(s3):
    """Head (0 CPUs, job API) + worker node (2 CPUs) in its own mount namespace; yields the job API URL and the
    directory only the head can see."""
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths are length-limited
    # each node its own: a shared one would let the worker node's runtime-env cleanup delete the driver's working dir
    worker_temp_dir = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    private = Path(tempfile.mkdtemp(prefix="driver-only-", dir="/tmp"))
    gcs, dashboard, *ports = free_ports(11)
    node_env = _env(**S3_ENV, AWS_ENDPOINT_URL=s3)
    common = ["--block", "--node-ip-address=127.0.0.1", f"--object-store-memory={400 * 1024**2}"]
    head = _start(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            *common,
            f"--port={gcs}",
            "--num-cpus=0",  # drivers only: every task, actor and Train worker goes to the other node
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={ports[0]}",
            f"--dashboard-agent-listen-port={ports[1]}",
            f"--dashboard-agent-grpc-port={ports[2]}",
            f"--runtime-env-agent-port={ports[3]}",
            f"--metrics-export-port={ports[4]}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        Path(temp_dir) / "head.log",
        node_env,
    )
    url = f"http://127.0.0.1:{dashboard}"
    worker = None
    try:
        wait_for_http(f"{url}/api/jobs/", 120, head, Path(temp_dir) / "head.log")
        start_worker = " ".join(
            [
                str(BIN / "ray"),
                "start",
                *common,
                f"--address=127.0.0.1:{gcs}",
                "--num-cpus=2",
                f"--dashboard-agent-listen-port={ports[5]}",
                f"--dashboard-agent-grpc-port={ports[6]}",
                f"--runtime-env-agent-port={ports[7]}",
                f"--metrics-export-port={ports[8]}",
                f"--temp-dir={worker_temp_dir}",
                "--disable-usage-stats",
            ]
        )
        worker = _start(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs none {private} && exec {start_worker}",
            ],
            Path(temp_dir) / "worker.log",
            node_env,
        )
        deadline = time.monotonic() + 120
        while _alive_nodes(url) < 2:
            if worker.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker node did not join: {(Path(temp_dir) / 'worker.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "private": private}
    finally:
        for process in (worker, head):
            if process is not None:
                stop_process_group(process)
        for directory in (temp_dir, worker_temp_dir, private):
            shutil.rmtree(directory, ignore_errors=True)


def _alive_nodes(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/nodes?view=summary", timeout=5) as response:
            summary = json.loads(response.read())["data"]["summary"]
    except (OSError, KeyError, ValueError):
        return 0
    return sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE")


def _submit(
    url: str, submission_id: str, overrides: list[str], s3_endpoint: str, script: str = "pipelines/align.py"
) -> tuple[dict, str]:
    runtime_env = {"env_vars": {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}}
    command = [str(BIN / "ray"), "job", "submit", "--address", url, "--submission-id", submission_id]
    command += ["--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--"]
    command += ["python", script, *overrides]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=JOB_WITHIN_S)
    with urllib.request.urlopen(f"{url}/api/jobs/{submission_id}", timeout=30) as response:
        return json.loads(response.read()), done.stdout[-8000:] + done.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_on_two_nodes_sharing_no_disk_with_the_driver(two_nodes, s3, mlflow_server):
    import boto3
    from mlflow import MlflowClient

    mlflow_uri, _ = mlflow_server
    overrides = [
        f"output_dir={two_nodes['private'] / 'out'}",  # the driver's own disk: no worker can see it
        f"train.storage_path=s3://{BUCKET}/runs",
        f"tracking.uri={mlflow_uri}",
        "tracking.experiment=two-nodes",
        "tracking.registered_model=two-nodes-policy",
        "train.run_name=cluster",
        "data.synthetic_rows=400",
        "sft.epochs=1",
        "train.max_steps=10",
        "train.checkpoint_every=5",
        "train.eval_every=5",
        "eval.num_prompts=32",
    ]
    first, output = _submit(two_nodes["url"], f"align-{secrets.token_hex(4)}", overrides, s3)
    assert first["status"] == "SUCCEEDED", f"{first['status']} {first.get('message')}\n{output}"
    assert "final checkpoint: s3://rdpo-bucket/runs/cluster/checkpoint_step_00000010 (10 steps)" in output, output

    bucket = boto3.client("s3", endpoint_url=s3, **_boto(S3_ENV))
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET, Prefix="runs/cluster/")["Contents"]]
    checkpoints = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_step_")})
    assert checkpoints == ["checkpoint_step_00000005", "checkpoint_step_00000010"], checkpoints
    assert any(k.startswith("runs/cluster/staged/reference/") for k in keys), "the reference is staged in storage"

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    assert (
        run.info.status == "FINISHED" and "eval/kl_seq" in run.data.metrics and "eval/reward/policy" in run.data.metrics
    )
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and max(steps) == 10
    assert client.search_model_versions("name='two-nodes-policy'")[0].run_id == run.info.run_id

    again, output = _submit(two_nodes["url"], f"align-{secrets.token_hex(4)}", overrides, s3)
    assert again["status"] == "SUCCEEDED", f"{again['status']} {again.get('message')}\n{output}"
    (rerun,) = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    assert rerun.info.run_id == run.info.run_id, "a re-submit resumes the same MLflow run"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == steps, "no step twice"
    keys_after = [o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET, Prefix="runs/cluster/")["Contents"]]
    assert sorted({k.split("/")[2] for k in keys_after if "checkpoint_step_" in k}) == checkpoints, "nothing retrained"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_on_two_nodes_keeps_the_storage_path(two_nodes, s3, mlflow_server, tmp_path):
    """A 2-trial grid (evaluation off, FIFO, 1 step each) on data in the bucket, storage `s3://<bucket>/runs`: Tune's
    experiment under `runs/<tune.name>/tune`, each trial's checkpoints under `runs/<tune.name>-<trial id>/`."""
    import boto3
    from mlflow import MlflowClient

    from ray_dpo.recipe.demo import write_sort_task

    mlflow_uri, _ = mlflow_server
    bucket = boto3.client("s3", endpoint_url=s3, **_boto(S3_ENV))
    data = {}
    for split, path in write_sort_task(tmp_path / "sort", rows=96, seed=0).items():
        bucket.upload_file(str(path), BUCKET, f"sweep-data/{Path(path).name}")
        data[split] = f"s3://{BUCKET}/sweep-data/{Path(path).name}"
    overrides = [
        "--config",
        "configs/sweep.yaml",
        f"output_dir={two_nodes['private'] / 'sweep-out'}",  # the driver's own disk: no trial can see it
        f"train.storage_path=s3://{BUCKET}/runs",
        f"tracking.uri={mlflow_uri}",
        "tracking.experiment=two-nodes-sweep",
        "tune.name=cluster-sweep",
        "tune.search_space={dpo.beta: {grid: [0.1, 0.5]}}",
        "tune.num_samples=1",
        "tune.scheduler=fifo",
        "data.synthetic=null",  # no SFT: a fresh seeded reference, staged once by the sweep's driver
        f"data.train_path={data['train']}",
        f"data.val_path={data['val']}",
        "eval.enabled=false",
        "train.max_steps=1",
        "train.eval_every=1",
        "train.checkpoint_every=1",
    ]
    done, output = _submit(two_nodes["url"], f"sweep-{secrets.token_hex(4)}", overrides, s3, "pipelines/sweep.py")
    assert done["status"] == "SUCCEEDED", f"{done['status']} {done.get('message')}\n{output}"
    assert "trials:           2 completed" in output, output

    keys = [o["Key"] for page in bucket.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="runs/")
            for o in page.get("Contents", [])]  # fmt: skip
    assert any(k.startswith("runs/cluster-sweep/tune/experiment_state") for k in keys), "Tune's state in the bucket"
    trials = {k.split("/")[1] for k in keys if k.split("/")[1].startswith("cluster-sweep-")}
    assert len(trials) == 2, sorted(trials)
    for trial in trials:
        assert any(k.startswith(f"runs/{trial}/checkpoint_step_00000001/") for k in keys), f"{trial}: no checkpoint"

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("two-nodes-sweep").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`ray_dpo.kind` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.tags["ray_dpo.sweep"] == "cluster-sweep"
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["ray_dpo.trial_id"] for c in children} == {t.removeprefix("cluster-sweep-") for t in trials}
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/loss")] == [1]
