"""End to end as a user runs it on a cluster: `ray job submit` of pipelines/align.py, on their own Hugging Face model,
to a `ray start --head` on 127.0.0.1 with token auth on, then the MLflow store holds exactly one run for the job.

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
@pytest.mark.timeout(900)
def test_job_submit_aligns_your_own_model(ray_head, tmp_path):
    """`ray job submit -- python pipelines/align.py --config configs/hf_tiny.yaml`: a tiny HF Qwen2, LoRA, chat
    template, 2 DDP workers, the repository's HH-RLHF rows (relative paths, in the uploaded working dir). One MLflow
    run for the job (never one per worker), each step logged once by rank 0; the evaluated prompts carry the chat
    template; the exported directory (in storage) loads with AutoModelForCausalLM, with weights that differ from the
    initial ones; the registered model's `predict` gives what the exported model's own greedy `generate` gives on
    the prompt rendered with its template."""
    import re

    import mlflow
    import torch
    from mlflow import MlflowClient
    from tiny_hf import build
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_dpo.stages.evaluate import SAMPLES_TABLE
    from ray_dpo.stages.tracking import load_table

    base = build(tmp_path / "qwen2", arch="qwen2", vocab_size=400)
    out = tmp_path / "out"  # absolute and outside the repo: the working dir upload is a copy elsewhere
    submission_id = f"align-{secrets.token_hex(4)}"
    command = [RAY, "job", "submit", "--address", ray_head["url"], "--submission-id", submission_id]
    command += ["--working-dir", str(REPO), "--", "python", "pipelines/align.py", "--config", "configs/hf_tiny.yaml"]
    command += [f"output_dir={out}", f"train.storage_path={out}/ray", f"model.hf_path={base}"]
    command += ["train.max_steps=4", "train.eval_every=4", "train.checkpoint_every=2", "eval.num_prompts=4"]
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
    assert "Loading weights" not in submitted.stdout, submitted.stdout  # a quiet console: HF's loaders muted

    # the embedded default store: sqlite under output_dir, written by the job's driver only
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not the global one
    (run,) = client.search_runs([client.get_experiment_by_name("ray-dpo-hf-tiny").experiment_id])
    assert run.info.status == "FINISHED" and "eval/kl_seq" in run.data.metrics
    assert run.data.params["train.max_steps"] == "4" and run.data.params["output_dir"] == str(out)
    assert {"train/loss", "train/rewards/accuracies", "val/loss", "perf/tokens_per_s"} <= set(run.data.metrics)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4], steps  # per step, from rank 0 only (no duplicate steps)
    assert {"config.yaml", "checkpoints", "data", "export"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "export")} == {"export/adapter", "export/model"}
    versions = client.search_model_versions("name='ray-dpo-hf-tiny-policy'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    samples = load_table(uri, run.info.run_id, SAMPLES_TABLE)
    assert all(p.startswith("<|im_start|>user\n") for p in samples["prompt"]), samples["prompt"].tolist()

    exported = re.search(r"exported model:   (\S+)", submitted.stdout).group(1)
    assert exported == str(out / "ray" / "hf-tiny" / "staged" / "export" / "model")
    trained = AutoModelForCausalLM.from_pretrained(exported).eval()
    initial = AutoModelForCausalLM.from_pretrained(base)
    moved = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), initial.parameters(), strict=True))
    assert moved > 1e-6, "the merged LoRA adapters changed the weights"

    tokenizer = AutoTokenizer.from_pretrained(exported)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    prompt = torch.tensor([list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)])
    with torch.no_grad():
        greedy = trained.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = greedy[0, prompt.shape[1] :].tolist()
    new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    model_uri = re.search(r"registered model: (\S+)", submitted.stdout).group(1)
    mlflow.set_tracking_uri(uri)  # MLflow's model loaders resolve models:/ URIs through the global registry
    mlflow.set_registry_uri(uri)
    try:
        texts = mlflow.pyfunc.load_model(model_uri).predict(["Hello there"], params={"max_new_tokens": 6})
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert texts == [tokenizer.decode(new, skip_special_tokens=True)]
