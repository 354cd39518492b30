"""Shared fixtures: ONE real local Ray per test session (starting one costs ~5 s, a 2-worker trainer ~15 s)."""

import os
import signal
import subprocess
import tempfile

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HH_RLHF = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "data", "hh_rlhf"))  # in-repo sample
HH_TRAIN = os.path.join(HH_RLHF, "hh_rlhf_harmless_train_1812.parquet")
HH_TEST = os.path.join(HH_RLHF, "hh_rlhf_harmless_test_500.parquet")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 logical CPUs, shared by every test that asks for it."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=500 * 1024**2,
            _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),  # short: Ray's socket paths are length-limited
        )
    yield ray
    ray.shutdown()


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
