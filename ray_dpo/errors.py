"""User-facing errors: pipelines print `str(err)` as one line and exit non-zero, no traceback."""


class UserError(ValueError):
    """Bad input from the user (config key, data file/column/row, tracking URI...). The message names it."""
