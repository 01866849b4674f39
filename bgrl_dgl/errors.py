"""The errors that the command line turns into one-line messages: bad input (exit 2) and a
run that cannot go on (exit 1)."""
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


class RunError(Exception):
    """A run cannot go on for a reason other than its input (e.g. the processes of a
    distributed run disagree); the CLI prints it as one line and exits with 1."""
