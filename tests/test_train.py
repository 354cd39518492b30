"""Ray Train DPO: DDP == 1 worker, failure recovery, resume by run name, NaN stop, SFT. Real local Ray (2 CPUs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_dpo.checkpoint import load_model, load_training_state, save_model
from ray_dpo.config import load_config
from ray_dpo.model import TransformerLM
from ray_dpo.tokenizer import ByteTokenizer
from ray_dpo.train import FAIL_ENV, TrainingDivergedError, lr_factor, train_dpo

PAD = ByteTokenizer.pad_id


def _pairs(n: int, seed: int, ref_logp: list[float] | None = None) -> list[dict]:
    """Preference rows of the data contract: [bos, prompt] and the two responses, token ids."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p, c, r = (int(x) for x in rng.integers(2, 6, size=3))
        prompt = [257, *rng.integers(97, 123, size=p - 1).tolist()]
        chosen, rejected = rng.integers(97, 123, size=c).tolist(), rng.integers(97, 123, size=r).tolist()
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if ref_logp is not None:
            row.update(ref_chosen_logp=ref_logp[i], ref_rejected_logp=-10.0)
        rows.append(row)
    return rows


def _config(tmp_path: Path, *overrides: str):
    base = [
        "model.dim=32",
        "model.depth=1",
        "model.heads=2",
        "model.max_seq_len=32",
        "train.batch_size=8",
        "train.lr=1e-2",
        "train.warmup_steps=1",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "train.cpus_per_worker=0.5",
        f"train.storage_path={tmp_path / 'ray'}",
    ]
    return load_config(None, [*base, *overrides])


@pytest.fixture
def init_checkpoint(tmp_path) -> str:
    config = _config(tmp_path)
    torch.manual_seed(0)
    return str(save_model(tmp_path / "init", TransformerLM(config.model), ByteTokenizer()))


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return load_model(checkpoint).state_dict()


def test_lr_schedule_warmup_then_cosine_to_min():
    f = lambda s: lr_factor(s, warmup=2, total=10, min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert all(f(s) > f(s + 1) for s in range(2, 10))


def test_ddp_two_workers_with_failure_match_one_worker(ray_session, tmp_path, init_checkpoint, monkeypatch):
    """2 workers (grad_accum 1) vs 1 worker (grad_accum 2) on the same global batches: same weights after 6 steps
    over 2 epochs. The 2-worker run loses rank 1 at step 5 (max_failures=1): Ray restarts the group, it resumes
    from the step-4 checkpoint (mid-epoch: skips 1 global batch) and finishes. A re-run with the same run name
    resumes from the final checkpoint and has nothing left to do."""
    train_ds = ray_session.data.from_items(_pairs(24, seed=1))  # 3 global batches per epoch
    val_ds = ray_session.data.from_items(_pairs(5, seed=2))  # odd size: ranks hold 3 and 2 rows
    common = dict(run_id=None, tracking_uri=None, init_checkpoint=init_checkpoint, pad_id=PAD)
    common["reference_checkpoint"] = init_checkpoint
    one = _config(tmp_path, "train.num_workers=1", "train.grad_accum=2", "train.epochs=2", "train.run_name=one")
    single = train_dpo(one, train_ds, val_ds, **common)

    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ENV, f"4:1:{marker}")
    two = _config(tmp_path, "train.num_workers=2", "train.epochs=2", "train.max_failures=1", "train.run_name=two")
    ddp = train_dpo(two, train_ds, val_ds, **common)

    assert marker.exists(), "the injected worker failure did not happen"
    assert single.steps == ddp.steps == 6
    _, state = load_training_state(ddp.checkpoint)
    assert state["step"] == 6 and state["epoch"] == 2 and state["epoch_step"] == 0
    # the restarted group continued from step 4's checkpoint, not from scratch (the injected failure waits 6 s
    # so that Ray's controller, polling every 2 s, has registered it; step 2's would be fine too)
    assert ddp.resumed_from in (2, 4)
    w1, w2, w0 = _weights(single.checkpoint), _weights(ddp.checkpoint), _weights(init_checkpoint)
    assert max((w1[k] - w0[k]).abs().max().item() for k in w0) > 1e-3  # training moved the weights
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=0, msg=name)
    for key in ("train/loss", "val/loss", "val/rewards/accuracies"):
        assert math.isfinite(single.metrics[key])
        assert ddp.metrics[key] == pytest.approx(single.metrics[key], abs=1e-4), key

    monkeypatch.delenv(FAIL_ENV)
    again = train_dpo(two, train_ds, val_ds, **common)
    assert again.steps == 6 and again.resumed_from == 6
    for name in w2:
        torch.testing.assert_close(_weights(again.checkpoint)[name], w2[name], atol=0, rtol=0)


def test_nan_loss_stops_before_checkpoint_is_overwritten(ray_session, tmp_path, init_checkpoint):
    """Precomputed reference log-probs; NaN ones in the 3rd global batch. The run stops with a one-line error at
    step 3 and the latest checkpoint is still the step-2 one."""
    ref = [0.0] * 16 + [math.nan] * 8
    train_ds = ray_session.data.from_items(_pairs(24, seed=1, ref_logp=ref))
    config = _config(
        tmp_path,
        "train.num_workers=1",
        "train.checkpoint_every=1",
        "train.max_failures=0",
        "dpo.reference=precomputed",
        "train.run_name=nan",
    )
    with pytest.raises(TrainingDivergedError, match="non-finite train loss .* at step 3") as err:
        train_dpo(
            config, train_ds, None, run_id=None, tracking_uri=None, init_checkpoint=init_checkpoint,
            reference_checkpoint=None, pad_id=PAD,
        )  # fmt: skip
    assert "\n" not in str(err.value)
    states = (tmp_path / "ray" / "nan").glob("checkpoint_*/state.json")
    steps = [json.loads(state.read_text())["step"] for state in states]
    assert max(steps) == 2
