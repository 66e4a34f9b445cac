"""The one exception hierarchy of modelfuse: every error a user can cause is a ModelfuseError."""

from __future__ import annotations


class ModelfuseError(Exception):
    """Base of all modelfuse errors; carries where the problem is when known.

    Args:
        message: One line saying what is wrong and what to do.
        path: The file or folder concerned, if any.
        tensor: The tensor name concerned, if any.
        model: The model (path or hub id) concerned, if any.
        details: Every item of a long list the message summarises (the CLI prints them with --verbose).
    """

    def __init__(
        self, message: str, *, path: str | None = None, tensor: str | None = None, model: str | None = None,
        details: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.tensor = tensor
        self.model = model
        self.details = details or []


def summary(head: str, items: list[str], *, shown: int = 3) -> str:
    """One line for a long list of problems: ``head``, how many, the first ``shown`` (all with ``--verbose``)."""
    more = f"; and {len(items) - shown} more (--verbose lists them all)" if len(items) > shown else ""
    return f"{head}: {len(items)} problem(s): {'; '.join(items[:shown])}{more}"


class RecipeError(ModelfuseError):
    """The recipe is invalid: bad YAML, unknown keys, unknown methods, bad parameter values."""


class CheckpointError(ModelfuseError):
    """An input model folder cannot be read or is not a usable model checkpoint."""


class ShapeMismatchError(CheckpointError):
    """The input models do not fit together (a tensor's shape differs, a tensor is missing)."""


class OutputError(ModelfuseError):
    """The output cannot be written where asked (exists, inside an input, not writable)."""


class MethodError(ModelfuseError):
    """A merge method was registered or called incorrectly."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``kill``, SLURM and Kubernetes send) turned into an interruption, so a stopped run keeps the
    same resumable state as Ctrl-C; ``exit_code`` is the shell's ``128 + signal``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.exit_code = 128 + signum


def interrupt_exit_code(error: KeyboardInterrupt) -> int:
    """The exit code of a command stopped by ``error``: 130 for Ctrl-C, ``128 + signal`` for a termination."""
    return error.exit_code if isinstance(error, Terminated) else 130
