"""ray_dpo.stages.tracking against real MLflow stores: a SQLite file, and once a real `mlflow server` on 127.0.0.1."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas
import pytest
import torch

from ray_dpo.config import Config, flatten
from ray_dpo.core.checkpoint import save_model
from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.tokenizer import ByteTokenizer
from ray_dpo.stages import serving, tracking
from ray_dpo.stages.tracking import TrackingError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_checkpoint(directory: Path) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(dim=32, depth=2, heads=2, max_seq_len=64)).eval()
    save_model(directory, model, ByteTokenizer())
    (directory / "optimizer.pt").write_bytes(b"not served")  # a training checkpoint holds more than the policy
    return model


def _greedy_by_hand(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Reference decoding: full forward each step, argmax, stop at eos."""
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if next_id == tokenizer.eos_id:
                break
            new.append(next_id)
    return tokenizer.decode(new)


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """Run in an empty directory, to catch anything MLflow writes next to the caller (./mlflow.db, ./mlruns)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return cwd


# --------------------------------------------------------------------------------------------------------------
# URI resolution and the pre-flight check (no MLflow store is touched)
# --------------------------------------------------------------------------------------------------------------


def test_resolve_tracking_uri_env_wins_then_config_then_sqlite_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri(None, "out") == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    assert tracking.resolve_tracking_uri("http://10.0.0.5:5000", "out") == "http://10.0.0.5:5000"
    # relative SQLite paths are pinned to the driver's directory: Ray workers run elsewhere
    assert tracking.resolve_tracking_uri("sqlite:///runs/m.db", "out") == f"sqlite:///{tmp_path / 'runs' / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri("sqlite:////x/m.db", "out") == "http://127.0.0.1:5000"


def test_unreachable_server_is_one_fast_line_and_writes_nothing(empty_cwd):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        tracking.check_tracking_uri(uri)
    assert time.monotonic() - start < tracking.HEALTH_TIMEOUT_S + 1
    message = str(err.value)
    assert "\n" not in message and uri in message and "unreachable" in message
    assert isinstance(err.value, ValueError)  # a UserError: pipelines print it as one line and exit non-zero
    assert list(empty_cwd.iterdir()) == []


def test_check_tracking_uri_needs_no_mlflow_import():
    """The pre-flight check runs before a pipeline imports anything heavy."""
    code = (
        "import sys; from ray_dpo.stages.tracking import check_tracking_uri, resolve_tracking_uri;"
        "check_tracking_uri(resolve_tracking_uri(None, '/tmp/ray-dpo-check'));"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env={**os.environ, "MLFLOW_TRACKING_URI": ""})


def test_check_tracking_uri_refuses_unusable_stores_and_creates_nothing(empty_cwd, tmp_path):
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    cases = {
        f"sqlite:///{a_file}/sub/mlflow.db": "is a file",
        "file:///tmp/mlruns": "file store",
        str(tmp_path / "mlruns"): "file store",
        "sqlite://": "in-memory",
        "ftp://host/x": "unsupported",
    }
    for uri, words in cases.items():
        with pytest.raises(TrackingError, match=words) as err:
            tracking.check_tracking_uri(uri)
        assert "\n" not in str(err.value)
    # a store in directories that do not exist yet is fine, and the check does not create them
    tracking.check_tracking_uri(f"sqlite:///{tmp_path / 'new' / 'deeper' / 'mlflow.db'}")
    assert not (tmp_path / "new").exists()
    assert list(empty_cwd.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# SQLite round trip
# --------------------------------------------------------------------------------------------------------------


def test_sqlite_round_trip(mlflow_uri, tmp_path, empty_cwd, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    tracking.check_tracking_uri(mlflow_uri)
    config = Config().to_dict()
    config["tune"]["search_space"] = {"dpo.beta": {"grid": [0.1, 0.3]}}
    extra = {f"k{i:03d}": i for i in range(60)}  # > 100 params in all: several log_batch calls
    run_id = tracking.start_run(
        mlflow_uri, experiment="ray-dpo", run_name="round-trip", params={**config, "extra": extra}, tags={"t": 1}
    )
    for step in range(1, 4):
        tracking.log_metrics(mlflow_uri, run_id, {"train/loss": 1.0 / step, "perf/tokens_per_s": 100.0 * step}, step)
    tracking.log_metrics(mlflow_uri, run_id, {"val/rewards/accuracies": 0.75}, step=3)

    config_file = tmp_path / "config.yaml"
    config_file.write_text("dpo:\n  beta: 0.1\n")
    tracking.log_artifact(mlflow_uri, run_id, config_file)
    checkpoint = tmp_path / "ckpt"
    model = _tiny_checkpoint(checkpoint)
    tracking.log_artifact(mlflow_uri, run_id, checkpoint, "checkpoints/final")
    tracking.log_dict(mlflow_uri, run_id, {"rows_read": 10, "rows_dropped": 2}, "data/row_accounting.json")
    tracking.log_text(mlflow_uri, run_id, "hello", "notes/readme.txt")
    samples = {"prompt": ["a", "b"], "policy": ["x", "y"], "reference": ["u", "v"], "reward": [0.5, -1.0]}
    tracking.log_table(mlflow_uri, run_id, samples, "eval/samples.json")

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(run_id)
    flat = flatten(config)
    assert run.data.params["train.lr"] == str(flat["train.lr"])
    assert run.data.params["model.dim"] == str(flat["model.dim"])
    assert run.data.params["tune.search_space.dpo.beta.grid"] == "[0.1, 0.3]"
    assert run.data.params["extra.k059"] == "59"
    assert len(run.data.params) == len(flat) + len(extra)
    assert run.data.tags["t"] == "1" and run.info.run_name == "round-trip"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert run.data.metrics["val/rewards/accuracies"] == 0.75

    # artifacts live in <db dir>/mlartifacts, absolute, whatever the working directory
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    run_artifacts = tmp_path / "mlartifacts" / run_id / "artifacts"
    assert (run_artifacts / "config.yaml").read_text() == config_file.read_text()
    assert (run_artifacts / "checkpoints/final/model.safetensors").is_file()
    assert tracking.download_artifacts(mlflow_uri, run_id, "notes/readme.txt").read_text() == "hello"
    assert tracking.download_artifacts(mlflow_uri, run_id, "data/row_accounting.json").read_text().count("rows") == 2

    table = tracking.load_table(mlflow_uri, run_id, "eval/samples.json")
    assert table.to_dict(orient="list") == samples
    # mlflow.load_table only knows the global URI and the active experiment: point both at the run's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", run.info.experiment_id)
    assert mlflow.load_table("eval/samples.json", run_ids=[run_id]).to_dict(orient="list") == samples
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")

    # the policy as a registered MLflow model: same logits through our loader, same text through pyfunc
    model_uri = serving.register_model(mlflow_uri, run_id, checkpoint, "ray-dpo-policy")
    assert model_uri == "models:/ray-dpo-policy/1"
    loaded, encoding = serving.load_registered_model(model_uri, mlflow_uri)
    tokenizer = encoding.tokenizer
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
    assert tokenizer == ByteTokenizer()
    expected = [_greedy_by_hand(model, tokenizer, prompt, 6) for prompt in ["hi", "sort: 3 1 2"]]
    pyfunc = serving.load_pyfunc(model_uri, mlflow_uri, tmp_path / "pyfunc")
    assert pyfunc.predict(["hi", "sort: 3 1 2"], params={"max_new_tokens": 6}) == expected
    assert pyfunc.predict(pandas.DataFrame({"prompt": ["hi"]}), params={"max_new_tokens": 6}) == expected[:1]
    # a long prompt with the default 64 new tokens still fits the 64-token model (prompt cut from the left)
    assert len(pyfunc.predict(["x" * 200])) == 1
    served = list((tmp_path / "pyfunc").rglob("*"))
    assert not any(p.name in ("optimizer.pt", "python_model.pkl") for p in served)  # only the policy, no pickle

    # registering again makes version 2; the run lists its logged model; None skips the registry
    assert serving.register_model(mlflow_uri, run_id, checkpoint, "ray-dpo-policy") == "models:/ray-dpo-policy/2"
    unregistered = serving.register_model(mlflow_uri, run_id, checkpoint, None)
    assert unregistered.startswith("models:/m-")
    again, _ = serving.load_registered_model(unregistered, mlflow_uri)
    assert torch.equal(model(tokens), again(tokens))
    assert len(client.get_run(run_id).outputs.model_outputs) == 3

    tracking.end_run(mlflow_uri, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"

    # a sweep: a parent run with nested trial runs; an ASHA-stopped trial is FINISHED + tagged, not FAILED
    parent = tracking.start_run(mlflow_uri, experiment="ray-dpo", run_name="sweep")
    trial = tracking.start_run(mlflow_uri, experiment="ray-dpo", run_name="trial-0", parent_run_id=parent)
    tracking.mark_early_stopped(mlflow_uri, trial, "asha")
    tracking.end_run(mlflow_uri, trial)
    tracking.end_run(mlflow_uri, parent, "FAILED")
    trial_run = client.get_run(trial)
    assert trial_run.data.tags["mlflow.parentRunId"] == parent
    assert trial_run.data.tags[tracking.EARLY_STOPPED_TAG] == "true"
    assert client.get_run(parent).info.status == "FAILED"
    with pytest.raises(TrackingError, match="status"):
        tracking.end_run(mlflow_uri, parent, "DONE")
    with pytest.raises(TrackingError, match="no such file"):
        tracking.log_artifact(mlflow_uri, run_id, tmp_path / "missing.txt")
    with pytest.raises(TrackingError, match="models:/nope/1"):
        serving.load_registered_model("models:/nope/1", mlflow_uri)

    assert list(empty_cwd.iterdir()) == []  # nothing went to ./mlflow.db or ./mlruns (no global MLflow state)


def test_log_metrics_from_a_ray_worker_process(ray_session, mlflow_uri):
    """Rank 0 of a Ray Train worker group logs from another process (with the URI it was handed, no global state)."""
    from mlflow import MlflowClient

    run_id = tracking.start_run(mlflow_uri, experiment="ray-dpo", run_name="from-worker")

    @ray_session.remote(num_cpus=0.5)
    def rank0(uri: str, run_id: str) -> str:
        for step in range(3):
            tracking.log_metrics(uri, run_id, {"train/loss": float(step)}, step=step)
        return os.getpid()

    assert ray_session.get(rank0.remote(mlflow_uri, run_id), timeout=120) != os.getpid()
    history = MlflowClient(tracking_uri=mlflow_uri).get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2]


# --------------------------------------------------------------------------------------------------------------
# One real `mlflow server` on 127.0.0.1
# --------------------------------------------------------------------------------------------------------------


def test_server_round_trip(mlflow_server, tmp_path, empty_cwd):
    from mlflow import MlflowClient

    uri, root = mlflow_server
    tracking.check_tracking_uri(uri)  # healthy: no error
    run_id = tracking.start_run(uri, experiment="ray-dpo", run_name="over-http", params={"dpo": {"beta": 0.1}})
    tracking.log_metrics(uri, run_id, {"train/loss": 0.7}, step=1)
    tracking.log_metrics(uri, run_id, {"train/loss": 0.6}, step=2)
    note = tmp_path / "config.yaml"
    note.write_text("dpo:\n  beta: 0.1\n")
    tracking.log_artifact(uri, run_id, note)
    checkpoint = tmp_path / "ckpt"
    model = _tiny_checkpoint(checkpoint)
    model_uri = serving.register_model(uri, run_id, checkpoint, "policy-over-http")
    tracking.end_run(uri, run_id)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.params == {"dpo.beta": "0.1"} and run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [0.7, 0.6]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, not a client path
    assert tracking.download_artifacts(uri, run_id, "config.yaml").read_text() == note.read_text()
    stored = list((root / "artifacts").rglob(f"{run_id}/**/config.yaml"))  # in --artifacts-destination (shared)
    assert len(stored) == 1 and stored[0].read_text() == note.read_text()

    loaded, _ = serving.load_registered_model(model_uri, uri)
    tokens = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
    assert list(empty_cwd.iterdir()) == []
