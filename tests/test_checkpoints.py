"""Checkpoints in storage: complete only with every manifest and file, partial ones ignored with one log line,
crash leftovers pruned; the device of collectives; rows dealt to ranks. No Ray Train here."""

from __future__ import annotations

import json
import logging

import pyarrow.fs as pafs
import pytest
import torch
import torch.distributed as dist

from ray_dpo.stages.train import all_reduce_sum, checkpoints


def _checkpoint(root, step: int, *, world: int = 1, drop: str | None = None, truncate: str | None = None) -> str:
    """A checkpoint directory as `world` ranks write it: each rank its files and its manifest."""
    directory = root / checkpoints.directory_name(step)
    directory.mkdir(parents=True)
    for rank in range(world):
        files = {f"model{rank}.safetensors": 100, f"state{rank}.json": 10}
        for name, size in files.items():
            (directory / name).write_bytes(b"x" * size)
        (directory / f"manifest.rank{rank}-of-{world}.json").write_text(json.dumps(files))
    if drop:
        (directory / drop).unlink()
    if truncate:
        (directory / truncate).write_bytes(b"x")
    return str(directory)


def test_partial_checkpoints_are_ignored_with_one_log_line(tmp_path, caplog):
    fs = pafs.LocalFileSystem()
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, drop="state0.json")  # a file never uploaded
    _checkpoint(tmp_path, 6, world=2, drop="manifest.rank1-of-2.json")  # a shard never written
    _checkpoint(tmp_path, 8, truncate="model0.safetensors")  # upload cut short
    with caplog.at_level(logging.WARNING, logger="ray_dpo.stages.train.checkpoints"):
        newest = checkpoints.newest_complete(fs, str(tmp_path), say_ignored=True)
    assert newest.step == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("incomplete" in line and "ignored" in line for line in lines), lines
    assert "missing state0.json" in lines[0] and "manifest of rank 1" in lines[1] and "model0" in lines[2]

    _checkpoint(tmp_path, 10, world=2)  # every shard's manifest and files: complete
    assert checkpoints.newest_complete(fs, str(tmp_path)).step == 10


@pytest.mark.parametrize("arriving", [b"", b'{"model0.safetensors": 1'])
def test_a_manifest_still_uploading_makes_its_checkpoint_incomplete(tmp_path, arriving):
    """Uploads are asynchronous: the pruning scan after a report can list a manifest whose bytes have not all
    arrived. That checkpoint is incomplete, not an error, and the older complete one is not deleted."""
    fs = pafs.LocalFileSystem()
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    (tmp_path / checkpoints.directory_name(4) / "manifest.rank0-of-1.json").write_bytes(arriving)
    found = checkpoints.scan(fs, str(tmp_path))
    assert [f.complete for f in found] == [True, False]
    assert found[1].missing == ["manifest of rank 0 (unreadable)"]
    checkpoints.prune_unregistered(fs, str(tmp_path), keep={checkpoints.directory_name(4)})
    assert [f.step for f in checkpoints.scan(fs, str(tmp_path))] == [2, 4]


def test_resume_prefers_a_newer_complete_checkpoint_than_rays_and_prunes_leftovers(tmp_path):
    from ray.train import Checkpoint

    fs = pafs.LocalFileSystem()
    registered = Checkpoint(path=_checkpoint(tmp_path, 2), filesystem=fs)
    _checkpoint(tmp_path, 4)  # complete, never registered: the worker died inside Ray's registration window
    assert checkpoints.resume_checkpoint(registered, fs, str(tmp_path)).path.endswith("checkpoint_step_00000004")
    assert checkpoints.resume_checkpoint(None, fs, str(tmp_path)).path.endswith("checkpoint_step_00000004")
    _checkpoint(tmp_path, 6)
    assert checkpoints.resume_checkpoint(registered, fs, str(tmp_path)).path.endswith("checkpoint_step_00000006")

    _checkpoint(tmp_path, 8, drop="state0.json")  # an upload in flight: newer than the newest complete, kept
    keep = {"checkpoint_step_00000002", "checkpoint_step_00000006"}  # what Ray registered
    checkpoints.prune_unregistered(fs, str(tmp_path), keep=keep)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint_step_00000002", "checkpoint_step_00000006", "checkpoint_step_00000008"]


@pytest.fixture
def fake_world_of_two():
    """A process group of 2 whose collectives do nothing: what matters is the device of what they are given."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def test_reductions_run_on_the_process_group_device(fake_world_of_two, monkeypatch):
    """NCCL rejects CPU tensors: every reduction of the training loop goes through `all_reduce_sum`, which moves
    its tensor to the device it is given ("meta" stands in for a GPU here)."""
    seen = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: (seen.append(t.device), real(t, **kw))[1])
    out = all_reduce_sum(torch.ones(3, dtype=torch.float64), torch.device("meta"))
    assert seen == [torch.device("meta")] and out.device == torch.device("meta")

    import inspect

    from ray_dpo.stages.train import loop

    source = inspect.getsource(loop)
    assert "dist.all_reduce(" in inspect.getsource(loop.all_reduce_sum)
    assert source.count("dist.all_reduce(") == 1, "every collective goes through all_reduce_sum"


def test_rows_are_dealt_to_ranks_by_micro_batch_and_read_once(ray_session):
    from ray_dpo.stages.train.shards import deal, micro_batches

    ds = ray_session.data.range(23, override_num_blocks=4)  # blocks of 6, 6, 6, 5 rows
    ds.context.execution_options.preserve_order = True  # as every dataset of the pipeline: a fixed row order
    ds = ds.materialize()
    shards = deal(ds, world=2, block=3, limit=18)  # 18 rows used: 3 global batches of 6
    collate = lambda b: {"ids": torch.as_tensor(b["id"])}
    got = [[b["ids"].tolist() for b in micro_batches(s, 3, collate)] for s in shards]
    assert got == [[[0, 1, 2], [6, 7, 8], [12, 13, 14]], [[3, 4, 5], [9, 10, 11], [15, 16, 17]]]
    assert sum(s.num_rows for s in shards) == 18, "rows read per epoch = rows used, not world x rows"
    resumed = [b["ids"].tolist() for b in micro_batches(shards[1], 3, collate, skip_rows=3)]
    assert resumed == [[9, 10, 11], [15, 16, 17]], "a resume slices the shard where the checkpoint left it"
    val = deal(ds, world=2, block=1)
    assert [len(b["ids"]) for b in micro_batches(val[1], 5, collate, drop_last=False)] == [5, 5, 1]
