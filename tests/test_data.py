"""ray_dpo.stages.data: Parquet -> token rows, on the real HH-RLHF file and on a corpus of bad files written here."""

import functools
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import HH_TEST, HH_TRAIN

from ray_dpo.core.encoding import Encoding
from ray_dpo.core.tokenizer import ByteTokenizer
from ray_dpo.stages.data import (
    DataError,
    PreferenceCollateFn,
    bucket_by_length,
    collate_preferences,
    read_preferences,
    split_train_val,
)

TOK = ByteTokenizer()
BOS, EOS, PAD = TOK.bos_id, TOK.eos_id, TOK.pad_id


def trl_reference(prompt: str, chosen: str, rejected: str, max_len: int, max_prompt_len: int):
    """Hand-written, row-at-a-time version of the documented rule (TRL keep_end, bos kept in front)."""
    p = [BOS] + list(prompt.encode())
    c = list(chosen.encode()) + [EOS]
    r = list(rejected.encode()) + [EOS]
    if len(p) + max(len(c), len(r)) > max_len:
        if len(p) > max_prompt_len:
            p = [BOS] + p[1:][len(p) - max_prompt_len :]
        room = max_len - len(p)
        c, r = c[:room], r[:room]
    return p, c, r


def rows_of(ds):
    return ds.take_all()  # read_preferences keeps file order


def test_collate_pads_to_the_batch_longest_row():
    batch = {  # the prompt is stored once; responses alone
        "prompt": np.array([np.array([1, 2], np.int32), np.array([4], np.int32)], dtype=object),
        "chosen": np.array([np.array([3], np.int32), np.array([5], np.int32)], dtype=object),
        "rejected": np.array([np.array([3, 9, 9], np.int32), np.array([6], np.int32)], dtype=object),
        "ref_chosen_logp": np.array([-1.0, -2.0]),
    }
    out = collate_preferences(batch, pad_id=PAD)
    assert out["chosen"].tolist() == [[1, 2, 3, PAD, PAD], [4, 5, PAD, PAD, PAD]]
    assert out["rejected"].tolist() == [[1, 2, 3, 9, 9], [4, 6, PAD, PAD, PAD]]
    assert out["prompt_len"].tolist() == [2, 1] and out["chosen_len"].tolist() == [1, 1]
    assert out["prompt_len"].dtype == torch.int64 and out["rejected_len"].tolist() == [3, 1]
    assert out["chosen"].dtype == torch.int64
    assert out["ref_chosen_logp"].dtype == torch.float32 and "ref_rejected_logp" not in out


def test_hh_train_accounting_roundtrip_truncation_and_padding(ray_session):
    source = pq.read_table(HH_TRAIN).to_pylist()
    blank = [i for i, row in enumerate(source) if not row["chosen"].strip()]
    assert len(blank) == 3  # the file's known quirk

    # "error": one line naming the file, the column and the first bad row's index within the file.
    with pytest.raises(DataError) as err:
        read_preferences(HH_TRAIN, encoding=Encoding(TOK, max_len=512, max_prompt_len=256))
    message = str(err.value)
    assert "\n" not in message
    assert HH_TRAIN in message and f"row {blank[0]}:" in message and "'chosen'" in message and "whitespace" in message

    # "skip" with room for everything: every row accounted, and decode(encode) restores the exact text.
    ds, stats = read_preferences(
        HH_TRAIN, encoding=Encoding(TOK, max_len=1 << 16, max_prompt_len=1 << 15), on_bad_row="skip"
    )
    assert (stats.rows_in, stats.rows_out, stats.truncated) == (1812, 1809, 0)
    assert stats.dropped["empty"] == 3 and sum(stats.dropped.values()) == 3
    assert stats.as_dict()["data/dropped/empty"] == 3 and stats.as_dict()["data/rows_out"] == ds.count() == 1809
    kept = [row for i, row in enumerate(source) if i not in blank]
    non_ascii = 0
    assert [str(t) for t in ds.schema().types] == ["list<item: int32>"] * 3  # int32 tokens, the prompt once
    for row, want in zip(rows_of(ds), kept, strict=True):
        assert row["prompt"][0] == BOS and row["chosen"][-1] == EOS and row["rejected"][-1] == EOS
        got = (TOK.decode(row["prompt"][1:]), TOK.decode(row["chosen"]), TOK.decode(row["rejected"]))
        assert got == (want["prompt"], want["chosen"], want["rejected"])
        non_ascii += any(not s.isascii() for s in got)
    assert non_ascii > 100  # typographic quotes and bullets went through bytes and back

    # Truncation: every row equals the hand-written rule; the prompt's END is kept.
    max_len, max_prompt_len = 256, 128
    ds, stats = read_preferences(
        HH_TRAIN, encoding=Encoding(TOK, max_len=max_len, max_prompt_len=max_prompt_len), on_bad_row="skip"
    )
    expected = [trl_reference(w["prompt"], w["chosen"], w["rejected"], max_len, max_prompt_len) for w in kept]
    cut_prompts = 0
    for row, want, src in zip(rows_of(ds), expected, kept, strict=True):
        got = (list(row["prompt"]), list(row["chosen"]), list(row["rejected"]))
        assert got == tuple(want)
        prompt_bytes = bytes(row["prompt"][1:])
        assert src["prompt"].encode().endswith(prompt_bytes)
        assert len(row["prompt"]) + max(len(row["chosen"]), len(row["rejected"])) <= max_len
        if len(prompt_bytes) < len(src["prompt"].encode()):  # a cut prompt keeps exactly max_prompt_len tokens
            assert len(row["prompt"]) == max_prompt_len
            cut_prompts += 1
    assert cut_prompts > 100
    n_truncated = sum(
        tuple(map(len, w))
        != (len(s["prompt"].encode()) + 1, len(s["chosen"].encode()) + 1, len(s["rejected"].encode()) + 1)
        for w, s in zip(expected, kept, strict=True)
    )
    assert stats.truncated == n_truncated > 0
    assert stats.rows_in == stats.rows_out + sum(stats.dropped.values())

    # Padding: each batch is as wide as ITS longest row (chosen or rejected), not max_len.
    widths = []
    for collate in (functools.partial(collate_preferences, pad_id=PAD), PreferenceCollateFn(PAD)):
        for batch in ds.iter_torch_batches(batch_size=8, collate_fn=collate):
            lens_c = batch["prompt_len"] + batch["chosen_len"]
            lens_r = batch["prompt_len"] + batch["rejected_len"]
            width = int(torch.maximum(lens_c, lens_r).max())
            assert batch["chosen"].shape == batch["rejected"].shape == (len(lens_c), width)
            positions = torch.arange(width)
            assert (batch["chosen"][positions >= lens_c[:, None]] == PAD).all()
            assert (batch["chosen"][positions < lens_c[:, None]] != PAD).all()
            widths.append(width)
    assert min(widths) < max_len  # some batches are narrower than max_len


def write(path, **columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


def good_rows(n=5):
    return {
        "prompt": [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(n)],
        "chosen": [f" yes {i}" for i in range(n)],
        "rejected": [f" no {i}" for i in range(n)],
    }


def test_bad_files_one_line_errors_and_skip_counts(ray_session, tmp_path):
    cfg = dict(encoding=Encoding(TOK, max_len=48, max_prompt_len=48))  # room for the good rows only

    def with_row(i, **changes):
        rows = good_rows()
        for column, value in changes.items():
            rows[column][i] = value
        return rows

    null = write(tmp_path / "null.parquet", **with_row(2, rejected=None))
    empty = write(tmp_path / "empty.parquet", **with_row(1, chosen=" \n\t "))
    same = write(tmp_path / "same.parquet", **with_row(3, rejected=" yes 3"))
    long = write(tmp_path / "long.parquet", **with_row(4, prompt="H" * 60))  # cut to 48: no room left
    cut_same = write(tmp_path / "cut_same.parquet", **with_row(0, chosen=" " + "x" * 60 + "a", rejected=" " + "x" * 60))
    row_cases = [
        (null, "row 2: column 'rejected' is null"),
        (empty, "row 1: column 'chosen' is empty or whitespace-only"),
        (same, "row 3: columns 'chosen' and 'rejected' are identical"),
        (long, "row 4: column 'prompt' leaves no room for a response"),
        (cut_same, "row 0: columns 'chosen' and 'rejected' are identical after truncation"),
    ]
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet" * 10)
    pages = write(
        tmp_path / "pages.parquet",
        prompt=["p" * 2000 + str(i) for i in range(300)],
        chosen=["a"] * 300,
        rejected=["b"] * 300,
    )
    corrupted = bytearray(open(pages, "rb").read())
    corrupted[100:400] = bytes(b ^ 0x5A for b in corrupted[100:400])  # data pages, footer intact
    open(pages, "wb").write(bytes(corrupted))
    file_cases = [
        (write(tmp_path / "missing.parquet", prompt=["a"], chosen=["b"]), "missing column 'rejected'"),
        (
            write(tmp_path / "wrongtype.parquet", prompt=["a"], chosen=[1], rejected=["c"]),
            "column 'chosen' has type int64",
        ),
        (str(garbage), "unreadable Parquet file"),
        (pages, "unreadable Parquet data"),
        (write(tmp_path / "zero.parquet", **{k: pa.array([], pa.string()) for k in good_rows()}), "no rows"),
    ]
    for path, what in row_cases + file_cases:
        with pytest.raises(DataError) as err:
            read_preferences(path, **cfg)
        message = str(err.value)
        assert message.startswith(path + ":") and what in message and "\n" not in message, (path, message)

    # skip: every bad row dropped and counted by reason; rows_in == rows_out + dropped.
    ds, stats = read_preferences([p for p, _ in row_cases], on_bad_row="skip", **cfg)
    assert stats.rows_in == 25 and stats.rows_out == ds.count() == 20 and stats.truncated == 0
    assert stats.dropped == {
        "null": 1,
        "empty": 1,
        "bad_token": 0,
        "identical": 1,
        "too_long": 1,
        "identical_after_truncation": 1,
    }
    # A file problem is not a bad row: it stays an error with "skip" too.
    with pytest.raises(DataError, match="missing column"):
        read_preferences([null, file_cases[0][0]], on_bad_row="skip", **cfg)

    # Renamed and pre-tokenized columns (list<int>): taken as is, eos appended, bad ids are bad rows.
    ids = write(
        tmp_path / "ids.parquet",
        question=pa.array([[5, 6, 7], [8], [9, 9]], pa.list_(pa.int32())),
        good=pa.array([[1], [2, 3], [4]], pa.list_(pa.int64())),
        bad=pa.array([[10], [11, 999], [12]], pa.list_(pa.int64())),
    )
    names = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    with pytest.raises(DataError, match=r"ids.parquet: row 1: column 'bad' holds a token id outside"):
        read_preferences(ids, columns=names, **cfg)
    ds, stats = read_preferences(ids, columns=names, on_bad_row="skip", **cfg)
    assert stats.dropped["bad_token"] == 1 and stats.rows_out == 2
    assert [(list(r["prompt"]), list(r["chosen"]), list(r["rejected"])) for r in rows_of(ds)] == [
        ([5, 6, 7], [1, EOS], [10, EOS]),
        ([9, 9], [4, EOS], [12, EOS]),
    ]
    with pytest.raises(DataError, match="missing column 'prompt'.*columns="):
        read_preferences(ids, **cfg)


def padded_fraction(ds, batch_size=8):
    padded = total = 0
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        p, c, r = ([len(x) for x in b[k]] for k in ("prompt", "chosen", "rejected"))
        lens = np.concatenate([np.add(p, c), np.add(p, r)])
        total += lens.max() * len(lens)
        padded += lens.max() * len(lens) - lens.sum()
    return padded / total


def test_split_is_deterministic_and_bucketing_cuts_padding(ray_session):
    ds, _ = read_preferences(HH_TEST, encoding=Encoding(TOK, max_len=512, max_prompt_len=256), on_bad_row="skip")

    def key(row):
        return (tuple(row["prompt"]), tuple(row["chosen"]), tuple(row["rejected"]))

    everything = sorted(map(key, ds.take_all()))
    train, val = split_train_val(ds, 0.1, seed=0)
    train_again, val_again = split_train_val(ds.repartition(7), 0.1, seed=0)  # other block layout, same split
    _, val_other = split_train_val(ds, 0.1, seed=1)
    val_rows = [key(r) for r in val.take_all()]
    assert len(val_rows) == round(0.1 * len(everything))
    assert sorted(val_rows) == sorted(map(key, val_again.take_all()))
    assert sorted(map(key, train.take_all())) == sorted(map(key, train_again.take_all()))
    assert sorted(val_rows + [key(r) for r in train.take_all()]) == everything
    assert set(val_rows) != set(map(key, val_other.take_all()))

    bucketed = bucket_by_length(ds, window=64, seed=0)
    assert sorted(map(key, bucketed.take_all())) == everything  # same rows, new order
    assert [key(r) for r in bucket_by_length(ds, window=64, seed=0).take_all()] == [key(r) for r in bucketed.take_all()]
    assert padded_fraction(bucketed) < 0.7 * padded_fraction(ds)  # 0.30 -> 0.18 measured
    lengths = [max(len(r["chosen"]), len(r["rejected"])) + len(r["prompt"]) for r in bucketed.take_all()]
    assert lengths != sorted(lengths)  # windows are shuffled: not one global sort


def test_one_pass_split_and_order_equals_the_two_steps_and_frees_what_it_is_handed(ray_session):
    """`split_and_order` (what a run does) gives the rows and orders of `split_train_val` then `order_rows` /
    `bucket_by_length`; the seeded shuffle is the same for another block layout; a `Handoff` input is freed block by
    block (no reference to any of its blocks is left), and dealing a handed-off dataset to ranks frees it too."""
    from ray_dpo.stages.data import Handoff, order_rows, split_and_order
    from ray_dpo.stages.train.shards import deal

    read, _ = read_preferences(HH_TEST, encoding=Encoding(TOK, max_len=512, max_prompt_len=256), on_bad_row="skip")
    ds = read.repartition(5).materialize()  # several blocks: several pieces per block, several merges
    del read
    key = lambda row: (tuple(row["prompt"]), tuple(row["chosen"]), tuple(row["rejected"]))
    rows = lambda d: [key(r) for r in d.take_all()]

    train, val = split_train_val(ds, 0.1, seed=0)
    bucketed, bucketed_val = split_and_order(ds, val_fraction=0.1, seed=0, window=64)
    assert rows(bucketed_val) == rows(val), "val keeps the input's order"
    assert rows(bucketed) == rows(bucket_by_length(train, window=64, seed=0))
    shuffled, _ = split_and_order(ds, val_fraction=0.1, seed=0)
    assert rows(shuffled) == rows(order_rows(train, seed=0))
    assert rows(shuffled) == rows(order_rows(train.repartition(3).materialize(), seed=0)), "layout-independent"
    assert rows(shuffled) != rows(train) and sorted(rows(shuffled)) == sorted(rows(train))
    assert rows(order_rows(train, seed=1)) != rows(shuffled)

    def alive(ids: set[str]) -> set[str]:
        # keyed by the hex id as bytes; an entry with no local or submitted reference is lineage only (kept to
        # rebuild the outputs it fed): its value is already freed
        counts = ray_session._private.worker.global_worker.core_worker.get_all_reference_counts()
        return ids & {key.decode() for key, c in counts.items() if c["local"] or c["submitted"]}

    def freed(ids: set[str]) -> bool:  # a task lets go of its arguments just after its outputs are ready
        deadline = time.monotonic() + 10
        while alive(ids) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not alive(ids)

    assert alive({ref.hex() for ref in ds.to_arrow_refs()}), "the check sees a live dataset's blocks"
    inputs = {ref.hex() for ref in ds.to_arrow_refs()}
    handed = Handoff(ds)
    del ds
    again, again_val = split_and_order(handed, val_fraction=0.1, seed=0)
    assert rows(again) == rows(shuffled) and rows(again_val) == rows(val)  # every task has run: none holds an input
    assert freed(inputs), "a handed-off input outlived its reordering"
    with pytest.raises(RuntimeError, match="already handed"):
        handed.count()

    count, dealt = again.count(), {ref.hex() for ref in again.to_arrow_refs()}
    handed = Handoff(again)
    del again
    shards = deal(handed, world=2, block=4)
    ray_session.wait([b for s in shards for b in s.blocks], num_returns=sum(len(s.blocks) for s in shards))
    assert freed(dealt), "a handed-off dataset outlived its deal"
    assert sum(s.num_rows for s in shards) == count


def test_files_are_cut_into_pieces_of_whole_or_cut_row_groups_in_file_order():
    import pyarrow.fs as pafs

    from ray_dpo.stages.data.read import _MIN_PIECE_ROWS, _PIECE_BYTES, _Plan, _reads

    def plan(*groups):
        return _Plan(
            pafs.LocalFileSystem(),
            [f"f{i}" for i in range(len(groups))],
            [sum(r for r, _ in g) for g in groups],
            {f: f for f in ("prompt", "chosen", "rejected")},
            dict.fromkeys(("prompt", "chosen", "rejected"), "text"),
            [list(g) for g in groups],
        )

    # Small data: one piece of everything (a task's fixed cost would dominate smaller ones).
    assert [(r.file, r.row_groups, r.first_row, r.rows, r.pieces) for r in _reads(plan([(1000, 10**6)]), cpus=8)] == [
        (0, (0,), 0, 1000, 1)
    ]
    # One big row group: decoded once, cut into pieces, at least two per CPU.
    rows = 50 * _MIN_PIECE_ROWS + 7
    assert [(r.row_groups, r.rows, r.pieces) for r in _reads(plan([(rows, 10**6)]), cpus=4)] == [((0,), rows, 8)]
    # Many small row groups: runs of whole groups; empty groups cost no task; rows counted from each file's start.
    quarter = _MIN_PIECE_ROWS // 4
    reads = _reads(plan([(quarter, 1)] * 10 + [(0, 0)] + [(quarter, 1)] * 2, [(5, 1)]), cpus=2)
    assert [r.row_groups for r in reads] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11, 12), (0,)]
    assert [(r.file, r.first_row, r.rows, r.pieces) for r in reads] == [
        (0, 0, 4 * quarter, 1),
        (0, 4 * quarter, 4 * quarter, 1),
        (0, 8 * quarter, 4 * quarter, 1),
        (1, 0, 5, 1),
    ]
    # Large data: pieces of ~_PIECE_BYTES of text, whatever the CPU count.
    big = [(100_000, _PIECE_BYTES)] * 4
    assert [(r.rows, r.pieces) for r in _reads(plan(big), cpus=1)] == [(100_000, 1)] * 4


def test_every_file_layout_gives_the_same_rows_counts_and_bad_row_index(ray_session, tmp_path, monkeypatch):
    """Pieces of whole row groups, pieces cut from one row group, and one piece: the same rows in the same order,
    the same accounting, and the first bad row's index within its file."""
    import ray_dpo.stages.data.read as data

    source = [row for row in pq.read_table(HH_TRAIN).to_pylist() if row["chosen"].strip()]
    source[1500]["rejected"] = None  # the only bad row, far from the first piece
    table = pa.Table.from_pylist(source)
    cfg = dict(encoding=Encoding(TOK, max_len=256, max_prompt_len=128))
    one_piece = write(tmp_path / "one.parquet", **{c: table[c] for c in table.column_names})
    want_ds, want_stats = read_preferences(one_piece, on_bad_row="skip", **cfg)

    def keys(ds):
        return [(tuple(r["prompt"]), tuple(r["chosen"]), tuple(r["rejected"])) for r in rows_of(ds)]

    want = keys(want_ds)
    assert want_stats.dropped["null"] == 1 and want_ds.num_blocks() == 1

    # Read by the driver and passed to the tasks: ~450-row pieces of 64-row batches on 2 CPUs.
    monkeypatch.setattr(data, "_MIN_PIECE_ROWS", 64)
    monkeypatch.setattr(data, "_MAP_BATCH_SIZE", 64)
    # None: one row group cut into pieces; 100: runs of whole row groups; 700: each group cut in two, the last whole
    for row_group_size in (None, 100, 700):
        path = tmp_path / f"rg{row_group_size}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        reads = data._reads(data._plan(str(path), {f: f for f in data.PAIR_FIELDS}, ""), data._cluster_cpus())
        assert sum(r.pieces for r in reads) > 2 and (row_group_size is not None or reads[0].pieces > 2)
        ds, stats = read_preferences(str(path), on_bad_row="skip", **cfg)
        assert ds.num_blocks() > 2
        assert keys(ds) == want
        assert (stats.rows_in, stats.rows_out, stats.dropped, stats.truncated) == (
            want_stats.rows_in,
            want_stats.rows_out,
            want_stats.dropped,
            want_stats.truncated,
        )
        with pytest.raises(DataError, match=r"\.parquet: row 1500: column 'rejected' is null"):
            read_preferences(str(path), **cfg)
