"""What a user sees: one line per stage, a live progress line per training run, the summary last.

Ray's own logs (its driver logs, worker and actor output, Ray Data's plans and Train's reports, and what its native
core writes to stderr) go to the Ray session's log directory, not to the terminal; `--verbose` brings them back.
On a terminal the progress line is redrawn in place (tqdm style); in a log file (not a TTY) it is a plain line every
`PLAIN_EVERY_S` seconds and at the end of the run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

PLAIN_EVERY_S = 15.0
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "urllib3", "filelock", "py.warnings")


class Console:
    def __init__(self, verbose: bool = False, stream: TextIO | None = None):
        self.verbose = verbose
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks that hold a console: streams don't pickle
        return {"verbose": self.verbose}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["verbose"])

    def stage(self, message: str) -> None:
        self._line(f"[ray-dpo] {message}")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def progress(self, name: str) -> Progress:
        return Progress(self, name)

    def quiet_libraries(self) -> None:
        """Ray's and MLflow's log records off the terminal (unless verbose): held in memory until Ray's session
        directory is known (`log_to`), then written to `<session>/logs/ray-dpo-driver.log`."""
        if self.verbose:
            return
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers reads it at import too
        import mlflow  # noqa: F401  (configures its loggers at import: strip them after)
        import ray.data  # noqa: F401  (same)

        self._held = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
        for name in QUIET_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if not isinstance(handler, logging.FileHandler):  # Ray Data's own file handler stays
                    logger.removeHandler(handler)
            logger.addHandler(self._held)
            logger.propagate = False
        libraries = r"(ray|mlflow|torch|pydantic|transformers|peft)(\..*)?$"
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=libraries)

    def log_to(self, log_dir: str | None) -> None:
        """Write the held and all further library log records to `<log_dir>/ray-dpo-driver.log`, and the native
        libraries' output (Ray's core, gloo: they write to file descriptor 2 directly) to `ray-dpo-native.log`."""
        held = getattr(self, "_held", None)
        if held is None or not log_dir:
            return
        self._native_to(Path(log_dir) / "ray-dpo-native.log")
        handler = logging.FileHandler(Path(log_dir) / "ray-dpo-driver.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        held.setTarget(handler)
        held.flush()
        for name in QUIET_LOGGERS:  # Ray's init may have installed its console handlers again
            logger = logging.getLogger(name)
            for other in list(logger.handlers):
                if not isinstance(other, logging.FileHandler):
                    logger.removeHandler(other)
            logger.addHandler(handler)
            logger.propagate = False
        self._held = None

    def _native_to(self, path: Path) -> None:
        """Point file descriptor 2 at `path`, and this process's Python stderr (our lines, the final error line)
        at a duplicate of the terminal. Only for a real stderr: a test's captured stream is left alone."""
        try:
            if sys.stderr.fileno() != 2 or self.stream is not sys.stderr:
                return
        except (AttributeError, ValueError, io.UnsupportedOperation):
            return
        sys.stderr.flush()
        terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
        native = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(native, 2)
        os.close(native)
        sys.stderr = self.stream = terminal

    @contextlib.contextmanager
    def captured(self) -> Iterator[io.StringIO]:
        """Python-level stderr of a noisy call (Ray's init prints through logging's last-resort handler), kept for
        the log file unless verbose."""
        if self.verbose:
            yield io.StringIO()
            return
        buffer = io.StringIO()
        with contextlib.redirect_stderr(buffer):
            yield buffer


class Progress:
    """The progress line of one training run, fed with rank 0's reports (`step`, `total_steps`, metrics)."""

    def __init__(self, console: Console, name: str):
        self.console, self.name = console, name
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.last_plain = 0.0
        self.text = ""

    def __call__(self, report: dict[str, Any]) -> None:
        step, total = int(report.get("step", 0)), int(report.get("total_steps", 0))
        if self.first_step is None:
            self.first_step, self.started = step, time.monotonic()
        self.text = self._format(step, total, report)
        now = time.monotonic()
        if self.console.tty:
            print(f"\r\033[K{self.text}", end="", file=self.console.stream, flush=True)
        elif step >= total or now - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = now
            self.console._line(self.text)

    def _format(self, step: int, total: int, report: dict[str, Any]) -> str:
        width = 20
        filled = int(width * step / total) if total else 0
        parts = [f"{self.name} [{'#' * filled}{'.' * (width - filled)}] {step}/{total}"]
        for key, label in (("loss", "loss"), ("rewards/accuracies", "acc")):
            value = next(
                (v for k, v in report.items() if k.endswith(f"/{key}") and not k.startswith(("val", "sft_val"))), None
            )
            if value is not None:
                parts.append(f"{label} {value:.3f}")
        tokens = next((v for k, v in report.items() if k.startswith("perf/")), None)
        if tokens is not None:
            parts.append(f"{tokens:,.0f} tok/s")
        done = step - (self.first_step or 0)
        if done > 0 and total > step:
            eta = (time.monotonic() - self.started) / done * (total - step)
            parts.append(f"ETA {int(eta // 60)}:{int(eta % 60):02d}")
        return " | ".join(parts)

    def close(self) -> None:
        """End the line (TTY) so the next stage starts on its own line."""
        if self.console.tty and self.text:
            print(file=self.console.stream, flush=True)
