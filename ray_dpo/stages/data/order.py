"""Order and split of token rows: a seeded train/val split, a seeded shuffle and length bucketing, all decided by a
content hash of each row (the same on a laptop and a cluster, whatever the block layout).

- `split_train_val(rows, val_fraction, seed)` -> (train, val), each in the input's order
- `order_rows(rows, seed=, window=)` -> the training order: a seeded shuffle, or length buckets when `window` > 0
- `bucket_by_length(rows, window, seed=)` -> `order_rows` with a window
- `split_and_order(rows, val_fraction=, seed=, window=)` -> (train in training order, val in the input's order): the
  two above in ONE pass, what a run does

`rows` is a Dataset or a `Handoff` (`ray_dpo.stages.data.handoff`); outputs are materialized Datasets.

How it runs, block by block with Ray tasks, never a second whole copy of the rows:
1. keys: a task per block returns each row's hash and padded length (12 bytes a row, the only per-row data the
   driver holds): the split's threshold, the number of windows and the bounds of the output blocks follow.
2. route: a task per block cuts it into its val rows (input order) and, for an order, one piece per output block
   (a range of the order key); a handed-off input block is dropped once its route is submitted.
3. merge: a task per output block concatenates its pieces (input order) and sorts them by the order key; a stable
   sort, so exact duplicates keep the input's order. Each piece is dropped once its merge is submitted.
So the old copy shrinks as the new one grows: with a Handoff the object store holds about one copy of the rows plus
the blocks in flight. Ray Data's `random_shuffle` / `sort` hold their input, their map outputs and their result at
once, and a seeded `random_shuffle` depends on the block layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ray_dpo.core.encoding import Ragged, segment_sums
from ray_dpo.errors import UserError
from ray_dpo.stages.data.handoff import Handoff, block_refs

_KEY = "_order_key"
_SHUFFLE_SALT = np.uint64(0xD1B54A32D192ED03)  # the shuffle's key is a second hash of the split's, not the same one


def _token_columns(batch: pa.Table) -> list[str]:
    return [name for name in batch.column_names if pa.types.is_list(batch.schema.field(name).type)]


def _padded_length(batch: pa.Table) -> np.ndarray:
    """Per row: prompt + its longest response, the width the row occupies in a padded batch."""
    lengths = [pc.list_value_length(batch[name]).to_numpy(zero_copy_only=False) for name in _token_columns(batch)]
    prompt = lengths[_token_columns(batch).index("prompt")]
    responses = [x for name, x in zip(_token_columns(batch), lengths, strict=True) if name != "prompt"]
    return prompt + np.max(responses, axis=0)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _row_hash(batch: pa.Table, seed: int, columns: list[str] | None = None) -> np.ndarray:
    """A uint64 per row from its token content (`columns`, default every token column) and `seed`: same row + same
    seed -> same value, on any cluster and block layout. Vectorised splitmix64 over tokens and positions, summed per
    row."""
    s = np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    h = _mix(np.full(batch.num_rows, s + np.uint64(0x9E3779B97F4A7C15), dtype=np.uint64))
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
            token_mix = _mix(values * np.uint64(0x100000001B3) + pos * np.uint64(0x9E3779B97F4A7C15) + s)
            h = _mix(h ^ _mix(segment_sums(token_mix, rows.offsets) + np.uint64(salt) + rows.lengths.astype(np.uint64)))
    return h


def row_keys(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """A pair's identity: two independent 64-bit hashes of its prompt, chosen and rejected tokens (128 bits: the same
    key for the same tokens in any file, split or order, and practically never for other tokens)."""
    columns = ["prompt", "chosen", "rejected"]
    return _row_hash(batch, 0, columns), _row_hash(batch, 1, columns)


@dataclass(frozen=True)
class _Order:
    """How train rows are ordered: a seeded shuffle (`n_windows` 0) or length buckets in `n_windows` windows."""

    n_windows: int = 0

    def keys(self, h: np.ndarray, padded: np.ndarray) -> np.ndarray:
        """A uint64 sort key per row from its hash and padded length."""
        if not self.n_windows:
            return _mix(h ^ _SHUFFLE_SALT)
        window_id = h % np.uint64(self.n_windows)
        # window id, then length, then hash bits as a tie-break: one sort key
        length = np.minimum(padded.astype(np.uint64), np.uint64((1 << 20) - 1))
        return (window_id << np.uint64(40)) | (length << np.uint64(20)) | (h >> np.uint64(44))


@ray.remote
def _keys(block: pa.Table, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return _row_hash(block, seed), _padded_length(block).astype(np.int32)


@ray.remote
def _route(
    block: pa.Table,
    keys: tuple[np.ndarray, np.ndarray],
    threshold: np.uint64 | None,
    order: _Order | None,
    bounds: np.ndarray,
) -> tuple[pa.Table, ...]:
    """(val rows, train rows) in block order without an order; else (val rows, one piece per output block) with the
    order key as a column."""
    h, padded = keys
    in_val = h <= threshold if threshold is not None else np.zeros(len(h), dtype=bool)
    val = block.filter(pa.array(in_val))
    train = np.flatnonzero(~in_val)
    if order is None:
        return val, block.take(pa.array(train))
    sort_key = order.keys(h[train], padded[train])
    part = np.searchsorted(bounds, sort_key, side="right")
    by_part = np.argsort(part, kind="stable")  # each piece keeps the block's order
    cuts = np.searchsorted(part[by_part], np.arange(len(bounds) + 2))
    # ONE take, then zero-copy slices (Ray stores a slice's rows only): a take per piece would re-concatenate the
    # block's chunks each time, a cost that grows with the number of output blocks, i.e. with the data
    routed = block.take(pa.array(train[by_part])).append_column(_KEY, pa.array(sort_key[by_part]))
    return (val, *(routed.slice(start, stop - start) for start, stop in zip(cuts[:-1], cuts[1:], strict=True)))


@ray.remote
def _merge(*pieces: pa.Table) -> pa.Table:
    table = pa.concat_tables(pieces)
    index = np.argsort(table[_KEY].to_numpy(), kind="stable")  # ties keep the input's order
    return table.drop_columns([_KEY]).take(pa.array(index)).combine_chunks()


def _dataset(refs: list[ray.ObjectRef]) -> ray.data.Dataset:
    out = ray.data.from_arrow_refs(refs)  # already computed: a MaterializedDataset
    out.context.execution_options.preserve_order = True
    return out


def _train_keys(keys: tuple[np.ndarray, np.ndarray], threshold: np.uint64 | None) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, padded lengths) of a block's training rows: those above the split's threshold."""
    h, padded = keys
    if threshold is None:
        return h, padded
    train = h > threshold
    return h[train], padded[train]


def _route_blocks(refs, keys, key_refs, threshold, order, bounds) -> tuple[list, list[list]]:
    """Route every block: (val parts, per input block its train part or its pieces, None where empty). Empty parts
    are never referenced. Entries of `refs` are dropped as their routes are submitted."""
    outputs = 2 if order is None else 2 + len(bounds)
    val_refs, parts = [], []
    for i, block_keys in enumerate(keys):
        routed = _route.options(num_returns=outputs).remote(refs[i], key_refs[i], threshold, order, bounds)
        refs[i] = None  # a handed-off block is freed once its route has run
        train_h, train_padded = _train_keys(block_keys, threshold)
        if len(train_h) < len(block_keys[0]):
            val_refs.append(routed[0])
        if order is None:
            parts.append([routed[1]] if len(train_h) else [])
            continue
        sort_key = order.keys(train_h, train_padded)
        sizes = np.bincount(np.searchsorted(bounds, sort_key, side="right"), minlength=outputs - 1)
        parts.append([piece if size else None for piece, size in zip(routed[1:], sizes, strict=True)])
    return val_refs, parts


def _merge_pieces(parts: list[list]) -> list[ray.ObjectRef]:
    """One merge per output block, in order; each piece is dropped once its merge is submitted."""
    merged = []
    for p in range(len(parts[0]) if parts else 0):
        pieces = [block[p] for block in parts if block[p] is not None]
        for block in parts:
            block[p] = None  # a piece is freed once its merge has run
        if pieces:
            merged.append(_merge.remote(*pieces))
    return merged


def _rearrange(
    rows: ray.data.Dataset | Handoff, *, seed: int, val_fraction: float | None, window: int | None
) -> tuple[ray.data.Dataset, ray.data.Dataset | None]:
    """(train, val or None). `window`: None keeps the input's order, 0 shuffles, > 0 buckets by length."""
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if window is not None and window < 0:
        raise UserError(f"length bucket window must be >= 0, got {window}")
    refs = block_refs(rows)  # from a Handoff: the only references, dropped below as each block is routed
    key_refs = [_keys.remote(ref, seed) for ref in refs]
    keys = ray.get(key_refs)  # per block (hashes, padded lengths): 12 bytes a row, the driver's only per-row data
    threshold, n_train = None, sum(len(k[0]) for k in keys)
    if val_fraction is not None:
        h = np.concatenate([k[0] for k in keys]) if keys else np.zeros(0, dtype=np.uint64)
        n_val = max(1, int(round(len(h) * val_fraction)))
        if n_val >= len(h):
            raise UserError(f"val_fraction={val_fraction} leaves no training rows out of {len(h)}")
        threshold = np.partition(h, n_val - 1)[n_val - 1]
        n_train = int((h > threshold).sum())
        del h

    order, bounds = None, np.zeros(0, dtype=np.uint64)
    if window is not None:
        order = _Order(n_windows=max(1, -(-n_train // window)) if window else 0)
        blocks_out = max(1, min(len(refs), n_train))  # as many output blocks as input blocks: the same sizes
        # the output blocks' bounds: quantiles of every `stride`-th order key of each block (~100 keys per output
        # block), enough for blocks of about equal size; the order itself does not depend on them
        stride = max(1, n_train // (100 * blocks_out))
        sample = np.sort(np.concatenate([order.keys(*_train_keys(k, threshold))[::stride] for k in keys]))
        bounds = sample[[len(sample) * i // blocks_out for i in range(1, blocks_out)]]
        del sample

    val_refs, parts = _route_blocks(refs, keys, key_refs, threshold, order, bounds)
    del keys, key_refs
    train_refs = [part for block in parts for part in block] if order is None else _merge_pieces(parts)
    return _dataset(train_refs), (_dataset(val_refs) if val_fraction is not None else None)


def split_train_val(
    dataset: ray.data.Dataset | Handoff, val_fraction: float, seed: int
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Hold out `val_fraction` of the rows, deterministically by `seed`: (train, val), both materialized.

    A row's side depends only on its content and the seed (a hash), not on block layout or cluster size, so
    the split is the same on a laptop and a cluster, and duplicate rows never straddle train and val.
    Row order is kept inside each part (so a bucketed order survives). Val gets round(n * val_fraction) rows
    (at least 1), give or take exact duplicates at the cut.
    """
    train, val = _rearrange(dataset, seed=seed, val_fraction=val_fraction, window=None)
    return train, val


def order_rows(dataset: ray.data.Dataset | Handoff, *, seed: int, window: int = 0) -> ray.data.Dataset:
    """The training order, materialized: a seeded shuffle (a hash of each row's content orders the rows), or with
    `window` > 0 the length buckets of `bucket_by_length`."""
    return _rearrange(dataset, seed=seed, val_fraction=None, window=window)[0]


def bucket_by_length(dataset: ray.data.Dataset | Handoff, window: int, *, seed: int = 0) -> ray.data.Dataset:
    """Length-aware order: rows are dealt into random windows of about `window` rows, sorted by padded length
    (prompt + the longer response) inside each window, and the windows come in random order.

    `iter_torch_batches` batches consecutive rows, so a batch then holds rows of similar length and pads
    little; batches are still not globally ordered by length. Deterministic by `seed` (a content hash, not
    Ray's block layout). Use a window of tens of batches. Returns a materialized dataset.
    """
    if window < 1:
        raise UserError(f"length bucket window must be >= 1, got {window}")
    return order_rows(dataset, seed=seed, window=window)


def split_and_order(
    dataset: ray.data.Dataset | Handoff, *, val_fraction: float, seed: int, window: int = 0
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """`split_train_val` then `order_rows` of the train part, in one pass: (train in training order, val in the
    input's order); the same rows in the same orders as the two calls."""
    train, val = _rearrange(dataset, seed=seed, val_fraction=val_fraction, window=window)
    return train, val


def bucket_sort_key(batch: pa.Table, n_windows: int, seed: int) -> np.ndarray:
    """`bucket_by_length`'s order as one uint64 per row (window id from the row hash, then padded length, then hash
    bits as a tie-break). Sorting a table by it gives the bucketed order (what benchmarks/dpo_step.py does)."""
    return _Order(n_windows=n_windows).keys(_row_hash(batch, seed), _padded_length(batch))
