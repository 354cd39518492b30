"""cluster.yaml is a valid Ray cluster-launcher config (what `ray up` checks before any cloud call) and holds what
the pipeline needs: GPU workers that autoscale, the package installed everywhere, an MLflow server on the head whose
URI every worker gets. Offline: no cloud, no SSH."""

import copy
import json
import os
import shlex
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    path = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
    return json.loads(path.read_text())


def _ray_up_checks(config: dict) -> dict:
    """What `ray up` runs on the file before launching anything: defaults merged in, then schema + semantics."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_schema_and_ray_up_validation(config, schema):
    jsonschema.validate(config, schema)  # the file as written, before defaults could paper over a typo
    prepared = _ray_up_checks(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda c: c.update(head_node_type="gpu.head"), ValueError),  # not one of available_node_types
        (lambda c: c.update(avialable_node_types={}), jsonschema.ValidationError),  # unknown (misspelt) key
        (lambda c: c["available_node_types"]["worker.gpu"].update(min_workers=99), ValueError),  # > max_workers
        (
            lambda c: c["available_node_types"]["worker.gpu"].update(resources={"GPU": "one"}),
            jsonschema.ValidationError,
        ),
        (lambda c: c.update(idle_timeout_minutes=-5), jsonschema.ValidationError),  # below the schema's minimum
    ],
    ids=["bad-head-node-type", "unknown-key", "min-over-max-workers", "bad-resource-type", "negative-idle-timeout"],
)
def test_invalid_variants_are_rejected(config, mutate, error):
    broken = copy.deepcopy(config)
    mutate(broken)
    with pytest.raises(error):
        _ray_up_checks(broken)


def test_gpu_workers_autoscale_and_head_is_cpu(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head.get("resources", {})
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    for node_type in gpu:
        assert 0 <= node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"]


def test_a_multi_gpu_node_type_for_fsdp_and_s3_storage_in_the_usage(config):
    gpus = [t["resources"].get("GPU", 0) for t in config["available_node_types"].values()]
    assert max(gpus) >= 8, "a node type with 8 GPUs (FSDP across them)"
    text = CLUSTER_YAML.read_text()
    assert "train.strategy=fsdp" in text and "train.storage_path=s3://" in text


def test_setup_installs_this_package_with_the_local_ray_and_mlflow_versions(config):
    assert config["file_mounts"]["~/ray-dpo"] == "."  # `ray up` from the repo root copies the source
    commands = " ".join(config["setup_commands"])
    assert "-e ~/ray-dpo" in commands
    # The launcher refuses a cluster whose Ray differs from the laptop's; MLflow client and server must match too.
    assert f"ray[default,train,data,tune]=={version('ray')}" in commands
    assert f"mlflow=={version('mlflow')}" in commands


def _command_args(command: str, program: str, substitutions: dict[str, str]) -> list[str]:
    """The arguments of `program ...` inside a shell command line from the yaml (redirection and `&` dropped)."""
    for placeholder, value in substitutions.items():
        command = command.replace(placeholder, value)
    tokens = shlex.split(command.replace(";", " ; ").replace("(", " ").replace(")", " "))
    words = program.split()

    def at(i: int) -> bool:  # `mlflow server` or `~/venv/bin/mlflow server`
        head = tokens[i : i + len(words)]
        return len(head) == len(words) and head[0].split("/")[-1] == words[0] and head[1:] == words[1:]

    start = next(i for i in range(len(tokens)) if at(i)) + len(words)
    args = []
    for token in tokens[start:]:
        if token in (";", "&", "&&", "||", ">", "2>&1") or token.startswith(">"):
            break
        args.append(token)
    return args


SUBST = {"$(hostname -I | awk '{print $1}')": "10.0.1.5", "$RAY_HEAD_IP": "10.0.1.5"}


def test_head_runs_an_mlflow_server_the_installed_mlflow_cli_accepts(config):
    from mlflow.cli import server

    command = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    args = _command_args(command, "mlflow server", SUBST)
    context = server.make_context("server", args)  # parses and type-checks every option; runs nothing
    assert context.params["backend_store_uri"].startswith("sqlite:////")
    assert context.params["artifacts_destination"].startswith("s3://")
    assert (context.params["host"], context.params["port"]) == ("0.0.0.0", 5000)


def test_every_node_gets_the_head_mlflow_uri_and_token_auth(config):
    from ray.scripts.scripts import start

    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        command = next(c for c in config[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in command
        expected = "$(hostname -I | awk '{print $1}')" if head else "$RAY_HEAD_IP"
        assert f"MLFLOW_TRACKING_URI=http://{expected}:5000" in command
        # exported before `ray start`, so raylet and every worker process on the node inherit it
        assert command.index("MLFLOW_TRACKING_URI") < command.index("ray start")
        context = start.make_context("start", _command_args(command, "ray start", SUBST))
        assert context.params["head"] is head
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
