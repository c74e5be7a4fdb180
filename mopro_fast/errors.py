"""The one base of every expected failure, and the one place that turns it into a line and an exit code.

An expected failure is anything a user can cause or fix: a bad recipe key, a missing file, a
damaged shard, a full disk, a run folder in use. Each is a `MoproError` subclass whose message is
one line (what, where, what to do). Commands raise them and never print or exit themselves: the
`mopro-fast` group (mopro_fast/cli) catches a `MoproError` around every command and ends with

    error: <message>          (stderr)   exit <exit_code>, 2 unless the class says otherwise

Subclasses that are also a ValueError / RuntimeError keep that base, so library callers that
caught those before still do. Light on purpose (no torch): data_tools and its worker processes
import it.

| exit code | meaning                                                            |
|-----------|--------------------------------------------------------------------|
| 2         | bad input, recipe, data, checkpoint, run folder or output (default) |
| 3         | training stopped on a NaN/inf loss, nothing new saved              |
| 130, 143  | stopped by SIGINT / SIGTERM (training saves a checkpoint first)    |
"""

from __future__ import annotations

from typing import NoReturn


class MoproError(Exception):
    """An expected failure; `str(exc)` is one line, `exit_code` the status the CLI exits with."""

    exit_code: int = 2
    prefix: str = "error: "  # a stop that is not an error (a signal) prints its line without it

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))

    def line(self) -> str:
        return f"{self.prefix}{self}"


class InputError(MoproError):
    """A command-line argument that cannot be used (a missing path, options that exclude each other)."""


class Interrupted(MoproError):
    """SIGINT / SIGTERM: the command stopped where it was asked to; `exit_code` is 128 + the signal."""

    prefix = ""

    def __init__(self, message: object, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # pickle with both arguments (it may cross a process boundary)
        return type(self), (str(self), self.exit_code)


def fail(message: object) -> NoReturn:
    """Stop the command with one line and exit code 2 (an `InputError`)."""
    raise InputError(message)
