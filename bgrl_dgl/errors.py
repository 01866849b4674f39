"""The one error type that the command line turns into a one-line message and exit code 2."""
from __future__ import annotations

import os


class InputError(Exception):
    """Bad user input: a file that is missing, malformed or inconsistent, or a bad option.

    ``str(err)`` is ``"<path>: <problem>"``, the single line the CLI prints.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{self.path}: {problem}")
