"""How a pipeline ends when something goes wrong: one readable line, the traceback in the log file.

    @exit_on_error
    def main(argv) -> int: ...

A user's mistake (`UserError`: a config key, a data file / column / row, a tracking URI; also when raised inside a
Ray task, actor or Train worker) prints `error: <one line naming it>` and exits 2. Anything else is a failure of ours
or of the cluster: it prints `error: <stage> failed: <what> (full log: <file>)` and exits 1, the whole traceback in
that file. The stage is the one the recipe entered last (`in_stage`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator


class UserError(ValueError):
    """Bad input from the user (config key, data file/column/row, tracking URI...). The message names it."""


EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
_state = {"stage": "start", "failed_in": None, "log_file": None}


@contextlib.contextmanager
def in_stage(name: str) -> Iterator[None]:
    """Name the stage running now, for the last line of a failure (the innermost stage an error left)."""
    previous, _state["stage"] = _state["stage"], name
    try:
        yield
    except BaseException:
        _state["failed_in"] = _state["failed_in"] or name
        raise
    finally:
        _state["stage"] = previous


def set_log_file(path: str | None) -> None:
    """Where failures write their traceback (the run's driver log in Ray's session directory)."""
    _state["log_file"] = path


def _causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and every exception behind it, also through Ray's wrappers (task errors, Train worker-group errors)."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        stack += list((getattr(current, "worker_failures", None) or {}).values())


def find_user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, also when Ray wrapped it."""
    return next((e for e in _causes(err) if isinstance(e, UserError)), None)


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception that is not one of Ray's wrappers: what actually failed (the deepest one behind `err`,
    through explicit causes, Ray's task errors and every failed Train worker)."""

    def deepest(current: BaseException, seen: set[int]) -> tuple[int, BaseException | None]:
        seen.add(id(current))
        behind = [current.__cause__, getattr(current, "cause", None), current.__context__]
        behind += list((getattr(current, "worker_failures", None) or {}).values())
        found = [deepest(e, seen) for e in behind if e is not None and id(e) not in seen]
        depth, best = max(found, key=lambda pair: pair[0], default=(0, None))
        if best is None and not type(current).__module__.startswith("ray."):
            return 1, current
        return depth + 1, best

    return deepest(err, set())[1] or err


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _write_log(err: BaseException, stage: str) -> str:
    path = _state["log_file"]
    if path is None:
        handle, path = tempfile.mkstemp(prefix="ray-dpo-failure-", suffix=".log")
        os.close(handle)
    with open(path, "a") as log:
        log.write(f"\nray-dpo: {stage} failed\n")
        traceback.print_exception(err, file=log)
    return path


def exit_on_error(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a pipeline's `main` (see the module doc)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        _state["failed_in"] = None
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except Exception as err:
            user_error = find_user_error(err)
            if user_error is not None:
                print(f"error: {' '.join(str(user_error).split())}", file=sys.stderr)
                return EXIT_USER_ERROR
            stage = _state["failed_in"] or _state["stage"]
            log = _write_log(err, stage)
            what = " ".join(one_line(root_cause(err)).split())
            print(f"error: {stage} failed: {what} (full log: {log})", file=sys.stderr)
            return EXIT_FAILURE

    return wrapper
