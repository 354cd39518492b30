"""cluster.yaml is a valid Ray cluster-launcher config (what `ray up` checks before any cloud call) and holds what an
8B job needs: GPU node types whose host RAM holds the model they load and whose GPUs hold the planned job
(benchmarks/capacity.py), a pinnable GPU type, GPU nodes in one zone and placement group, a head that schedules no
model work, the package with its Hugging Face extra on every node, an MLflow server on the head whose URI every worker
gets. Offline: no cloud, no SSH."""

import copy
import json
import os
import re
import shlex
import sys
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


# What each EC2 instance type the file may use has (AWS's published specs): vCPUs, host RAM in GiB, GPUs, the GPU
# as Ray names it (its accelerator_type), GPU memory in GB. A node type on an instance missing here fails the tests
# below until its specs are added: the sizing checks need them.
INSTANCES = {
    "m6i.4xlarge": dict(vcpus=16, ram_gib=64, gpus=0, gpu=None, gpu_gb=0),
    "p5.48xlarge": dict(vcpus=192, ram_gib=2048, gpus=8, gpu="H100", gpu_gb=80),
    "p4d.24xlarge": dict(vcpus=96, ram_gib=1152, gpus=8, gpu="A100", gpu_gb=40),
    "g6e.4xlarge": dict(vcpus=16, ram_gib=128, gpus=1, gpu="L40S", gpu_gb=48),
    # sizes the file must not use for 8B jobs, here so that the sizing test can say why
    "g5.xlarge": dict(vcpus=4, ram_gib=16, gpus=1, gpu="A10G", gpu_gb=24),
    "m5.2xlarge": dict(vcpus=8, ram_gib=32, gpus=0, gpu=None, gpu_gb=0),
}
ACCELERATOR_PREFIX = "accelerator_type:"  # what ScalingConfig(accelerator_type=...) requests


@pytest.fixture(scope="module")
def capacity():
    """benchmarks/capacity.py, the memory model the sizing rule comes from (pure Python)."""
    sys.path.insert(0, str(CLUSTER_YAML.parent / "benchmarks"))
    try:
        import capacity as module
    finally:
        sys.path.pop(0)
    return module


def _specs(node_type: dict) -> dict:
    instance = node_type["node_config"]["InstanceType"]
    assert instance in INSTANCES, f"{instance}: add its vCPUs, RAM and GPUs to INSTANCES"
    return INSTANCES[instance]


def _gpu_types(config: dict) -> dict[str, dict]:
    return {
        name: t
        for name, t in config["available_node_types"].items()
        if name != config["head_node_type"] and _specs(t)["gpus"] > 0
    }


def test_head_schedules_no_model_work(config):
    """The head advertises no CPU and no GPU: no task or actor (train worker, reference pass, evaluation actor) can
    be placed there, so no model is loaded next to the GCS, the drivers and the MLflow server."""
    head = config["available_node_types"][config["head_node_type"]]
    resources = head.get("resources")
    assert resources is not None and resources.get("CPU") == 0, "head.resources must set CPU: 0"
    assert resources.get("GPU", 0) == 0 and not any(k.startswith(ACCELERATOR_PREFIX) for k in resources)
    assert _specs(head)["gpus"] == 0, "a GPU instance as head would idle its GPUs"
    # every other node type has CPUs: the cluster can still run what the head refuses
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"]:
            assert node_type["resources"].get("CPU", 0) >= 1, name


def test_no_cpu_only_worker_type_where_model_actors_could_land(config):
    """Evaluation and reference-pass actors ask for a fraction of a CPU: on a CPU-only worker they would load whole
    models on a small box. Every worker type is a GPU type."""
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"]:
            assert _specs(node_type)["gpus"] > 0, f"{name}: a CPU-only worker type"


def test_gpu_node_types_match_their_instances_and_can_be_pinned(config):
    """Declared resources are the instance's (the autoscaler plans with them), and each GPU type advertises the
    accelerator resource Ray Train's ScalingConfig(accelerator_type=...) requests, one distinct name per type."""
    names = []
    for name, node_type in _gpu_types(config).items():
        specs, resources = _specs(node_type), node_type["resources"]
        assert resources["GPU"] == specs["gpus"], name
        assert 1 <= resources["CPU"] <= specs["vcpus"], name
        accelerators = [k for k in resources if k.startswith(ACCELERATOR_PREFIX)]
        assert accelerators == [ACCELERATOR_PREFIX + specs["gpu"]], f"{name}: {accelerators}"
        assert resources[accelerators[0]] == 1
        names.append(specs["gpu"])
    assert len(names) == len(set(names)), "two GPU types with one accelerator name cannot be told apart"
    assert {"H100"} <= set(names), "the capacity plan's GPU"


def test_gpu_nodes_start_together(config):
    """One availability zone and one EC2 cluster placement group for every GPU type: a job's ranks exchange
    gradients over NCCL; across zones that traffic is slower and billed."""
    assert "," not in config["provider"]["availability_zone"], "GPU nodes of one job could land in different zones"
    groups = {t["node_config"].get("Placement", {}).get("GroupName") for t in _gpu_types(config).values()}
    assert len(groups) == 1 and None not in groups, groups


@pytest.mark.parametrize("strategy", ["ddp_lora", "fsdp_full"])
def test_gpu_node_host_ram_holds_an_8b_load(config, capacity, strategy):
    """The sizing rule: RAM less Ray's object store holds what Llama-3.1-8B needs on the node at its busiest: the
    ranks loading their rows (with the node's page cache of the bf16 file), an evaluation actor, or the publish task
    (which merges LoRA adapters into an fp32 copy of the base)."""
    for name, node_type in _gpu_types(config).items():
        specs = _specs(node_type)
        job = capacity.Job(strategy, gpus_per_node=specs["gpus"])
        need = capacity.host_per_node(capacity.LLAMA_31_8B, job)["need"]
        usable = capacity.usable_host_ram(specs["ram_gib"] * capacity.GiB)
        assert usable >= need, f"{name}: {usable / 1e9:.0f} GB usable < {need / 1e9:.0f} GB to load 8B ({strategy})"


def test_a_small_gpu_box_fails_the_sizing_rule(capacity):
    """The rule rejects the 16 GiB g5.xlarge this file used before (so the test above can fail)."""
    specs = INSTANCES["g5.xlarge"]
    need = capacity.host_per_node(capacity.LLAMA_31_8B, capacity.Job("ddp_lora", gpus_per_node=1))
    assert capacity.usable_host_ram(specs["ram_gib"] * capacity.GiB) < need["need"]


def test_gpu_memory_holds_the_planned_8b_job(config, capacity):
    """Each GPU type trains 8B in the target design: 8-GPU nodes an FSDP2 full fine-tune over their 8 GPUs, 1-GPU
    nodes DDP + LoRA (bf16 base), both with gradient checkpointing, micro-batch 1 pair x 2 x 2,048 tokens."""
    for name, node_type in _gpu_types(config).items():
        specs = _specs(node_type)
        strategy = "fsdp_full" if specs["gpus"] >= 8 else "ddp_lora"
        job = capacity.Job(strategy, gpus_per_node=specs["gpus"], grad_ckpt=True)
        need = capacity.per_gpu(capacity.LLAMA_31_8B, job).total(ckpt=True)
        assert need <= specs["gpu_gb"] * 1e9, f"{name}: {need / 1e9:.1f} GB per GPU > {specs['gpu_gb']} GB"


def test_gpu_workers_autoscale(config):
    for node_type in _gpu_types(config).values():
        assert 0 <= node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"]
    h100 = [t for t in _gpu_types(config).values() if _specs(t)["gpu"] == "H100" and _specs(t)["gpus"] == 8]
    assert h100 and h100[0]["max_workers"] >= 4, "the 4x8 H100 plan needs 4 nodes of one type"


def test_usage_shows_fsdp_pinning_and_s3_storage(config):
    text = CLUSTER_YAML.read_text()
    for needle in ("train.strategy=fsdp", "train.storage_path=s3://", "train.accelerator_type=H100", "eval.num_gpus=1"):
        assert needle in text, needle


def _pip_installs(command: str) -> list[str]:
    """The `-e` targets of a `pip install` command line, with $HOME expanded as the node's shell would."""
    tokens = shlex.split(command.replace("$HOME", "/home/ubuntu").replace("~/", "/home/ubuntu/"))
    if "install" not in tokens or not any(t.endswith("pip") for t in tokens):
        return []
    return [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in ("-e", "--editable")]


def test_every_node_installs_the_package_with_its_hf_extra(config):
    """Every node type's setup (global setup_commands, then its own or the global worker/head commands) installs
    the mounted package with the `hf` extra that pyproject.toml defines: every model.hf_path job needs it."""
    pyproject = (CLUSTER_YAML.parent / "pyproject.toml").read_text()
    extras = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^hf\s*=", extras, re.M), "pyproject.toml defines no `hf` extra"
    mounted = {remote.replace("~/", "/home/ubuntu/") for remote, local in config["file_mounts"].items() if local == "."}
    for name, node_type in config["available_node_types"].items():
        own = node_type.get("worker_setup_commands")
        role = config["head_setup_commands"] if name == config["head_node_type"] else config["worker_setup_commands"]
        commands = config["setup_commands"] + (own if own is not None else role)
        targets = [t for c in commands for t in _pip_installs(c)]
        assert any(t.endswith("[hf]") and t.removesuffix("[hf]") in mounted for t in targets), f"{name}: {targets}"


def test_setup_installs_this_package_with_the_local_ray_and_mlflow_versions(config):
    assert config["file_mounts"]["~/ray-dpo"] == "."  # `ray up` from the repo root copies the source
    commands = " ".join(config["setup_commands"])
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
