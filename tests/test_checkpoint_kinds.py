"""Every kind of directory the trainer writes (ours, a Hugging Face model, LoRA adapters on their staged base, an FSDP
sharded checkpoint) is read by every tool: `pipelines/evaluate.py`'s checks, `train.init_checkpoint` (a local path
or a storage URI, staged by the weights task) and serving (exported, registered, loaded back) — each with the
weights it holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_dpo.config import load_config
from ray_dpo.core.encoding import Encoding
from ray_dpo.core.logps import LogpsModel
from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.tokenizer import ByteTokenizer, load_tokenizer
from ray_dpo.recipe.checks import check, check_evaluation
from ray_dpo.stages import models, serving, storage, tracking
from ray_dpo.stages.train import parallel
from ray_dpo.stages.weights import WeightSource, stage_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parent.parent
KINDS = ("ours", "hf", "adapter", "sharded")


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(tokens)
    return getattr(out, "logits", out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module, Encoding]]:
    """kind -> (directory, the model it holds as the loader should rebuild it, its encoding)."""
    from tiny_hf import build

    root = tmp_path_factory.mktemp("kinds")
    byte = Encoding(ByteTokenizer(), max_len=48, max_prompt_len=24)
    torch.manual_seed(0)
    ours = TransformerLM(ModelConfig(dim=32, depth=2, heads=2, max_seq_len=64))
    models.save(root / "ours", ours, encoding=byte)

    hf_dir = build(root / "hf", arch="qwen2", vocab_size=400)
    hf_encoding = Encoding(load_tokenizer(hf_dir), max_len=48, max_prompt_len=24, chat_template=True)
    hf_encoding.save(hf_dir)
    hf = models.load(str(hf_dir))

    lora = models.add_lora(models.load(str(hf_dir)), r=4, alpha=8.0, dropout=0.0, target_modules="all-linear", seed=0)
    with torch.no_grad():  # adapters that change the model
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    models.save(root / "adapter", lora, base=str(hf_dir), encoding=hf_encoding)

    torch.manual_seed(1)
    sharded = TransformerLM(ModelConfig(dim=32, depth=2, heads=2, max_seq_len=64))
    optimizer = torch.optim.AdamW(sharded.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    (root / "sharded").mkdir()
    parallel.save_sharded(root / "sharded", LogpsModel(sharded), optimizer, scheduler)  # what an FSDP rank writes
    models.save_config(root / "sharded", sharded)
    byte.save(root / "sharded")
    return {
        "ours": (str(root / "ours"), ours, byte),
        "hf": (str(hf_dir), hf, hf_encoding),
        "adapter": (str(root / "adapter"), models.merged(lora), hf_encoding),
        "sharded": (str(root / "sharded"), sharded, byte),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_every_checkpoint_kind_is_read_by_evaluate_init_checkpoint_and_serving(
    ray_session, checkpoints, tmp_path, mlflow_uri, kind
):
    directory, model, encoding = checkpoints[kind]
    tokens = torch.randint(3, 250, (2, 9))
    want = _logits(model, tokens)
    as_uri = f"file://{directory}"
    assert models.kind(directory) == models.kind(as_uri) == kind

    # pipelines/evaluate.py: accepted as the policy, its own encoding taken
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={tmp_path / 'out'}"])
    checked, policy, _ = check_evaluation(config, directory, checkpoints["ours"][0])
    assert policy == directory and checked.encoding == encoding

    # train.init_checkpoint, as a storage URI: accepted by the checks, staged by the weights task, equal weights
    init = check(load_config(ROOT / "configs" / "tiny.yaml", [f"train.init_checkpoint={as_uri}", "data.max_len=48"]))
    assert init.model_kind == ("ours" if kind in ("ours", "sharded") else "hf")
    staged = stage_weights(
        WeightSource(as_uri), str(tmp_path / "storage"), "run", "staged", "reference", encoding=encoding
    )
    assert storage.find_directory(str(tmp_path / "storage"), "run", "staged", "reference") is not None
    torch.testing.assert_close(_logits(models.load(staged), tokens), want, atol=1e-5, rtol=1e-5)
    assert models.load_encoding(staged) == encoding

    # serving: the policy a run publishes (whole weights, LoRA merged), registered and loaded back
    run_id = tracking.start_run(mlflow_uri, experiment="kinds", run_name=kind)
    served_dir = Path(directory) if kind == "ours" else serving.export_hf(directory, tmp_path / "export")["model"]
    model_uri = serving.register_model(mlflow_uri, run_id, served_dir, f"policy-{kind}")
    loaded, served_encoding = serving.load_registered_model(model_uri, mlflow_uri)
    torch.testing.assert_close(_logits(loaded, tokens), want, atol=1e-5, rtol=1e-5)
    assert served_encoding == encoding
