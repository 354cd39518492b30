"""Files every node of a cluster can read: the run's storage, `train.storage_path`.

A local directory (a laptop, or a directory every node mounts: NFS), or any URI pyarrow opens (`s3://bucket/prefix`,
`gs://...`; for S3-compatible endpoints set `AWS_ENDPOINT_URL`). Everything a Train worker, an actor or a trial reads
is staged here (starting weights and reference, generated data) or travels through the object store (token rows);
checkpoints are handed around as `ray.train.Checkpoint` objects (path + filesystem), never as `Path(uri)`.

On a cluster of several nodes a local `storage_path` must be shared: `check_shared` fails at start, in one line,
when a node cannot see it (Ray itself would only fail after the first checkpoint interval).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import ray
from ray.train import Checkpoint
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_dpo.errors import UserError


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(storage_path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) of a storage path; local paths made absolute."""
    if is_uri(storage_path):
        try:
            return pafs.FileSystem.from_uri(storage_path)
        except Exception as err:  # unsupported scheme, missing credentials...
            raise UserError(f"storage: cannot open {storage_path} ({str(err).splitlines()[0]})") from None
    return pafs.LocalFileSystem(), str(Path(storage_path).expanduser().resolve())


def uri(filesystem: pafs.FileSystem, path: str) -> str:
    """A URI that pyarrow and Ray readers open on any node (the form to print and to pass as a data path)."""
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}.get(filesystem.type_name)
    return f"{scheme}://{path}" if scheme else path


def join(storage_path: str, *parts: str) -> str:
    """`<storage_path>/<parts...>`, a local path or a URI alike."""
    return "/".join([str(storage_path).rstrip("/"), *parts])


def checkpoint_uri(checkpoint: Checkpoint) -> str:
    return uri(checkpoint.filesystem, checkpoint.path)


def as_checkpoint(location: str | Checkpoint) -> Checkpoint:
    """A `Checkpoint` for a directory given as a local path or a URI (or a Checkpoint already)."""
    if isinstance(location, Checkpoint):
        return location
    filesystem, path = resolve(location)
    return Checkpoint(path=path, filesystem=filesystem)


STAGED_MARKER = ".staged"  # written last: a directory without it was not copied completely


def stage_directory(local_dir: str | Path, storage_path: str, *parts: str, complete: bool = True) -> Checkpoint:
    """Copy a driver-local directory into `<storage_path>/<parts...>` (added to what is there); the copy every node
    reads. `complete=False` when more files follow before the directory is whole."""
    filesystem, root = resolve(storage_path)
    destination = "/".join([root.rstrip("/"), *parts])
    filesystem.create_dir(destination, recursive=True)
    if not (isinstance(filesystem, pafs.LocalFileSystem) and Path(destination) == Path(local_dir).resolve()):
        pafs.copy_files(str(local_dir), destination, destination_filesystem=filesystem)
    if complete:
        with filesystem.open_output_stream(f"{destination}/{STAGED_MARKER}") as marker:
            marker.write(b"complete\n")
    return Checkpoint(path=destination, filesystem=filesystem)


def find_directory(storage_path: str, *parts: str) -> Checkpoint | None:
    """The staged directory `<storage_path>/<parts...>` if it was staged completely, else None."""
    filesystem, root = resolve(storage_path)
    path = "/".join([root.rstrip("/"), *parts])
    if filesystem.get_file_info(f"{path}/{STAGED_MARKER}").type != pafs.FileType.File:
        return None
    return Checkpoint(path=path, filesystem=filesystem)


@contextlib.contextmanager
def local_directory(checkpoint: str | Checkpoint) -> Iterator[str]:
    """A local directory with the checkpoint's files: the directory itself when local, else a downloaded copy."""
    if isinstance(checkpoint, str) and not is_uri(checkpoint):
        yield checkpoint
        return
    with as_checkpoint(checkpoint).as_directory() as directory:
        yield directory


@contextlib.contextmanager
def small_files(location: str | Checkpoint, names: tuple[str, ...]) -> Iterator[str]:
    """A local directory holding a checkpoint's `names` (configs, tokenizer, state): the directory itself when it is
    local, else only those files fetched from storage (never the weights)."""
    if isinstance(location, str) and not is_uri(location):
        yield location
        return
    checkpoint = as_checkpoint(location)
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="ray-dpo-small-") as tmp:
        for name in names:
            try:
                with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{name}") as source:
                    (Path(tmp) / name).write_bytes(source.read())
            except (FileNotFoundError, OSError):
                continue  # not every kind of checkpoint has every file
        yield tmp


NODE_CACHE = Path(tempfile.gettempdir()) / "ray-dpo-node-cache"


@contextlib.contextmanager
def node_local(location: str | Checkpoint) -> Iterator[str]:
    """A checkpoint as a local directory: itself when local; from storage, downloaded ONCE per node into a cache
    the node's ranks share (a file lock: the first rank downloads, the others wait and read the same files)."""
    checkpoint = as_checkpoint(location)
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    from filelock import FileLock

    key = hashlib.sha256(checkpoint_uri(checkpoint).encode()).hexdigest()[:16]
    cache = NODE_CACHE / key
    NODE_CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        if not (cache / STAGED_MARKER).is_file():
            pafs.copy_files(checkpoint.path, str(cache), source_filesystem=checkpoint.filesystem)
            (cache / STAGED_MARKER).write_text("complete\n")
    yield str(cache)


# ------------------------------------------------------------------------------------------- many nodes


@ray.remote(num_cpus=0)
def _sees(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


def _other_nodes() -> list[dict]:
    here = ray.get_runtime_context().get_node_id()
    return [node for node in ray.nodes() if node["Alive"] and node["NodeID"] != here]


def check_shared(paths: dict[str, str]) -> None:
    """Fail in one line when a local path (config key -> path) is not visible from every node of the cluster.

    One zero-CPU probe task per other node checks the path (for `train.storage_path`, a probe file written here).
    URIs are skipped: every node opens them. On a single node this costs nothing.
    """
    local = {key: path for key, path in paths.items() if path and not is_uri(path)}
    nodes = _other_nodes() if local else []
    if not nodes:
        return
    probes = {}
    for key, path in local.items():
        if key == "train.storage_path":
            Path(path).mkdir(parents=True, exist_ok=True)
            probe = Path(path) / f".ray-dpo-probe-{uuid.uuid4().hex}"
            probe.write_text("written by the driver: every node must see this file\n")
            probes[key] = str(probe)
        else:
            probes[key] = path
    try:
        for node in nodes:
            on_node = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            seen = ray.get(_sees.options(scheduling_strategy=on_node).remote(list(probes.values())))
            for (key, path), ok in zip(local.items(), seen, strict=True):
                if not ok:
                    raise UserError(
                        f"config: {key}={path} is on the driver's disk only: node {node['NodeManagerAddress']} cannot "
                        f"read it. Use a directory every node mounts (NFS) or a URI such as s3://bucket/prefix"
                    )
    finally:
        for key, probe in probes.items():
            if key == "train.storage_path":
                Path(probe).unlink(missing_ok=True)
