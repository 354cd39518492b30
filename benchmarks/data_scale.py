"""Data at scale: the real align pipeline (read -> split -> order -> deal -> a few training steps on 2 workers) on
generated HH-shaped files of 100k and 1M pairs; the driver's peak memory, the object store's peak use per stage
against the token bytes of the data, and the time per pair of each data stage.

    python benchmarks/data_scale.py [--sizes 100000 1000000] [--steps 3] [--object-store-gb 6] [--out PATH]
    python benchmarks/data_scale.py --smoke --out /tmp/data_scale.json      # 4k pairs, 1 step (CI)
    python benchmarks/data_scale.py --sizes 100000 --code-root /tmp/before  # the same run on another checkout

Files: `benchmarks/data.py`'s generator (rows of the repository's HH-RLHF sample resampled, each text rotated), in
row groups of 50,000 rows, written in a child process under a temporary directory and deleted after the run:
never committed. Byte tokenizer, data.max_len 512 (prompt <= 256), `on_bad_row=skip` (the sample's whitespace-only
responses are dropped and counted).

Each size runs in a fresh child process, the driver: `ray.init(num_cpus=2, object_store_memory=...)` of its own,
then `open_run` + `ray_dpo.recipe.stages.align` (configs/tiny.yaml: a 1-layer TransformerLM, model.max_seq_len 512,
2 DDP workers, `train.max_steps` steps, validation on 64 pairs at the end, evaluation off, nothing registered). The
stages are timed by wrapping, in the child, the functions `align` calls (`load_data`, `starting_weights`,
`train_and_evaluate`, `publish`, and inside them `read_preferences` and the train driver's `deal`): each wrapper
sets the current stage's name and calls the real function. "split+order" is `load_data` minus the read.

Measured in the child:
- object store: a thread polls the raylet's store stats every 0.2 s (`ray._private.internal_api.
  get_memory_info_reply(...).store_stats.object_store_bytes_used`, what `ray memory --stats-only` prints; Ray 2.60)
  and keeps the peak per stage, plus the level when each stage ends (what it left alive). Spilled bytes are
  reported too (a spilled copy is a copy, but no longer in the store).
- token bytes: the int32 values of the token columns of the read's output (4 bytes a token), summed by a task per
  block right after the read (not timed).
- driver memory: VmHWM of /proc/self/status at the end (the process's peak resident memory) and the peak VmRSS
  per stage from the same poll.
- CPU-seconds per stage of the driver and every process it started (the local Ray: raylet, GCS, workers), from the
  same poll, per process (a worker that exits keeps what it used): the work done, which a machine shared with busy
  jobs stretches far less than wall time.

Reported: per size, time and CPU-seconds per pair of read, split+order, load_data (both) and deal, and the fit's
wall time (Train start-up and a fixed number of steps: not per pair); the store's peak per stage and its median
level while training over the token bytes; the driver's VmHWM, and from the smallest to the largest size its growth
per added pair. Targets, at the largest size: the store's peak <= 1.5x the token bytes at every stage and its median
level while training <= 1.15x (the dealt shards and the validation split); the driver's growth per pair small (tens
of bytes: the split's 12-byte keys per row and what the driver derives from them are its only per-row data); time
per pair of each data stage at most 20% above the smallest size's (fixed costs make small sizes slower per pair).
Ray frees dropped objects in batches every second (`free_objects_period_milliseconds`), so a copy just dropped
lingers up to 1 s: on a small file that is most of a stage, and its peaks read high.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, load_average, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
ROW_GROUP_ROWS = 50_000
POLL_S = 0.2
TARGETS = {"store_over_token_bytes": 1.5, "store_while_training": 1.15, "time_per_pair_ratio": 1.2}
DATA_STAGES = ("read", "split+order", "load_data", "deal")


# ------------------------------------------------------------------------------------------------ the child


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class StorePoller(threading.Thread):
    """Peak object-store use, driver VmRSS and CPU-seconds per stage name, polled every POLL_S seconds."""

    def __init__(self, gcs_address: str):
        super().__init__(daemon=True)
        from ray._private.internal_api import get_state_from_address

        self.state = get_state_from_address(gcs_address)
        self.stage = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self.levels: dict[str, list[int]] = {}  # every sample per stage: its median is the level the stage holds
        self.ends: dict[str, int] = {}
        self.spilled = 0
        self.cpu: dict[str, float] = {}
        self._cpu_seen: dict[int, float] = {}  # pid -> its CPU-seconds at the last sample
        self._lock = threading.Lock()  # the main thread samples at stage changes, this one in between
        self._halt = threading.Event()

    def store(self) -> tuple[int, int]:
        from ray._private.internal_api import get_memory_info_reply

        stats = get_memory_info_reply(self.state).store_stats
        return stats.object_store_bytes_used, stats.spilled_bytes_total

    def sample(self) -> int:
        with self._lock:
            used, spilled = self.store()
            self.spilled = max(self.spilled, spilled)
            peak = self.peaks.setdefault(self.stage, {"store": 0, "rss": 0})
            peak["store"] = max(peak["store"], used)
            peak["rss"] = max(peak["rss"], _status_kb("VmRSS") * 1024)
            self.levels.setdefault(self.stage, []).append(used)
            self.cpu[self.stage] = self.cpu.get(self.stage, 0.0) + self._cpu_since_last()
            return used

    def _cpu_since_last(self) -> float:
        """CPU-seconds this process and every process it started (the local Ray's raylet, GCS and workers) used
        since the last sample: the work done, however long it waited for a CPU on a shared machine. Per process,
        so a worker that exits keeps what it used up to its last sample (Ray reaps workers without accounting:
        a parent's `children_user` misses them)."""
        import psutil

        me = psutil.Process()
        spent = 0.0
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:  # exited meanwhile
                continue
            total = times.user + times.system
            spent += total - self._cpu_seen.get(proc.pid, 0.0)
            self._cpu_seen[proc.pid] = total
        return spent

    def enter(self, stage: str) -> None:
        self.ends[self.stage] = self.sample()  # what the stage that ends left alive
        self.stage = stage
        self.sample()

    def run(self) -> None:
        while not self._halt.wait(POLL_S):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()


@functools.cache
def _token_bytes_task():
    import ray

    @ray.remote(num_cpus=0.25)
    def token_bytes(table) -> int:
        import pyarrow as pa

        return sum(
            table[name].combine_chunks().values.nbytes
            for name in table.column_names
            if pa.types.is_list(table.schema.field(name).type)
        )

    return token_bytes


def drive(args: argparse.Namespace) -> None:
    """One size, in this process: the driver whose memory is measured."""
    import ray

    import ray_dpo.stages.data as data_stage
    from ray_dpo.config import load_config
    from ray_dpo.recipe import stages
    from ray_dpo.recipe.console import Console
    from ray_dpo.recipe.run import open_run
    from ray_dpo.stages.train import driver

    for attempt in range(3):
        try:
            ray.init(
                address="local",  # never join another Ray running on this machine
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=int(args.object_store_gb * 2**30),
                _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),  # short: Ray's socket paths are length-limited
            )
            break
        except Exception as err:  # the local raylet gets a fixed 30 s to register: a loaded machine misses it
            if "timed out during startup" not in str(err) or attempt == 2:
                raise
            ray.shutdown()
    poller = StorePoller(ray.get_runtime_context().gcs_address)
    poller.sample()
    poller.start()
    seconds: dict[str, float] = {}
    facts: dict[str, int] = {}

    def timed(name: str, fn, after: str | None = None):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            outer = poller.stage
            poller.enter(name)
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
                poller.enter(after or outer)

        return wrapper

    read = data_stage.read_preferences

    def read_and_count(*a, **kw):
        ds, stats = timed("read", read, after="split+order")(*a, **kw)
        if "token_bytes" not in facts:  # the training file, read first
            poller.enter("count")
            start = time.perf_counter()
            refs = ds.to_arrow_refs()
            facts["token_bytes"] = sum(ray.get([_token_bytes_task().remote(ref) for ref in refs]))
            facts["rows_in"], facts["rows_out"] = stats.rows_in, stats.rows_out
            del refs
            seconds["not_timed"] = time.perf_counter() - start  # inside load_data's time: taken out below
            poller.enter("split+order")
        return ds, stats

    data_stage.read_preferences = read_and_count
    stages.load_data = timed("load_data", stages.load_data, after="between")
    stages.starting_weights = timed("weights", stages.starting_weights, after="between")
    stages.train_and_evaluate = timed("train", stages.train_and_evaluate, after="between")
    stages.publish = timed("publish", stages.publish, after="end")
    driver.deal = timed("deal", driver.deal, after="fit")  # then the workers train

    s = args.steps
    work = Path(args.work)
    overrides = [
        f"output_dir={work / 'out'}",
        f"train.storage_path={work / 'ray'}",
        f"train.run_name=scale-{args.rows}",
        "data.synthetic=null",
        f"data.train_path={args.drive}",
        "data.on_bad_row=skip",
        "data.max_len=512",
        "data.max_prompt_len=256",
        "model.max_seq_len=512",
        "sft.path=null",
        f"train.max_steps={s}",
        f"train.eval_every={s}",
        f"train.checkpoint_every={s}",
        "train.val_max_pairs=64",
        "train.max_failures=0",
        "eval.enabled=false",
        "tracking.registered_model=null",
    ]
    config = load_config(str(TINY), overrides)
    start = time.perf_counter()
    with open_run(config, console=Console(verbose=False)) as run:
        result = stages.align(run)
    total = time.perf_counter() - start
    poller.enter("end")
    poller.stop()
    seconds["load_data"] -= seconds.pop("not_timed")
    seconds["split+order"] = seconds["load_data"] - seconds["read"]
    cpu = dict(poller.cpu)  # per stage, exclusive: load_data's own is what it does around the read and the order
    cpu["load_data"] = sum(cpu.get(stage, 0.0) for stage in ("load_data", "read", "split+order"))
    out = {
        "rows": args.rows,
        "facts": facts,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "total_s": total,
        "steps": result.steps,
        "store_peak": {k: v["store"] for k, v in poller.peaks.items()},
        "store_at_end_of": poller.ends,
        "store_median": {k: statistics.median(v) for k, v in poller.levels.items()},
        "spilled_bytes": poller.spilled,
        "driver_rss_peak": {k: v["rss"] for k, v in poller.peaks.items()},
        "driver_vmhwm": _status_kb("VmHWM") * 1024,
    }
    Path(args.json).write_text(json.dumps(out))
    ray.shutdown()


# ------------------------------------------------------------------------------------------------ the parent


def generate_file(rows: int, path: Path) -> float:
    """`benchmarks/data.py`'s generator in a child process (its Python strings never enter this one)."""
    start = time.perf_counter()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from data import generate; "
        "generate(int(sys.argv[2]), Path(sys.argv[3]), row_group_rows=int(sys.argv[4]))"
    )
    here = str(Path(__file__).resolve().parent)
    subprocess.run([sys.executable, "-c", code, here, str(rows), str(path), str(ROW_GROUP_ROWS)], check=True)
    return time.perf_counter() - start


def run_size(rows: int, args: argparse.Namespace, work: Path) -> dict:
    path = work / f"hh_{rows}.parquet"
    generated_s = generate_file(rows, path)
    out = work / f"result_{rows}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    code_root = str(Path(args.code_root).resolve()) if args.code_root else str(REPO)
    env |= {"PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")]))}
    env |= {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    command = [sys.executable, str(Path(__file__).resolve()), "--drive", str(path), "--rows", str(rows)]
    command += ["--json", str(out), "--work", str(work / f"run_{rows}"), "--steps", str(args.steps)]
    command += ["--object-store-gb", str(args.object_store_gb)]
    load_before = load_average()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    path.unlink()
    facts = {"generated_s": generated_s, "load_before": load_before, "load_after": load_average()}
    if done.returncode != 0:  # reported, and the other sizes still run
        lines = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
        return {"rows": rows, "status": f"crashed: {(lines or ['exit ' + str(done.returncode)])[-1][:300]}", **facts}
    return {**json.loads(out.read_text()), "status": "ok", **facts}


def analyse(results: list[dict]) -> dict:
    """Per size: time per pair, the store's peak and median level per stage over token bytes; from the smallest to
    the largest size: time-per-pair ratios and the driver's growth per added pair; the targets at the largest size."""
    results = [r for r in results if r["status"] == "ok"]
    if not results:
        return {"per_size": [], "meets": {}}
    rows = []
    for r in results:
        token = r["facts"]["token_bytes"]
        rows.append(
            {
                "rows": r["rows"],
                "token_bytes": token,
                "us_per_pair": {stage: r["seconds"][stage] / r["rows"] * 1e6 for stage in DATA_STAGES},
                "cpu_us_per_pair": {stage: r["cpu_seconds"][stage] / r["rows"] * 1e6 for stage in DATA_STAGES},
                "store_peak_over_token_bytes": {k: v / token for k, v in r["store_peak"].items()},
                "store_median_over_token_bytes": {k: v / token for k, v in r["store_median"].items()},
                "driver_vmhwm": r["driver_vmhwm"],
            }
        )
    small, large = rows[0], rows[-1]
    added = large["rows"] - small["rows"]
    ratios = {stage: large["us_per_pair"][stage] / small["us_per_pair"][stage] for stage in DATA_STAGES}
    cpu_ratios = {stage: large["cpu_us_per_pair"][stage] / small["cpu_us_per_pair"][stage] for stage in DATA_STAGES}
    worst = max(large["store_peak_over_token_bytes"].values())
    training = large["store_median_over_token_bytes"].get("fit", float("nan"))
    growth = (large["driver_vmhwm"] - small["driver_vmhwm"]) / added if added else None
    return {
        "per_size": rows,
        "time_per_pair_ratio_largest_over_smallest": ratios,
        "cpu_per_pair_ratio_largest_over_smallest": cpu_ratios,
        "driver_growth_bytes_per_added_pair": growth,
        "largest": {"store_peak_over_token_bytes": worst, "store_while_training_over_token_bytes": training},
        "meets": {
            "store_peak": worst <= TARGETS["store_over_token_bytes"],
            "store_while_training": training <= TARGETS["store_while_training"],
            "time_per_pair_flat": all(v <= TARGETS["time_per_pair_ratio"] for v in ratios.values()),
            "cpu_per_pair_flat": all(v <= TARGETS["time_per_pair_ratio"] for v in cpu_ratios.values()),
        },
    }


def report(result: dict) -> None:
    stages = ("read", "split+order", "deal", "fit")
    table = []
    for r in result["results"]:
        if r["status"] != "ok":
            print(f"{r['rows']:,} pairs: {r['status']}")
    ok = [r for r in result["results"] if r["status"] == "ok"]
    for r, a in zip(ok, result["analysis"]["per_size"], strict=True):
        row = {"rows": r["rows"], "token_mb": a["token_bytes"] / 2**20, "hwm_mb": r["driver_vmhwm"] / 2**20}
        row |= {f"us_{k}": v for k, v in a["us_per_pair"].items()}
        row |= {f"cpu_{k}": v for k, v in a["cpu_us_per_pair"].items()}
        row |= {f"x_{k}": a["store_peak_over_token_bytes"].get(k) for k in stages}
        row |= {"fit_median": a["store_median_over_token_bytes"].get("fit")}
        row |= {"fit_s": r["seconds"]["train"] - r["seconds"]["deal"], "load": r["load_before"][0]}
        table.append(row)
    columns = [
        ("rows", "pairs", ","),
        ("token_mb", "token MiB", ",.0f"),
        ("hwm_mb", "driver VmHWM MiB", ",.0f"),
        ("us_read", "read us/pair", ".1f"),
        ("us_split+order", "split+order us/pair", ".1f"),
        ("us_deal", "deal us/pair", ".1f"),
        ("cpu_read", "read CPU-us/pair", ".1f"),
        ("cpu_split+order", "split+order CPU-us/pair", ".1f"),
        ("cpu_deal", "deal CPU-us/pair", ".1f"),
        *[(f"x_{k}", f"store peak/token {k}", ".2f") for k in stages],
        ("fit_median", "store median/token fit", ".2f"),
        ("fit_s", "fit s", ".1f"),
        ("load", "load 1 min", ".1f"),
    ]
    env = result["env"]
    print_table(f"read -> split -> order -> train, 2 workers ({env['cpu_model']})", table, columns)
    a = result["analysis"]
    if not ok:
        return
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in a["time_per_pair_ratio_largest_over_smallest"].items())
    print(f"\ntime per pair, largest / smallest size: {ratios}")
    cpu_ratios = ", ".join(f"{k} {v:.2f}" for k, v in a["cpu_per_pair_ratio_largest_over_smallest"].items())
    print(f"CPU-seconds per pair (driver and every Ray process), largest / smallest size: {cpu_ratios}")
    growth = a["driver_growth_bytes_per_added_pair"]
    if growth is not None:
        print(f"driver VmHWM growth: {growth:.1f} bytes per added pair")
    largest = a["largest"]
    print(
        f"largest size: store peak / token bytes {largest['store_peak_over_token_bytes']:.2f}, while training "
        f"{largest['store_while_training_over_token_bytes']:.2f} (median); meets: {a['meets']}"
    )
    print(f"load average: start {env['loadavg_start']}, end {env['loadavg_end']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--object-store-gb", type=float, default=6.0)
    parser.add_argument("--code-root", help="run the pipeline of another checkout (PYTHONPATH), e.g. a baseline")
    parser.add_argument("--work-dir", help="where files and runs go (default: a temporary directory, deleted)")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_scale.json"))
    parser.add_argument("--smoke", action="store_true", help="4k pairs, 1 step: a minute or two, for CI")
    parser.add_argument("--drive", help=argparse.SUPPRESS)  # child mode: the file to run the pipeline on
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args)
        return
    if args.smoke:
        args.sizes, args.steps, args.object_store_gb = [4_000], 1, 1.0  # one size: the comparison is plain arithmetic
    env = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_average(),
        "python": platform.python_version(),
        "ray": __import__("ray").__version__,
        "code_root": str(Path(args.code_root).resolve()) if args.code_root else str(REPO),
    }
    print(f"CPU: {env['cpu_model']}, load average {env['loadavg_start']}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="rdpo-scale-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for rows in sorted(args.sizes):
            results.append(run_size(rows, args, work))
            r = results[-1]
            done = f"{r['total_s']:.1f} s" if r["status"] == "ok" else r["status"]
            print(f"  {rows:,} pairs: {done}, load {r['load_before'][0]}", flush=True)
    env["loadavg_end"] = load_average()
    result = {
        "benchmark": "data_scale",
        "smoke": args.smoke,
        "env": env,
        "settings": {
            "steps": args.steps,
            "workers": 2,
            "object_store_gb": args.object_store_gb,
            "row_group_rows": ROW_GROUP_ROWS,
            "max_len": 512,
            "max_prompt_len": 256,
            "poll_s": POLL_S,
            "store_measure": "raylet store_stats.object_store_bytes_used (get_memory_info_reply), polled",
            "driver_measure": "VmHWM of /proc/self/status at the end; VmRSS per stage, polled",
            "targets": TARGETS,
        },
        "results": results,
        "analysis": analyse(results),
    }
    report(result)
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
