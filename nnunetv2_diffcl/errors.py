"""One exception for bad user input, and the one way the command line shows it.

Functions that check what a user gave (a file, a folder, an argument, an ``nnUNet_*`` variable) raise
:class:`UserInputError` with a message that names the culprit and the fix. ``nnUNetv2_diffcl`` catches it and
prints ``nnUNetv2_diffcl <command>: error: <message>`` (argparse's own format) with exit code 2 and no traceback.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """A file, value or variable the user gave cannot be used; the message says which, and how to fix it."""


def error_line(command: str, message: object) -> str:
    """How every ``nnUNetv2_diffcl`` command reports a problem (the format argparse uses for bad arguments)."""
    return f"nnUNetv2_diffcl {command}: error: {message}"
