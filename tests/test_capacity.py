"""benchmarks/capacity.py: the memory model behind docs/SCALING.md and its check against benchmarks/scale.py (pure
Python, no model is built)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def capacity():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import capacity as module
    finally:
        sys.path.pop(0)
    return module


SCALE_MODELS = {  # benchmarks/scale.py's two shapes, as its JSON records them
    "tiny": dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=2048, tied_embeddings=True),
    "0.3b": dict(layers=24, hidden=1024, intermediate=2816, heads=16, kv_heads=2, vocab=2048, tied_embeddings=True),
}
WORKLOAD = dict(
    num_workers=2,
    batch_size=4,
    max_len=128,
    max_prompt_len=64,
    prefix_sharing=True,
    lora_r=8,
    eval_batch_size=4,
    file_dtype="bfloat16",
)
TARGETS = {"driver": 0.25, "lora_train_worker": 0.75, "eval_actor": 0.75, "fsdp_over_ddp_full": 0.6}


def test_freed_heap_is_kept_up_to_the_threshold_and_trimmed(capacity):
    Phase, GiB = capacity.Phase, 2**30
    phases = [Phase("big", 3 * GiB), Phase("small", 1 * GiB), Phase("mapped", 1 * GiB, mapped=GiB)]
    # 2 GiB freed: 1 GiB of it kept, so the mapped phase adds to a 2 GiB heap
    assert capacity.resident(phases, retained=GiB) == [3 * GiB, 2 * GiB, 3 * GiB]
    trimmed = [Phase("big", 3 * GiB), Phase("trim", 1 * GiB, trim=True), Phase("mapped", 1 * GiB, mapped=GiB)]
    assert capacity.resident(trimmed, retained=GiB) == [3 * GiB, 1 * GiB, 2 * GiB]


def test_the_plan_describes_the_code_as_it_is(capacity):
    text = capacity.plan_markdown()
    assert "today" not in text.lower()
    for title in ("DDP + LoRA (r=8), 1x8 H100", "FSDP2 full fine-tune, 4x8 H100", "NeMo-RL"):
        assert title in text
    assert "with gradient checkpointing" in text and "Host RAM per node" in text and "MFU" in text


def test_an_fsdp_rank_holds_its_shard_and_a_lora_rank_a_bf16_base(capacity):
    shape = capacity.LLAMA_31_8B
    fsdp = capacity.per_gpu(shape, capacity.Job("fsdp_full", nodes=4))
    assert fsdp.parameters == pytest.approx(4 * shape.params / 32)
    assert fsdp.reference == pytest.approx(2 * shape.params / 32)
    lora = capacity.per_gpu(shape, capacity.Job("ddp_lora"))
    assert lora.parameters < 2.05 * shape.params and lora.reference == 0
    assert lora.total(ckpt=True) < lora.total(ckpt=False) <= capacity.H100_MEMORY


def _scale_result(capacity, measured_x: dict[tuple[str, str], float]) -> dict:
    """A benchmarks/scale.py result whose growth rows are `measured_x` (fractions of the 0.3b fp32 size)."""
    models = {}
    for size, info in SCALE_MODELS.items():
        shape = capacity.shape_from_scale(info, size)
        models[size] = info | dict(params=shape.params, fp32_bytes=4 * shape.params)
    fp32 = models["0.3b"]["fp32_bytes"]
    growth = [
        dict(config=c, kind=k, tiny_mb=600.0, big_mb=600 + x * fp32 / 2**20, growth_mb=x * fp32 / 2**20, complete=True)
        for (c, k), x in measured_x.items()
    ]
    return dict(models=models, workload=WORKLOAD, targets=TARGETS, growth=growth)


def test_validation_compares_modelled_and_measured_growth(capacity):
    cells = [("lora_ckpt", "train_worker"), ("fsdp", "train_worker"), ("ddp_full", "train_worker"), ("fsdp", "driver")]
    empty = _scale_result(capacity, dict.fromkeys(cells, 0.0))
    small, big = (capacity.shape_from_scale(SCALE_MODELS[s], s) for s in ("tiny", "0.3b"))
    fp32 = 4 * big.params

    def modelled(config: str, kind: str) -> float:
        peaks = [capacity.predict_cpu(s, config, empty["workload"])[kind]["peak"] for s in (small, big)]
        return (peaks[1] - peaks[0]) / fp32

    exact = {cell: modelled(*cell) for cell in cells}
    rows = {(r["config"], r["kind"]): r for r in capacity.validate_data(_scale_result(capacity, exact))}
    assert all(r["within"] for r in rows.values())
    assert rows[("fsdp", "driver")]["near_zero"]  # the driver loads no weights: compared in MiB
    assert rows[("fsdp", "train_worker")]["ratio"] == pytest.approx(1.0)
    off = capacity.validate_data(_scale_result(capacity, {("fsdp", "train_worker"): 2 * exact["fsdp", "train_worker"]}))
    assert not off[0]["within"] and off[0]["ratio"] == pytest.approx(0.5)
    # the FSDP worker's modelled growth is well under a DDP full fine-tune worker's: sharded state, bf16 reference
    assert exact["fsdp", "train_worker"] < 0.6 * exact["ddp_full", "train_worker"]
