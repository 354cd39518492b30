"""Data stage benchmark: rows/s of `read_preferences` (tokenize + validate + truncate + account, on a
local Ray with 1 and with 2 CPUs) against a plain single-process pyarrow loop applying the same rules, on the real
1,812-row HH-RLHF file and on generated HH-shaped files of 2k, 20k and 200k pairs; where Ray's ratio crosses 1
and 0.8. Also the padded-token fraction at batch size 8 before/after `bucket_by_length` on the HH file.

    python benchmarks/data.py [--sizes 2000 20000 200000] [--repeats 3] [--out-dir DIR] [--out PATH] [--smoke]

Generated files: rows of data/hh_rlhf/hh_rlhf_harmless_train_1812.parquet resampled with replacement (seed 0),
each text rotated by a random character offset, so rows are distinct while lengths, bytes and the file's
whitespace-only responses (dropped as bad rows) keep the sample's distribution. Written with pyarrow's default
layout (one row group up to 1Mi rows: what `pq.write_table` gives) and, for the largest size, also in row groups
of 10,000 rows (many-row-group files, e.g. written in batches).

The baseline is the loop a user who cares about speed would write: `ParquetFile.iter_batches` through the SAME
vectorised rules (`ray_dpo.stages.data.read._process`, numpy + pyarrow), bad rows filtered, batches concatenated
into one table. It is the harder baseline: the row-at-a-time Python loop (also timed, on the 1,812-row file) is 2-4x
slower even with the byte tokenizer, so beating it would say little about Ray's overhead.

Each Ray instance (num_cpus=1, then num_cpus=2) is started fresh; its start-up (ray.init, then the first call,
which starts a worker and imports there) is reported separately and excluded from the rows/s. Then per file: one
untimed warm-up (which also checks that Ray's rows and counts equal the baseline's), then `--repeats` rounds of
(baseline, Ray) interleaved, alternating which goes first. Ray/plain is the median of the per-round ratios
(same-run ratios survive a shared machine's drift); scaling 2 CPUs/1 CPU divides the two instances' ratios.
rows/s counts input rows.

A shared machine hides what Ray's second CPU could do, so three more figures come with each row: the CPU model
and load average; CPU-s plain/Ray, the CPU-seconds of the baseline over those of Ray (driver, GCS, raylet and
workers together: 1 = Ray adds no work, and on N idle CPUs Ray/plain approaches N x this); and the cores other
jobs kept busy during the Ray runs (/proc/stat minus ours): with 2 CPUs and one core taken by others, Ray's
second worker has nothing to run on. Ray workers run at nice 0 like the baseline (see RAY_worker_niceness below).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, load_average, print_table, summarize, write_json  # noqa: E402

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray starts its workers at nice 15, the baseline runs at nice 0: on a machine shared with busy jobs the workers then
# get a fraction of the CPU the baseline gets, which measures the OS scheduler, not the stage (on an idle machine
# niceness changes nothing). Equal terms by default; RAY_worker_niceness=15 measures Ray's default.
os.environ.setdefault("RAY_worker_niceness", "0")
HH_TRAIN = Path(__file__).resolve().parents[1] / "data" / "hh_rlhf" / "hh_rlhf_harmless_train_1812.parquet"
MAX_LEN, MAX_PROMPT_LEN = 512, 256
FIELDS = ("prompt", "chosen", "rejected")
MANY_GROUPS_ROWS = 10_000  # row-group size of the second layout of the largest file
MIN_CPU_S = 0.5  # below this, CPU-second figures are clock-tick noise (10 ms per process)
OBJECT_STORE_BYTES = 2 << 30  # holds the 200k file's ~0.4 GB of token rows with room to spare: no spilling


# ------------------------------------------------------------------------------------------------ inputs


def generate(rows: int, path: Path, *, row_group_rows: int | None = None, seed: int = 0) -> Path:
    """An HH-shaped file of `rows` pairs: the sample's rows resampled, each text rotated by a random offset."""
    source = pq.read_table(HH_TRAIN, columns=list(FIELDS))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, source.num_rows, rows)
    columns = {}
    for name in FIELDS:
        texts = source[name].to_pylist()
        cuts = rng.random(rows)
        columns[name] = [
            texts[i][int(c * len(texts[i])) :] + texts[i][: int(c * len(texts[i]))]
            for i, c in zip(picks, cuts, strict=True)
        ]
    pq.write_table(pa.table(columns), path, row_group_size=row_group_rows)
    return path


def machine_busy_seconds() -> float | None:
    """CPU time every process on the machine has used (/proc/stat, Linux); None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU time used so far by this process and every process it started (Ray's GCS, raylet, workers): the work
    done, however long it waited for a CPU on a shared machine."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        # children_*: children that exited and were waited for (a Ray helper process that ended meanwhile)
        total += times.user + times.system + times.children_user + times.children_system
    return total


# ------------------------------------------------------------------------------------------------ the two paths


def _encoding(tokenizer):
    from ray_dpo.core.encoding import Encoding

    return Encoding(tokenizer, max_len=MAX_LEN, max_prompt_len=MAX_PROMPT_LEN)


def plain_loop(path: Path, tokenizer) -> tuple[pa.Table, np.ndarray]:
    """One process, no Ray: pyarrow batches through the same vectorised rules -> (token rows, rows per status)."""
    from ray_dpo.stages.data.read import _MAP_BATCH_SIZE, _STATUS, REASONS, _process

    names, encoding = {f: f for f in FIELDS}, _encoding(tokenizer)
    counts = np.zeros(2 + len(REASONS), dtype=np.int64)
    parts = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_MAP_BATCH_SIZE, columns=list(FIELDS)):
        done = _process(pa.Table.from_batches([batch]), names=names, encoding=encoding)
        counts += np.bincount(done.status.astype(np.int64), minlength=len(counts))
        parts.append(done.table.filter(pa.array(done.status < 2)).drop_columns([_STATUS]))
    return pa.concat_tables(parts), counts


def python_rows_loop(path: Path, tokenizer) -> int:
    """The row-at-a-time loop (same rules, byte tokenizer): what a first draft looks like. Returns rows kept."""
    table = pq.read_table(path, columns=list(FIELDS))
    kept = []
    for prompt, chosen, rejected in zip(*(table[c].to_pylist() for c in FIELDS), strict=True):
        if prompt is None or chosen is None or rejected is None:
            continue
        if not chosen.strip() or not rejected.strip() or chosen == rejected:
            continue
        p = [tokenizer.bos_id, *tokenizer.encode(prompt)]
        c = [*tokenizer.encode(chosen), tokenizer.eos_id]
        r = [*tokenizer.encode(rejected), tokenizer.eos_id]
        if len(p) + max(len(c), len(r)) > MAX_LEN:
            if len(p) > MAX_PROMPT_LEN:
                p = [p[0], *p[len(p) - MAX_PROMPT_LEN + 1 :]]
            room = MAX_LEN - len(p)
            if room <= 0:
                continue
            c, r = c[:room], r[:room]
            if c == r:
                continue
        kept.append((np.array(p, np.int32), np.array(c, np.int32), np.array(r, np.int32)))
    return len(kept)


def ray_read(path: Path, tokenizer):
    from ray_dpo.stages.data import read_preferences

    return read_preferences(path, encoding=_encoding(tokenizer), on_bad_row="skip")


def check_same(path: Path, tokenizer) -> None:
    """Ray's rows and accounting equal the baseline's (content compared for files up to 20k rows)."""
    import ray

    from ray_dpo.stages.data.read import REASONS

    table, counts = plain_loop(path, tokenizer)
    ds, stats = ray_read(path, tokenizer)
    assert stats.rows_out == table.num_rows and stats.truncated == counts[1], (path, stats, counts)
    assert [stats.dropped[r] for r in REASONS] == counts[2:].tolist(), (path, stats.dropped, counts)
    if table.num_rows <= 20_000:
        got = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        assert got.combine_chunks().equals(table.combine_chunks()), f"{path}: Ray's rows differ from the baseline's"


def padded_fraction(ds, batch_size: int = 8) -> float:
    """Share of the (B, N) chosen + rejected tensors that is padding, batches as iter_torch_batches forms them."""
    padded = total = 0
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        p, c, r = (np.array([len(x) for x in b[k]]) for k in FIELDS)
        lengths = np.concatenate([p + c, p + r])
        total += int(lengths.max()) * len(lengths)
        padded += int(lengths.max()) * len(lengths) - int(lengths.sum())
    return padded / total


def padding(tokenizer, windows: tuple[int, ...]) -> dict[str, float]:
    """Padded fraction at batch size 8 on the HH train file: file order vs `bucket_by_length` windows."""
    from ray_dpo.stages.data import bucket_by_length

    ds, _ = ray_read(HH_TRAIN, tokenizer)
    out = {"file order": padded_fraction(ds)}
    for window in windows:
        out[f"bucketed window={window}"] = padded_fraction(bucket_by_length(ds, window=window, seed=0))
    return out


# ------------------------------------------------------------------------------------------------ measuring


def measure(path: Path, tokenizer, repeats: int) -> dict:
    """Interleaved rounds of (plain, Ray); Ray's dataset is dropped after each round so the store stays empty."""
    check_same(path, tokenizer)  # also the warm-up
    wall: dict[str, list[float]] = {"plain": [], "ray": []}
    cpu: dict[str, list[float]] = {"plain": [], "ray": []}
    others: dict[str, list[float]] = {"plain": [], "ray": []}  # cores other jobs kept busy meanwhile
    for round_ in range(repeats):
        for which in ("plain", "ray") if round_ % 2 == 0 else ("ray", "plain"):
            machine_start, cpu_start, start = machine_busy_seconds(), cpu_seconds(), time.perf_counter()
            result = plain_loop(path, tokenizer) if which == "plain" else ray_read(path, tokenizer)
            wall[which].append(time.perf_counter() - start)
            cpu[which].append(cpu_seconds() - cpu_start)
            if machine_start is not None and wall[which][-1] >= MIN_CPU_S:  # else clock-tick noise
                others[which].append((machine_busy_seconds() - machine_start - cpu[which][-1]) / wall[which][-1])
            del result
    rows = pq.ParquetFile(path).metadata.num_rows
    out = {}
    for which in ("plain", "ray"):
        out[which] = {
            **summarize(wall[which]),
            "rows_per_s": rows / statistics.median(wall[which]),
            "cpu_s": statistics.median(cpu[which]),
            "other_jobs_cores": statistics.median(others[which]) if others[which] else None,
        }
    ratios = [p / r for p, r in zip(wall["plain"], wall["ray"], strict=True)]  # Ray rows/s over plain's, per round
    out["ray_over_plain"] = statistics.median(ratios)
    out["ray_over_plain_rounds"] = ratios
    # plain's CPU-seconds over Ray's: 1 = Ray adds no work; Ray's wall-clock ratio on N idle CPUs is at most N x this.
    # CPU times tick in 10 ms per process: meaningless for runs of a few ticks.
    efficiency = statistics.median([p / r for p, r in zip(cpu["plain"], cpu["ray"], strict=True)])
    out["cpu_efficiency"] = efficiency if out["plain"]["cpu_s"] >= MIN_CPU_S else None
    return out


def run_instance(
    cpus: int, files: list[dict], tokenizer, repeats: int, *, idle_s: float, windows: tuple[int, ...] | None
) -> dict:
    """A fresh local Ray with `cpus` CPUs: start-up, every file, and the padding figures (unless `windows` is None)."""
    import ray

    start = time.perf_counter()
    ray.init(
        address="local",  # never join another Ray running on this machine (a test session's, say)
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=OBJECT_STORE_BYTES,
        _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),  # short: Ray's socket paths are length-limited
    )
    init_s = time.perf_counter() - start
    results = []
    try:
        start = time.perf_counter()
        ray_read(HH_TRAIN, tokenizer)  # cold: starts a worker, imports ray_dpo.stages.data (torch, Ray Data) there
        startup = {"ray_init_s": init_s, "first_call_s": time.perf_counter() - start}
        cpu_start = cpu_seconds()
        time.sleep(idle_s)
        startup["idle_cpu_per_s"] = (cpu_seconds() - cpu_start) / idle_s  # Ray's background work, in every figure
        for f in files:
            load_before = load_average()
            result = measure(Path(f["path"]), tokenizer, repeats)
            results.append({"file": f["name"], "rows": f["rows"], "cpus": cpus, **result, "loadavg": load_before})
            print(
                f"  cpus={cpus} {f['name']}: plain {result['plain']['rows_per_s']:,.0f} rows/s, "
                f"ray {result['ray']['rows_per_s']:,.0f} rows/s, ray/plain {result['ray_over_plain']:.2f}, "
                f"CPU-s plain/ray {result['cpu_efficiency'] or float('nan'):.2f} (load {load_before[0]})",
                flush=True,
            )
        padded = None if windows is None else padding(tokenizer, windows)
    finally:
        ray.shutdown()
    return {"startup": startup, "results": results, "padded_fraction": padded}


def crossover(sizes: list[int], ratios: list[float], target: float) -> dict:
    """Rows where Ray/plain reaches `target`, interpolated in log(rows) between the measured sizes."""
    for (n0, r0), (n1, r1) in itertools.pairwise(zip(sizes, ratios, strict=True)):
        if r0 < target <= r1:
            t = (target - r0) / (r1 - r0)
            return {"rows": round(float(np.exp(np.log(n0) + t * (np.log(n1) - np.log(n0))))), "bracket": [n0, n1]}
    if ratios and ratios[0] >= target:
        return {"rows": None, "note": f"already >= {target} at the smallest size ({sizes[0]} rows)"}
    return {"rows": None, "note": f"below {target} up to the largest size ({sizes[-1]} rows)"}


def fixed_cost(sizes: list[int], seconds: list[float]) -> dict:
    """Least squares seconds = fixed + rows / throughput over the generated sizes."""
    if len(set(sizes)) < 2:
        return {"fixed_s": None, "rows_per_s": None}
    slope, intercept = np.polyfit(np.array(sizes, float), np.array(seconds, float), 1)
    return {"fixed_s": float(intercept), "rows_per_s": float(1 / slope) if slope > 0 else None}


def generate_files(sizes: list[int], out_dir: Path) -> list[dict]:
    """The real file, one generated file per size (pyarrow's default layout) and the largest in many row groups."""
    files = [{"name": HH_TRAIN.stem, "path": HH_TRAIN, "generated": False}]
    for n in sizes:
        files.append({"name": f"hh_{n}", "path": generate(n, out_dir / f"hh_{n}.parquet"), "generated": True})
    group_rows = min(MANY_GROUPS_ROWS, sizes[-1] // 4)  # at least 4 row groups, also in the smoke test
    many = f"hh_{sizes[-1]}_rg{group_rows}"
    path = generate(sizes[-1], out_dir / f"{many}.parquet", row_group_rows=group_rows)
    files.append({"name": many, "path": path, "generated": True})
    for f in files:
        meta = pq.ParquetFile(f["path"]).metadata
        f.update(path=str(f["path"]), rows=meta.num_rows, row_groups=meta.num_row_groups)
        f["bytes"] = os.path.getsize(f["path"])
    return files


def analyse(results: list[dict], files: list[dict], sizes: list[int], cpu_counts: list[int]) -> dict:
    """Scaling 2 CPUs / 1 CPU per file, the crossover sizes and a linear fit (fixed cost) per CPU count."""

    def ratio(name: str, cpus: int) -> float | None:
        return next((r["ray_over_plain"] for r in results if r["file"] == name and r["cpus"] == cpus), None)

    scaling = {}
    if 1 in cpu_counts and 2 in cpu_counts:
        scaling = {f["name"]: ratio(f["name"], 2) / ratio(f["name"], 1) for f in files}
    generated = [f"hh_{n}" for n in sizes]
    crossovers, fits = {}, {}
    for cpus in cpu_counts:
        crossovers[f"cpus={cpus}"] = {
            str(t): crossover(sizes, [ratio(name, cpus) for name in generated], t) for t in (0.8, 1.0)
        }
        rows = [r for r in results if r["cpus"] == cpus and r["file"] in generated]
        fits[f"cpus={cpus}"] = {
            which: fixed_cost([r["rows"] for r in rows], [r[which]["median_s"] for r in rows])
            for which in ("ray", "plain")
        }
    return {"scaling_2_over_1_cpus": scaling, "crossover": crossovers, "linear_fit": fits}


def report(result: dict) -> None:
    env, scaling = result["env"], result["scaling_2_over_1_cpus"]
    table = [
        {
            "file": r["file"],
            "rows": r["rows"],
            "cpus": r["cpus"],
            "plain": r["plain"]["rows_per_s"],
            "ray": r["ray"]["rows_per_s"],
            "ray_s": r["ray"]["median_s"],
            "ratio": r["ray_over_plain"],
            "scaling": scaling.get(r["file"]) if r["cpus"] == 2 else None,
            "efficiency": r["cpu_efficiency"],
            "others": r["ray"]["other_jobs_cores"],
            "load": r["loadavg"][0],
        }
        for r in result["results"]
    ]
    columns = [
        ("file", "file", ""),
        ("rows", "rows", ","),
        ("cpus", "Ray CPUs", "d"),
        ("plain", "plain rows/s", ",.0f"),
        ("ray", "Ray rows/s", ",.0f"),
        ("ray_s", "Ray median s", ".3f"),
        ("ratio", "Ray/plain", ".2f"),
        ("scaling", "2 CPU/1 CPU", ".2f"),
        ("efficiency", "CPU-s plain/Ray", ".2f"),
        ("others", "other jobs' cores", ".1f"),
        ("load", "load 1 min", ".1f"),
    ]
    title = f"read_preferences vs the plain pyarrow loop ({env['cpu_model']}, max_len={MAX_LEN})"
    print_table(title, table, columns)
    print()
    for cpus, s in result["startup"].items():
        print(
            f"start-up, {cpus} CPU(s): ray.init {s['ray_init_s']:.2f} s, first call {s['first_call_s']:.2f} s; "
            f"idle Ray uses {s['idle_cpu_per_s']:.3f} CPU-s/s"
        )
    for key, by_target in result["crossover"].items():
        for target, c in by_target.items():
            where = (
                f"~{c['rows']:,} rows (between {c['bracket'][0]:,} and {c['bracket'][1]:,})" if c["rows"] else c["note"]
            )
            print(f"crossover {key}, Ray/plain = {target}: {where}")
    for key, fit in result["linear_fit"].items():
        if fit["ray"]["fixed_s"] is not None:
            print(f"linear fit {key}: Ray fixed {fit['ray']['fixed_s']:.3f} s, plain {fit['plain']['fixed_s']:.3f} s")
    loop = result["python_rows_loop"]
    print(
        f"row-at-a-time Python loop on {loop['file']}: {loop['rows_per_s']:,.0f} rows/s; the vectorised baseline "
        f"is {loop['baseline_speedup']:.1f}x faster"
    )
    padded = ", ".join(f"{k} {v:.3f}" for k, v in result["padded_fraction_batch_8"].items())
    print(f"padded fraction at batch size 8 on {HH_TRAIN.stem}: {padded}")
    print(f"load average: start {env['loadavg_start']}, end {env['loadavg_end']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000, 200_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out-dir", help="where the generated files go (default: a temporary directory)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.repeats = [2_000], 1
    sizes = sorted(args.sizes)

    from ray_dpo.core.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    env = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_average(),
        "python": platform.python_version(),
        "ray": __import__("ray").__version__,
        "pyarrow": pa.__version__,
        "numpy": np.__version__,
    }
    print(f"CPU: {env['cpu_model']}, load average {env['loadavg_start']}", flush=True)

    with tempfile.TemporaryDirectory(prefix="rdpo-data-") as tmp:
        out_dir = Path(args.out_dir or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        files = generate_files(sizes, out_dir)
        print(f"generated {len(files) - 1} files in {time.perf_counter() - start:.1f} s under {out_dir}", flush=True)

        python_s = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            python_rows = python_rows_loop(HH_TRAIN, tokenizer)
            python_s.append(time.perf_counter() - start)
        assert python_rows == plain_loop(HH_TRAIN, tokenizer)[0].num_rows, "the two baselines disagree"
        startup, results = {}, []
        for cpus in args.cpus:
            # Padding once, in the last instance. Smoke: a short idle sample and one bucketing window (a Ray Data
            # sort costs seconds even on 1.8k rows).
            windows = ((64,) if args.smoke else (64, 256, 1024)) if cpus == args.cpus[-1] else None
            instance = run_instance(
                cpus, files, tokenizer, args.repeats, idle_s=0.2 if args.smoke else 2.0, windows=windows
            )
            startup[str(cpus)] = instance["startup"]
            results.extend(instance["results"])
    env["loadavg_end"] = load_average()

    plain_1812 = statistics.median([r["plain"]["median_s"] for r in results if r["file"] == HH_TRAIN.stem])
    result = {
        "benchmark": "data",
        "smoke": args.smoke,
        "env": env,
        "settings": {
            "max_len": MAX_LEN,
            "max_prompt_len": MAX_PROMPT_LEN,
            "on_bad_row": "skip",
            "repeats": args.repeats,
            "cpus": args.cpus,
            "ray_worker_niceness": int(os.environ["RAY_worker_niceness"]),
            "baseline": "one process: ParquetFile.iter_batches through data.read._process (same vectorised rules)",
        },
        "files": files,
        "startup": startup,
        "results": results,
        **analyse(results, files, sizes, args.cpus),
        "padded_fraction_batch_8": instance["padded_fraction"],
        "python_rows_loop": {
            "file": HH_TRAIN.stem,
            **summarize(python_s),
            "rows_per_s": files[0]["rows"] / statistics.median(python_s),
            "rows_kept": python_rows,
            "baseline_speedup": statistics.median(python_s) / plain_1812,  # how much faster the vectorised loop is
        },
    }
    report(result)
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
