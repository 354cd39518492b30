"""One owner per contract: the config (frozen, checked once before Ray), the encoding (built once, saved with every
checkpoint), checkpoint layout and model kind (every kind the trainer writes reads everywhere), and secrets (never
reach MLflow)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import pipeline_main

from ray_dpo.config import Config, ConfigError, ModelSettings, load_config, override
from ray_dpo.core import checkpoint as layout
from ray_dpo.core.encoding import Encoding
from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.tokenizer import ByteTokenizer
from ray_dpo.stages import models, tracking

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


# ------------------------------------------------------------------------------------------------ config


def test_config_is_frozen_and_derived_configs_are_checked():
    config = load_config(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 1.0
    derived = override(config, {"train.lr": 1e-4, "dpo.beta": 0.5})
    assert (derived.train.lr, derived.dpo.beta, config.train.lr) == (1e-4, 0.5, load_config(TINY).train.lr)
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        override(config, {"train.lrr": 1.0})
    with pytest.raises(ConfigError, match="dpo.beta must be float"):
        override(config, {"dpo.beta": "fast"})


def test_the_config_imports_no_torch_and_names_our_model_keys_once():
    code = "import sys, ray_dpo.config; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    ours = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    settings = {f.name: f.default for f in dataclasses.fields(ModelSettings)}
    assert ours == {k: settings[k] for k in ours}, "model.* and ModelConfig disagree"
    assert ModelSettings(dim=64, heads=2).transformer_config() == ModelConfig(dim=64, heads=2)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["eval.reward_fn=no_such_module_xyz:reward"], "eval.reward_fn"),
        (["train.batch_size=15"], "train.batch_size=15 must be a multiple of train.num_workers * train.grad_accum"),
        (["sft.batch_size=15"], "sft.batch_size=15 must be a multiple"),
        (["eval.beams=0"], "eval.beams"),
        (["data.max_len=512"], "data.max_len=512 exceeds the model's 64 positions"),
        (["data.chat_template=true"], "data.chat_template=true"),
        (["data.max_prompt_len=100"], "data.max_prompt_len"),
        (
            ["train.init_checkpoint=file:///nonexistent/ckpt"],
            "train.init_checkpoint=file:///nonexistent/ckpt: not a model checkpoint",
        ),
    ],
    ids=["reward-fn", "batch", "sft-batch", "eval", "positions", "chat-template", "prompt-len", "init-uri"],
)
def test_every_check_runs_before_ray_and_writes_nothing(tmp_path, capsys, monkeypatch, overrides, key):
    import ray

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    started = ray.is_initialized()
    out = tmp_path / "out"
    argv = ["--config", str(TINY), f"output_dir={out}", f"train.storage_path={out}/ray", *overrides]
    assert pipeline_main("align")(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config: ") and err.count("\n") == 1 and key in err, err
    assert not out.exists() and ray.is_initialized() == started


def test_a_config_error_a_run_used_to_meet_after_training_comes_in_seconds(tmp_path):
    """The reward function is imported by the checks, not by evaluation after training: a whole `align.py` process
    (imports included) refuses it in well under a minute, and writes nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    cmd = [sys.executable, str(ROOT / "pipelines" / "align.py"), "--config", str(TINY), "output_dir=out"]
    cmd += ["train.storage_path=out/ray", "eval.reward_fn=ray_dpo.recipe.demo:no_such_reward"]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: config: eval.reward_fn='ray_dpo.recipe.demo:no_such_reward': ray_dpo.recipe.demo has no function "
        "'no_such_reward'"
    ], proc.stderr
    assert elapsed < 60 and not (tmp_path / "out").exists(), elapsed


def test_the_loss_and_reference_names_are_defined_once():
    from ray_dpo.core import dpo, losses, names
    from ray_dpo.core.names import LOSS_TYPES, REFERENCE_MODES

    assert Config.__annotations__ and "sigmoid" in LOSS_TYPES and REFERENCE_MODES == ("live", "precomputed", "none")
    for module in (dpo, losses):
        source = Path(module.__file__).read_text()
        assert '"precomputed", "none")' not in source and '"robust", "ipo"' not in source, module.__name__
    assert names.LOSS_TYPES is LOSS_TYPES


# ------------------------------------------------------------------------------------------------ encoding


def test_the_encoding_round_trips_with_its_tokenizer(tmp_path):
    encoding = Encoding(ByteTokenizer(), max_len=64, max_prompt_len=16)
    encoding.save(tmp_path)
    assert Encoding.load(tmp_path) == encoding
    # the prompt a served model sees: bos + text, its end kept to leave room for the response (the bos kept too)
    assert encoding.prompt("abcdef", room=4) == [257, *b"def"]
    with pytest.raises(ValueError, match="chat_template=True but the tokenizer has no chat template"):
        Encoding(ByteTokenizer(), chat_template=True)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_directory_kinds_are_told_apart_by_their_files():
    kind = layout.directory_kind
    assert kind(["model_config.json", "model.safetensors", "tokenizer.json"]) == "ours"
    assert kind(["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]) == "hf"
    assert kind(["adapter_config.json", "adapter_model.safetensors", "base.json"]) == "adapter"
    assert kind([".metadata", "__0_0.distcp", "__1_0.distcp", "config.json", "adapter_config.json"]) == "sharded"
    assert kind([".metadata", "__0_0.distcp", "model_config.json", "model.safetensors"]) == "ours"  # whole wins
    assert kind(["config.json"]) is None and kind(["optimizer.pt", "state.json"]) is None


# ------------------------------------------------------------------------------------------------ secrets


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("http://alice:s3cret@10.0.0.5:5000", "s3cret"),
        ("postgresql://ml:pw123@db:5432/mlflow", "pw123"),
        ("s3://bucket/runs?access_key=AKIAXYZ&secret_key=zzz&endpoint_override=http://minio:9000", "zzz"),
        ("https://host/x?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA/2026", "deadbeef"),
        ("python align.py tracking.uri=https://u:tok123@h/ train.lr=1", "tok123"),
    ],
)
def test_credentials_in_uris_are_redacted(text, hidden):
    shown = tracking.redact(text)
    assert hidden not in shown and "***" in shown
    assert tracking.redact("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"


def test_secrets_never_reach_mlflow(ray_session, mlflow_server, tmp_path, monkeypatch):
    """A tracking URI with a password and a storage URI with keys: the run's params, its config.yaml, its tags and
    the command-line tag hold none of them."""
    from mlflow import MlflowClient

    from ray_dpo.recipe import open_run

    uri, _ = mlflow_server
    with_password = uri.replace("http://", "http://alice:s3cret-pw@")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["align.py", f"tracking.uri={with_password}", "data.val_path=s3://bucket/val?access_key=AKIA&secret_key=k3y"]
    monkeypatch.setattr(sys, "argv", argv)
    out = tmp_path / "out"
    config = load_config(TINY, [f"output_dir={out}", f"train.storage_path={out}/ray", f"tracking.uri={with_password}"])
    with open_run(config, params={"eval.reference": "s3://bucket/ref?secret_key=k3y"}) as run:
        run_id = run.run_id
    client = MlflowClient(uri)
    logged = client.get_run(run_id).data
    config_yaml = client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    shown = [*logged.params.values(), *logged.tags.values(), Path(config_yaml).read_text()]
    for secret in ("s3cret-pw", "k3y"):
        assert not any(secret in value for value in shown), secret
    assert logged.params["tracking.uri"].startswith("http://***@127.0.0.1")
    assert "***@" in logged.tags["mlflow.source.name"]


# ------------------------------------------------------------------------------------------------ model kinds


def test_the_model_kind_of_a_module_is_decided_in_one_place():
    from tiny_hf import build  # noqa: F401 (imports transformers, as a user's HF model would)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ray_dpo.core.kinds import is_hf, is_peft, module_kind
    from ray_dpo.core.logps import LogpsModel

    ours = TransformerLM(ModelConfig(dim=32, depth=1, heads=2))
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    lora = models.add_lora(hf, r=2, alpha=4.0, dropout=0.0, target_modules="all-linear", seed=0)
    assert [module_kind(m) for m in (ours, torch.compile(ours), LogpsModel(ours).model)] == ["ours"] * 3
    assert (
        module_kind(lora) == "hf"
        and is_peft(lora)
        and not is_hf(lora)
        and module_kind(torch.nn.Linear(2, 2)) == "other"
    )
