"""Every combination a user can configure: a one-step run per row of a pairwise covering of the switches, on one
shared local Ray. Each row trains and checkpoints, or is refused by the checks before Ray with one line naming the
keys. `dpo.reference=precomputed` (the reference pool's real output) gives the live reference's step-1 loss, log 2."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from conftest import pipeline_main

from ray_dpo.config import load_config
from ray_dpo.recipe.checks import refused_combination

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
SWITCHES = {
    "kind": ("ours", "hf", "hf_lora"),
    "train.strategy": ("ddp", "fsdp"),
    "dpo.reference": ("live", "precomputed", "none"),
    "dpo.prefix_sharing": (False, True),
    "data.chat_template": (False, True),
    "data.length_bucket_window": (0, 16),
    "train.precision": ("fp32", "bf16"),
    "train.compile": (False, True),
    "train.grad_accum": (1, 2),
    "data.packing": (False, True),
}
# A pairwise covering array of SWITCHES (checked by test_the_rows_cover_every_pair_of_switch_values): nine rows that
# train cover every pair but (ours, chat template), which the last row covers by being refused. Precomputed
# reference log-probs on each model kind, with and without prefix sharing and length bucketing; three compiled rows;
# packed rows on each model kind and strategy, a precomputed reference among them.
ROWS = [
    ("ours", "fsdp", "live", True, False, 16, "bf16", False, 1, False),
    ("ours", "ddp", "precomputed", False, False, 0, "fp32", False, 2, True),
    ("ours", "fsdp", "none", False, False, 0, "fp32", True, 2, False),
    ("hf", "ddp", "live", False, False, 16, "fp32", True, 1, True),
    ("hf", "fsdp", "precomputed", False, True, 16, "bf16", False, 2, False),
    ("hf", "ddp", "none", True, True, 0, "bf16", False, 1, True),
    ("hf_lora", "ddp", "live", True, True, 0, "fp32", False, 2, False),
    ("hf_lora", "fsdp", "precomputed", True, True, 16, "bf16", True, 1, True),
    ("hf_lora", "fsdp", "none", False, False, 16, "fp32", False, 1, True),
    ("ours", "ddp", "none", True, True, 16, "bf16", False, 1, False),  # refused: bytes have no chat template
]


def test_the_rows_cover_every_pair_of_switch_values():
    names = list(SWITCHES)
    assert all(
        len(row) == len(names) and all(v in SWITCHES[n] for n, v in zip(names, row, strict=True)) for row in ROWS
    )
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        seen = {(row[i], row[j]) for row in ROWS}
        missing = set(itertools.product(SWITCHES[a], SWITCHES[b])) - seen
        assert not missing, f"{a} x {b}: {sorted(missing, key=str)}"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, str]:
    """The demo task's pairs as files (no SFT set: each row is one DPO run)."""
    from ray_dpo.recipe.demo import write_sort_task

    return write_sort_task(tmp_path_factory.mktemp("data"), rows=64, seed=0)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> str:
    from tiny_hf import build

    return str(build(tmp_path_factory.mktemp("hf") / "qwen2", arch="qwen2", vocab_size=400))


def _overrides(row: tuple, hf_model: str, pairs: dict[str, str], out: Path) -> list[str]:
    values = dict(zip(SWITCHES, row, strict=True))
    kind = values.pop("kind")
    args = [f"output_dir={out}", f"train.storage_path={out}/ray", "train.max_steps=1", "train.batch_size=8"]
    args += ["train.log_every=1", "train.eval_every=1", "train.checkpoint_every=1", "eval.enabled=false"]
    args += ["tracking.registered_model=null", "data.synthetic=null", f"data.train_path={pairs['train']}"]
    args += [f"data.val_path={pairs['val']}", "data.max_len=64"]
    args += ["data.max_prompt_len=32", "train.cpus_per_worker=0.5"]
    if kind != "ours":
        args += [f"model.hf_path={hf_model}", f"model.lora_r={4 if kind == 'hf_lora' else 0}"]
    args += [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in values.items()]
    return args


def _step1(uri: str, key: str = "train/loss") -> float:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (first,) = [m for m in client.get_metric_history(run.info.run_id, key) if m.step == 1]
    return first.value


@pytest.mark.parametrize("row", ROWS, ids=lambda row: "-".join(str(v) for v in row))
def test_each_combination_trains_one_step_or_is_refused_at_start(ray_session, hf_model, pairs, tmp_path, capsys, row):
    """One step through `pipelines/align.py` (in-process, on the shared Ray): exit 0 with a checkpoint, or exit 2
    with `error: config: ...` naming the keys and nothing written. A precomputed reference's step-1 loss equals
    the live reference's (log 2: the policy starts as its reference); packed rows log (almost) no padding."""
    main = pipeline_main("align")
    out = tmp_path / "out"
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), *_overrides(row, hf_model, pairs, out)]
    config = load_config(argv[1], argv[2:])
    kind = row[0]
    refusal = refused_combination(config, "hf_lora" if kind == "hf_lora" else kind)
    code = main(argv)
    err = capsys.readouterr().err
    if refusal is not None:
        assert code == 2 and err.strip() == f"error: config: {refusal}" and not out.exists(), err
        return
    assert code == 0, err[-3000:]
    assert list((out / "ray" / "tiny").glob("checkpoint_step_00000001/manifest.rank0-of-*.json")), "no checkpoint"
    values = dict(zip(SWITCHES, row, strict=True))
    padded = _step1(f"sqlite:///{out / 'mlflow.db'}", "train/padded_fraction")
    assert 0 <= padded <= (0.05 if values["data.packing"] else 1), padded  # packed: the batch's pairs fill their rows
    if values["dpo.reference"] != "none":
        # step 1: the policy IS its reference (LoRA's B starts at zero), so the sigmoid loss is -log(sigmoid(0)) =
        # log 2, exactly with the live reference. Precomputed log-probs score in the training precision: exact in
        # fp32, to bf16's rounding (other batch shapes) in bf16; wrong rows or a wrong mask move it by far more.
        exact = values["dpo.reference"] == "live" or values["train.precision"] == "fp32"
        step1 = _step1(f"sqlite:///{out / 'mlflow.db'}")
        assert step1 == pytest.approx(math.log(2), abs=1e-5 if exact else 1e-2), step1
