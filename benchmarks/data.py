"""Data stage benchmark: rows/s to tokenize + truncate + pad the HH train file, Ray Data vs a plain
single-process pyarrow loop, and the padded-token fraction at batch size 8 before/after length bucketing.

    python benchmarks/data.py [--repeats 5] [--out benchmarks/results/data.json]

Medians over repeats (the machine is shared and noisy). Ray time includes scheduling, validation, row
accounting and materialization, i.e. what `read_preferences` really costs a pipeline; not Ray start-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
HH_TRAIN = Path(__file__).resolve().parents[1] / "data" / "hh_rlhf" / "hh_rlhf_harmless_train_1812.parquet"
MAX_LEN, MAX_PROMPT_LEN, BATCH = 512, 256, 8


def plain_loop(path: Path, tokenizer) -> int:
    """The baseline a user would write: one process, one row at a time, same rules, same padding."""
    table = pq.read_table(path)
    rows = []
    for prompt, chosen, rejected in zip(*(table[c].to_pylist() for c in ("prompt", "chosen", "rejected")), strict=True):
        if not chosen.strip() or not rejected.strip() or chosen == rejected:
            continue
        p = [tokenizer.bos_id, *tokenizer.encode(prompt)]
        c = [*tokenizer.encode(chosen), tokenizer.eos_id]
        r = [*tokenizer.encode(rejected), tokenizer.eos_id]
        if len(p) + max(len(c), len(r)) > MAX_LEN:
            if len(p) > MAX_PROMPT_LEN:
                p = [tokenizer.bos_id, *p[len(p) - MAX_PROMPT_LEN + 1 :]]
            c, r = c[: MAX_LEN - len(p)], r[: MAX_LEN - len(p)]
        rows.append((p + c, p + r))
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        width = max(max(len(c), len(r)) for c, r in batch)
        padded = np.full((2, len(batch), width), tokenizer.pad_id, dtype=np.int64)
        for i, (c, r) in enumerate(batch):
            padded[0, i, : len(c)] = c
            padded[1, i, : len(r)] = r
    return len(rows)


def ray_pipeline(path: Path, tokenizer) -> int:
    from ray_dpo.data import PreferenceCollateFn, read_preferences

    ds, stats = read_preferences(
        path, tokenizer=tokenizer, max_len=MAX_LEN, max_prompt_len=MAX_PROMPT_LEN, on_bad_row="skip"
    )
    n = 0
    for batch in ds.iter_torch_batches(batch_size=BATCH, collate_fn=PreferenceCollateFn(tokenizer.pad_id)):
        n += len(batch["prompt_len"])
    assert n == stats.rows_out
    return n


def padded_fraction(ds, batch_size: int = BATCH) -> float:
    """Share of the (B, N) chosen+rejected tensors that is padding, batches as iter_torch_batches forms them."""
    padded = total = 0
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        p, c, r = (np.array([len(x) for x in b[k]]) for k in ("prompt", "chosen", "rejected"))
        lens = np.concatenate([p + c, p + r])
        total += int(lens.max()) * len(lens)
        padded += int(lens.max()) * len(lens) - int(lens.sum())
    return padded / total


def timed(fn, repeats: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    args = parser.parse_args()

    import ray

    from ray_dpo.data import bucket_by_length, read_preferences
    from ray_dpo.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=500 * 1024**2)
    ray_pipeline(HH_TRAIN, tokenizer)  # warm up workers and imports
    plain_s, plain_rows = timed(functools.partial(plain_loop, HH_TRAIN, tokenizer), args.repeats)
    ray_s, ray_rows = timed(functools.partial(ray_pipeline, HH_TRAIN, tokenizer), args.repeats)
    assert plain_rows == ray_rows, (plain_rows, ray_rows)

    ds, _ = read_preferences(
        HH_TRAIN, tokenizer=tokenizer, max_len=MAX_LEN, max_prompt_len=MAX_PROMPT_LEN, on_bad_row="skip"
    )
    padding = {"file order": padded_fraction(ds)}
    for window in (64, 256, 1024):
        padding[f"bucketed window={window}"] = padded_fraction(bucket_by_length(ds, window=window, seed=0))
    ray.shutdown()

    result = {
        "file": HH_TRAIN.name,
        "rows": ray_rows,
        "max_len": MAX_LEN,
        "max_prompt_len": MAX_PROMPT_LEN,
        "batch_size": BATCH,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "plain_pyarrow_loop": {"median_s": plain_s, "rows_per_s": plain_rows / plain_s},
        "ray_data": {"median_s": ray_s, "rows_per_s": ray_rows / ray_s},
        "ray_over_plain": (ray_rows / ray_s) / (plain_rows / plain_s),
        "padded_fraction": padding,
    }
    print(f"{'path':<28}{'median s':>10}{'rows/s':>12}")
    for name in ("plain_pyarrow_loop", "ray_data"):
        print(f"{name:<28}{result[name]['median_s']:>10.3f}{result[name]['rows_per_s']:>12.0f}")
    print(f"ray / plain rows/s: {result['ray_over_plain']:.2f}")
    print(f"\n{'order (batch size 8)':<28}{'padded fraction':>16}")
    for name, value in padding.items():
        print(f"{name:<28}{value:>16.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
