"""The benchmark scripts run in a seconds-long smoke mode, so they cannot rot unnoticed."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
