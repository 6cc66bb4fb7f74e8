"""User-facing errors: the CLI prints these as one clear line and exits non-zero, no traceback."""


class LatheError(Exception):
    """Bad input or configuration that the user can fix. The message names the file, line or field."""
