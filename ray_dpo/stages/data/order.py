"""Order and split of token rows: a seeded train/val split and length bucketing, both decided by a content hash of
each row (the same on a laptop and a cluster, whatever the block layout)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ray_dpo.core.encoding import Ragged, segment_sums
from ray_dpo.errors import UserError


def _token_columns(batch: pa.Table) -> list[str]:
    return [name for name in batch.column_names if pa.types.is_list(batch.schema.field(name).type)]


def _padded_length(batch: pa.Table) -> np.ndarray:
    """Per row: prompt + its longest response, the width the row occupies in a padded batch."""
    lengths = [pc.list_value_length(batch[name]).to_numpy(zero_copy_only=False) for name in _token_columns(batch)]
    prompt = lengths[_token_columns(batch).index("prompt")]
    responses = [x for name, x in zip(_token_columns(batch), lengths, strict=True) if name != "prompt"]
    return prompt + np.max(responses, axis=0)


def _row_hash(batch: pa.Table, seed: int, columns: list[str] | None = None) -> np.ndarray:
    """A uint64 per row from its token content (`columns`, default every token column) and `seed`: same row + same
    seed -> same value, on any cluster and block layout. Vectorised splitmix64 over tokens and positions, summed per
    row."""

    def mix(x: np.ndarray) -> np.ndarray:
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    s = np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    h = mix(np.full(batch.num_rows, s + np.uint64(0x9E3779B97F4A7C15), dtype=np.uint64))
    with np.errstate(over="ignore"):
        for salt, column in enumerate(columns or _token_columns(batch), start=1):
            arr = batch[column].combine_chunks()
            values = arr.flatten().to_numpy().astype(np.uint64)
            rows = Ragged.from_lengths(
                values, pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
            )
            pos = (np.arange(len(values), dtype=np.int64) - np.repeat(rows.offsets[:-1], rows.lengths)).astype(
                np.uint64
            )
            token_mix = mix(values * np.uint64(0x100000001B3) + pos * np.uint64(0x9E3779B97F4A7C15) + s)
            h = mix(h ^ mix(segment_sums(token_mix, rows.offsets) + np.uint64(salt) + rows.lengths.astype(np.uint64)))
    return h


def row_keys(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """A pair's identity: two independent 64-bit hashes of its prompt, chosen and rejected tokens (128 bits: the same
    key for the same tokens in any file, split or order, and practically never for other tokens)."""
    columns = ["prompt", "chosen", "rejected"]
    return _row_hash(batch, 0, columns), _row_hash(batch, 1, columns)


def split_train_val(
    dataset: ray.data.Dataset, val_fraction: float, seed: int
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Hold out `val_fraction` of the rows, deterministically by `seed`: (train, val), both materialized.

    A row's side depends only on its content and the seed (a hash), not on block layout or cluster size, so
    the split is the same on a laptop and a cluster, and duplicate rows never straddle train and val.
    Row order is kept inside each part (so a bucketed order survives). Val gets round(n * val_fraction) rows
    (at least 1), give or take exact duplicates at the cut.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    key = "_split_key"
    keyed = dataset.map_batches(
        lambda b: b.append_column(key, pa.array(_row_hash(b, seed))), batch_format="pyarrow", batch_size=None
    )
    keyed.context.execution_options.preserve_order = True
    keyed = keyed.materialize()
    keys = np.concatenate(
        [b[key] for b in keyed.select_columns([key]).iter_batches(batch_format="numpy", batch_size=None)]
    )
    n = len(keys)
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise UserError(f"val_fraction={val_fraction} leaves no training rows out of {n}")
    threshold = np.partition(keys, n_val - 1)[n_val - 1]

    def part(val: bool) -> ray.data.Dataset:
        def select(b: pa.Table) -> pa.Table:
            in_val = b[key].to_numpy() <= threshold
            return b.filter(pa.array(in_val if val else ~in_val)).drop_columns([key])

        ds = keyed.map_batches(select, batch_format="pyarrow", batch_size=None)
        ds.context.execution_options.preserve_order = True
        return ds.materialize()

    return part(False), part(True)


def bucket_by_length(dataset: ray.data.Dataset, window: int, *, seed: int = 0) -> ray.data.Dataset:
    """Length-aware order: rows are dealt into random windows of about `window` rows, sorted by padded length
    (prompt + the longer response) inside each window, and the windows come in random order.

    `iter_torch_batches` batches consecutive rows, so a batch then holds rows of similar length and pads
    little; batches are still not globally ordered by length. Deterministic by `seed` (a content hash, not
    Ray's block layout). Use a window of tens of batches. Returns a materialized dataset.
    """
    if window < 1:
        raise UserError(f"length bucket window must be >= 1, got {window}")
    n_windows = max(1, -(-dataset.count() // window))
    key = "_bucket_key"

    def add_key(b: pa.Table) -> pa.Table:
        return b.append_column(key, pa.array(bucket_sort_key(b, n_windows, seed)))

    ds = dataset.map_batches(add_key, batch_format="pyarrow", batch_size=None).sort(key)
    ds = ds.map_batches(lambda b: b.drop_columns([key]), batch_format="pyarrow", batch_size=None)
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


def bucket_sort_key(batch: pa.Table, n_windows: int, seed: int) -> np.ndarray:
    """`bucket_by_length`'s order as one int64 per row: window id (from the row hash), then padded length, then hash
    bits as a tie-break. Sorting a table by it gives the bucketed order (what benchmarks/dpo_step.py does)."""
    h = _row_hash(batch, seed)
    window_id = (h % np.uint64(n_windows)).astype(np.int64)
    padded = _padded_length(batch).astype(np.int64)
    return (window_id << 40) | (np.minimum(padded, (1 << 20) - 1) << 20) | (h >> np.uint64(44)).astype(np.int64)
