"""The benchmark scripts run in a seconds-long smoke mode, so they cannot rot unnoticed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(script: str, out: Path, timeout_s: float) -> dict:
    """`python benchmarks/<script> --smoke --out <out>` against THIS checkout; returns the JSON it wrote."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_data_benchmark_smoke(tmp_path):
    result = run_smoke("data.py", tmp_path / "data.json", timeout_s=180)
    assert result["smoke"] is True
    assert {"cpu_model", "cpu_count", "loadavg_start", "loadavg_end"} <= set(result["env"])
    assert set(result["startup"]) == {"1", "2"}
    assert {"ray_init_s", "first_call_s", "idle_cpu_per_s"} <= set(result["startup"]["2"])
    files = {f["name"] for f in result["files"]}
    assert "hh_rlhf_harmless_train_1812" in files and len(files) >= 3
    assert len(result["results"]) == 2 * len(files)  # every file on 1 and on 2 CPUs
    for row in result["results"]:
        assert row["cpus"] in (1, 2) and row["file"] in files
        assert row["plain"]["rows_per_s"] > 0 and row["ray"]["rows_per_s"] > 0 and row["ray_over_plain"] > 0
        assert {"median_s", "min_s", "max_s", "repeats", "cpu_s"} <= set(row["ray"])
        assert "cpu_efficiency" in row and len(row["loadavg"]) == 3
    assert set(result["scaling_2_over_1_cpus"]) == files
    assert set(result["crossover"]) == {"cpus=1", "cpus=2"}
    assert set(result["crossover"]["cpus=2"]) == {"0.8", "1.0"}
    assert {"ray", "plain"} <= set(result["linear_fit"]["cpus=2"])
    assert result["python_rows_loop"]["rows_per_s"] > 0
    assert 0 < result["padded_fraction_batch_8"]["file order"] < 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dpo_step_benchmark_smoke(tmp_path):
    """Ours and x-transformers' own DPO at the same precision, in the same run, with the peaks MFU divides by."""
    result = run_smoke("dpo_step.py", tmp_path / "dpo_step.json", timeout_s=60)
    assert result["args"]["smoke"] is True and result["env"]["cpu_info"]["model"]
    for name in ("synthetic", "hh_rlhf"):
        section = result[name]
        assert {"rows", "peaks", "load_before", "load_after", "summary"} <= section.keys()
        assert all(section["peaks"][k] > 0 for k in ("fp32_torch", "fp32_onednn", "bf16_torch"))
        settings = {(row["impl"], row["dtype"]) for row in section["rows"]}
        for dtype in ("fp32", "bf16"):
            assert {("ours", dtype), ("ours-concat", dtype), ("x-transformers", dtype)} <= settings
        assert ("ours-mkl", "fp32") in settings  # the A/B of the oneDNN fp32 matmuls
        for row in section["rows"]:
            assert row["step_s"] > 0 and row["cpu_s"] > 0 and row["tokens_per_s"] > 0 and row["flops_per_step"] > 0
            assert 0 < row["mfu"] and row["peak_gflops"] > 0 and row["vs_xt"] > 0
        for dtype in ("fp32", "bf16"):
            summary = section["summary"][dtype]
            assert summary["vs_xt_eager"] > 0 and summary["mfu_eager"] > 0
            # the verdict is the best setting's ratio against that precision's target, whichever way it went
            best = max(r["vs_xt"] for r in section["rows"] if r["impl"] == "ours" and r["dtype"] == dtype)
            assert summary["target"] > 1 and summary["meets_target"] == (best >= summary["target"])
        assert section["summary"]["fp32"]["onednn_vs_mkl"] > 0
    packing = result["packing"]  # packed vs bucketed HH-RLHF batches, bf16 eager: ours and the tiny HF model
    settings = {(row["model"], row["prefix_sharing"], row["pack_len"] is not None) for row in packing["rows"]}
    assert {("ours", ps, packed) for ps in (False, True) for packed in (False, True)} <= settings
    assert {("tiny HF Qwen2", True, False), ("tiny HF Qwen2", True, True)} <= settings
    bucketed = {(r["model"], r["prefix_sharing"]): r for r in packing["rows"] if r["pack_len"] is None}
    for row in packing["rows"]:
        assert row["step_s"] > 0 and row["vs_bucketed"] > 0 and 0 <= row["epoch_padded_fraction"] < 1
        if row["pack_len"] is not None:
            assert row["epoch_padded_fraction"] < bucketed[row["model"], row["prefix_sharing"]]["epoch_padded_fraction"]
    summary = packing["summary"]
    assert summary["target"] == 1.25 and summary["meets_target"] == (summary["packed_vs_bucketed"] >= 1.25)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_benchmark_smoke(tmp_path):
    """The GPU benchmark's CPU dry run: a tiny Llama, the three DPO-step settings and HF decoding."""
    result = run_smoke("gpu.py", tmp_path / "gpu.json", timeout_s=60)
    assert result["device"] == "cpu" and result["preset"] == "tiny"
    assert result["params"] > 0 and result["peak_bf16"] > 0
    assert [row["setting"] for row in result["dpo_step"]] == ["plain", "chunked", "chunked + prefix sharing"]
    for row in result["dpo_step"]:
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] > 0 and row["speedup_vs_plain"] > 0
    assert result["generation"]["tokens_per_s"] > 0
    packing = {row["setting"]: row for row in result["packing"]}  # FlexAttention only on CUDA
    assert set(packing) == {"HF Llama, padded", "HF Llama, packed rows, 4-D mask", "ours, padded"} | {
        "ours, packed rows, CPU tiles"
    }
    for row in packing.values():
        assert (
            row["step_s"] > 0 and row["vs_padded"] > 0 and (row["padded_fraction"] == 0) == ("packed" in row["setting"])
        )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_attention_benchmark_smoke(tmp_path):
    result = run_smoke("attention.py", tmp_path / "attention.json", timeout_s=60)
    assert result["smoke"] is True and result["max_keys"] > 0
    assert {(row["dtype"], row["keys"]) for row in result["rows"]} == {
        (dtype, keys) for dtype in ("float32", "bfloat16") for keys in (64, 128)
    }
    for row in result["rows"]:
        assert min(row[k] for k in ("sdpa_ms", "untiled_ms", "tiled_ms", "attend_ms", "tiled_speedup")) > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_memory_benchmark_smoke(tmp_path):
    result = run_smoke("memory.py", tmp_path / "memory.json", timeout_s=60)
    assert result["device"] == "cpu" and result["size"]["vocab"] > 0
    variants = {(row["model"], row["variant"]) for row in result["rows"]}
    assert {("ours", "plain"), ("ours", "chunked")} <= variants
    for row in result["rows"]:
        assert row["peak_mb"] > 0 and row["step_s"] > 0 and row["ratio"] > 0 and row["logits_mb"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_generate_benchmark_smoke(tmp_path):
    result = run_smoke("generate.py", tmp_path / "generate.json", timeout_s=60)
    assert result["config"]["smoke"] is True and result["config"]["cpu"]
    cases = {(row["batch"], row["case"]) for row in result["results"]}
    for batch in result["config"]["batches"]:
        assert {(batch, "ray_dpo cached"), (batch, "x-transformers cached")} <= cases
    for row in result["results"]:
        assert row["median_s"] > 0 and row["tokens_per_s"] > 0
        if row["reference"]:
            assert row["ratio"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scale_benchmark_smoke(tmp_path):
    """The real pipeline on a tiny random HF model (LoRA, 2 workers, evaluation on): every process kind's peak
    memory is found and measured."""
    result = run_smoke("scale.py", tmp_path / "scale.json", timeout_s=800)
    assert result["smoke"] is True and result["env"]["cpu"]
    assert all(v > 0 for v in result["matmul_peaks_flops"].values())
    (cell,) = result["cells"]
    assert (cell["size"], cell["config"], cell["status"]) == ("tiny", "lora", "ok"), cell
    assert len(cell["peaks"]["train_worker"]) == 2
    for kind in ("driver", "train_worker", "eval_actor"):
        assert cell["peaks"][kind] and min(cell["peaks"][kind]) > 100 * 2**20, (kind, cell["peaks"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_data_scale_benchmark_smoke(tmp_path):
    """read -> split -> order -> 2-worker training on a generated file: every stage timed, the store's use per stage
    measured against the token bytes, the driver's peak found."""
    result = run_smoke("data_scale.py", tmp_path / "data_scale.json", timeout_s=500)
    assert result["smoke"] is True and result["env"]["cpu_model"] and len(result["env"]["loadavg_end"]) == 3
    assert [r["rows"] for r in result["results"]] == [4_000]
    for r in result["results"]:
        assert r["status"] == "ok", r["status"]
        assert r["steps"] == 1 and r["facts"]["rows_out"] <= r["rows"] and r["facts"]["token_bytes"] > r["rows"]
        assert all(r["seconds"][stage] > 0 for stage in ("read", "split+order", "deal"))
        assert all(spent >= 0 for spent in r["cpu_seconds"].values()), "a worker's CPU time lost when it exited"
        assert r["cpu_seconds"]["read"] > 0 and r["cpu_seconds"]["fit"] > 0
        assert {"read", "split+order", "deal", "fit"} <= set(r["store_peak"]), r["store_peak"]
        assert r["store_peak"]["read"] >= r["facts"]["token_bytes"], "the read's rows are in the store"
        assert r["driver_vmhwm"] > 100 * 2**20
    analysis = result["analysis"]
    one = dict.fromkeys(("read", "split+order", "load_data", "deal"), 1.0)
    assert analysis["time_per_pair_ratio_largest_over_smallest"] == one
    assert analysis["driver_growth_bytes_per_added_pair"] is None  # one size: nothing added
    assert set(analysis["meets"]) == {
        "store_peak",
        "store_while_training",
        "time_per_pair_flat",
        "cpu_per_pair_flat",
    }
