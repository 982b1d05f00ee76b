"""Errors users see. Each names what was wrong: the file, column, row, field or rule."""

from __future__ import annotations


class CleanroomError(Exception):
    """Base for errors reported to the user as a clear message with a non-zero exit."""

    exit_code = 2


class InputError(CleanroomError):
    """Bad input data or arguments: names the file, column and row at fault."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        row: int | None = None,
    ) -> None:
        self.file = file
        self.column = column
        self.row = row
        where = []
        if file is not None:
            where.append(f"file {file}")
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.detail = message


class ConfigError(CleanroomError):
    """A malformed node configuration or policy file: names the file, line and key."""
