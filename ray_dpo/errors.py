"""User-facing errors: pipelines print `str(err)` as one line and exit non-zero, no traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(ValueError):
    """Bad input from the user (config key, data file/column/row, tracking URI...). The message names it."""


def find_user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, also when Ray wrapped it (task errors, Train worker-group errors)."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        stack += list((getattr(current, "worker_failures", None) or {}).values())
    return None


EXIT_USER_ERROR = 2


def exit_on_user_error(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a pipeline's `main`: a user error (also inside a Ray error) prints `error: <one line>` and returns 2;
    anything else is a bug and keeps its traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as err:
            user_error = find_user_error(err)
            if user_error is None:
                raise
            print(f"error: {' '.join(str(user_error).split())}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapper
