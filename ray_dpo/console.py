"""What a user sees: one line per stage, a live progress line per training run, the summary last.

Ray's own logs (its driver logs, worker and actor output, Ray Data's plans and Train's reports) go to the Ray
session's log directory, not to the terminal; `--verbose` brings them back. On a terminal the progress line is
redrawn in place (tqdm style); in a log file (not a TTY) it is a plain line every `PLAIN_EVERY_S` seconds and at the
end of the run.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

PLAIN_EVERY_S = 15.0
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "urllib3", "filelock")


class Console:
    def __init__(self, verbose: bool = False, stream: TextIO | None = None):
        self.verbose = verbose
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def stage(self, message: str) -> None:
        self._line(f"[ray-dpo] {message}")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def progress(self, name: str) -> Progress:
        return Progress(self, name)

    def quiet_libraries(self) -> None:
        """Library loggers and warnings off the terminal (unless verbose); they stay in Ray's log files."""
        if self.verbose:
            return
        for name in QUIET_LOGGERS:
            logger = logging.getLogger(name)
            logger.setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", module="ray")
        warnings.filterwarnings("ignore", module="mlflow")

    def log_to(self, log_dir: str | None) -> None:
        """Ray's driver-side log records into `<session>/logs/ray-dpo-driver.log` (where a user looks for them)."""
        if self.verbose or not log_dir:
            return
        handler = logging.FileHandler(Path(log_dir) / "ray-dpo-driver.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in ("ray", "mlflow"):
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            for other in list(logger.handlers):
                if other is not handler and isinstance(other, logging.StreamHandler) and not isinstance(
                    other, logging.FileHandler
                ):
                    logger.removeHandler(other)
            logger.propagate = False


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
            value = next((v for k, v in report.items() if k.endswith(f"/{key}") and not k.startswith(("val", "sft_val"))), None)
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
