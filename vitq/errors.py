"""User-facing errors.

Every error a user can cause (bad path, wrong model name, corrupt image, malformed recipe, unsupported op) is raised
as a :class:`VitqError` whose message names the culprit. The CLI prints the message (no traceback) and exits with the
error's ``exit_code``; library users can catch the class.
"""

from __future__ import annotations


class VitqError(Exception):
    """An error caused by the user's input, with a message meant to be read by that user."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:  # message plus an optional "hint:" line
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class InputError(VitqError):
    """A file, folder or argument given by the user is missing, unreadable or malformed."""


class ModelError(VitqError):
    """Unknown model name, or weights that do not match the model."""


class DataError(VitqError):
    """An image folder or image that cannot be used."""


class VerificationError(VitqError):
    """An artifact failed its numerical or structural verification."""

    exit_code = 3


class UnsupportedError(VitqError):
    """A model, op or option that vitq does not support (yet)."""
