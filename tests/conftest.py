"""Shared fixtures: ONE real local Ray per test session (starting one costs ~5 s, a 2-worker trainer ~15 s)."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def pipeline_main(name: str):
    """`main` of `pipelines/<name>.py`, run in-process (on the test session's Ray, with its captured console)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_pipeline", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


HH_RLHF = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "data", "hh_rlhf"))  # in-repo sample
HH_TRAIN = os.path.join(HH_RLHF, "hh_rlhf_harmless_train_1812.parquet")
HH_TEST = os.path.join(HH_RLHF, "hh_rlhf_harmless_test_500.parquet")


@pytest.fixture
def fresh_compiler():
    """A test that compiles starts from no compiled code: torch.compile allows 8 recompiles per code object and
    process, and the earlier tests' compiles of the same model code would count against this test's."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 logical CPUs, shared by every test that asks for it."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            # the dashboard serves the State API, which Ray Train's placement-group cleaner polls: without it, the
            # CPUs of a trainer whose controller was killed (an early-stopped Tune trial) are never given back
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            object_store_memory=500 * 1024**2,
            _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),  # short: Ray's socket paths are length-limited
        )
    yield ray
    ray.shutdown()


def wait_for_placement_groups_removed(ray, within_s: float = 60) -> None:
    """Every placement group of the session is REMOVED (Train workers and Tune trials gave their CPUs back)."""
    deadline = time.monotonic() + within_s
    while True:
        table = ray.util.placement_group_table()
        alive = {pg_id: pg["state"] for pg_id, pg in table.items() if pg["state"] != "REMOVED"}
        if not alive:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"placement groups still holding resources after {within_s} s: {alive}")
        time.sleep(1)


@pytest.fixture
def mlflow_uri(tmp_path):
    """A real MLflow store: a SQLite file in the test's own directory."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a server started with `start_new_session=True` and everything it spawned (SIGTERM, then SIGKILL)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for_http(url: str, within_s: float, process: subprocess.Popen, log: Path) -> None:
    """Poll `url` until it answers 200; fail the test (with the log's tail) if the process dies or time runs out."""
    deadline = time.monotonic() + within_s
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"{process.args[0]} exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} not answering after {within_s} s: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)


SERVER_HEALTHY_WITHIN_S = 120  # ~10 s on an idle machine; the shared 2-CPU box has taken 30 s


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, proxied artifacts) on a free loopback port; stopped afterwards."""
    root = tmp_path_factory.mktemp("mlflow-server")
    (port,) = free_ports(1)
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown stops the server and its worker processes
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", SERVER_HEALTHY_WITHIN_S, process, log_path)
        yield uri, root
    finally:
        stop_process_group(process)
