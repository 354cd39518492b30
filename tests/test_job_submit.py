"""End to end as a user runs it on a cluster: `ray job submit` of pipelines/align.py to a `ray start --head` on
127.0.0.1 with token auth on, then the MLflow store holds exactly one run for the job.

The head is separate from the pytest session's own Ray (`ray_session`): its own temp dir, ports and token, started
with `--block` in a process group of its own so teardown stops exactly these processes (`ray stop` would stop
every Ray on the machine).
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports, stop_process_group

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_UP_WITHIN_S = 90  # measured ~8 s for `ray start --head` on the shared 2-CPU machine
JOB_WITHIN_S = 420  # measured ~47 s for a small Data + Train job


def _clean_env() -> dict[str, str]:
    """No Ray or MLflow settings of the caller; this venv first on PATH (the job's `python` is looked up there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _client_env(token: str, dashboard_url: str) -> dict[str, str]:
    env = _clean_env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ADDRESS=dashboard_url)  # a job client needs both
    return env


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs, dashboard, client, agent_http, agent_grpc, env_agent, metrics = free_ports(7)
    token = secrets.token_hex(32)  # this cluster's own token: ~/.ray/auth_token is left alone
    env = _clean_env()
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_DATA_DISABLE_PROGRESS_BARS="1",  # inherited by the job driver and workers: quiet logs
        RAY_TRAIN_ENABLE_PRINT_PATCH="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once on SIGTERM (default: drain for 30 s)
    )
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # closed in teardown
    process = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",  # (Ray resolves loopback to the host's address for GCS / raylet)
            f"--port={gcs}",
            "--num-cpus=2",
            f"--object-store-memory={500 * 1024**2}",  # a shared machine: not 30% of its RAM
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # one process group: GCS, raylet, dashboard and workers are stopped together
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + HEAD_UP_WITHIN_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ray start exited with {process.returncode}: {_tail(Path(temp_dir) / 'ray-start.log')}")
            request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Ray head not serving the job API after {HEAD_UP_WITHIN_S} s")
            time.sleep(1)
        yield {"url": url, "token": token, "temp_dir": temp_dir}
    finally:
        stop_process_group(process)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_submit_align_logs_one_mlflow_run(ray_head, tmp_path):
    from mlflow import MlflowClient

    output_dir = tmp_path / "out"  # absolute and outside the repo: the working dir upload is a copy elsewhere
    submission_id = f"align-{secrets.token_hex(4)}"
    command = [
        RAY,
        "job",
        "submit",
        "--address",
        ray_head["url"],
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "pipelines/align.py",
        "--config",
        "configs/tiny.yaml",
        f"output_dir={output_dir}",
        f"train.storage_path={tmp_path / 'ray-train'}",
        "train.max_steps=2",
        "train.num_workers=2",  # two DDP ranks, still one MLflow run
        "train.eval_every=1",
        "train.checkpoint_every=2",
        "eval.enabled=false",
        "tracking.experiment=job-submit-test",
        "tracking.registered_model=job-submit-policy",
    ]
    env = _client_env(ray_head["token"], ray_head["url"])
    start = time.monotonic()
    submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=JOB_WITHIN_S)
    elapsed = time.monotonic() - start
    request = urllib.request.Request(
        f"{ray_head['url']}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {ray_head['token']}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # the job API the CLI uses, as JSON
        job = json.loads(response.read())
    assert job["status"] == "SUCCEEDED", (
        f"job {submission_id}: {job['status']} {job.get('message')} (rc={submitted.returncode}, {elapsed:.0f} s)\n"
        f"--- job output ---\n{submitted.stdout[-6000:]}{submitted.stderr[-3000:]}"
    )
    assert submitted.returncode == 0
    print(f"ray job submit -> SUCCEEDED in {elapsed:.1f} s")

    # The embedded default store: sqlite under output_dir, written by the job's driver and its rank-0 worker.
    db = output_dir / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")  # not the global one
    experiment = client.get_experiment_by_name("job-submit-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # one run per job: not one per Ray Train worker
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "2" and run.data.params["output_dir"] == str(output_dir)
    metrics = set(run.data.metrics)
    assert {"train/loss", "train/rewards/accuracies", "val/loss", "perf/tokens_per_s"} <= metrics, sorted(metrics)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert {1, 2} <= set(steps) and max(steps) == 2, steps  # per step, from rank 0 only (no duplicate steps)
    assert len(steps) == len(set(steps)), steps
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "data"} <= artifacts, artifacts
    versions = client.search_model_versions("name='job-submit-policy'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    print(json.dumps({"run_id": run.info.run_id, "metrics": sorted(run.data.metrics)}))
