"""Errors the user can fix, and how the command line shows them.

Every error about a config or the data on disk is a :class:`DGError`: its message says what is wrong,
what was expected and how to fix it, in a few lines. The command line (``dg-lightning ...``) prints
that message alone and exits with the error's ``exit_code`` (2; 3 for a run that diverged); the
traceback is shown only with ``--debug`` or ``DG_DEBUG=1``. Anything that is not a ``DGError`` is a
bug and keeps its traceback.

Each class also derives from the built-in exception the code raised before (``ValueError``,
``FileNotFoundError``, ...), so ``except ValueError`` in library code keeps working.
"""

from __future__ import annotations

from collections.abc import Callable


class DGError(Exception):
    """A problem in the user's config or data. ``fix`` (optional) is printed as its own line."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None):
        self.message, self.fix = message, fix
        super().__init__(message if not fix else f"{message}\n  fix: {fix}")


class ConfigError(DGError, ValueError):
    """A config key or value that is wrong (unknown key, bad value, impossible combination)."""


class DataError(DGError, ValueError):
    """Data on disk that does not fit the benchmark (unknown domain, empty class, label size...)."""


class DataNotFoundError(DGError, FileNotFoundError):
    """A data root, folder, list or file that does not exist."""


class CorruptImageError(DGError, RuntimeError):
    """An image file that cannot be decoded."""


class NonFiniteLossError(DGError, FloatingPointError):
    """A loss term became NaN or infinite: the run stopped (exit status 3, no ``results.json``)."""

    exit_code = 3


def find_user_error(exc: BaseException | None) -> DGError | None:
    """The :class:`DGError` that ``exc`` is, or that caused it (``__cause__``/``__context__`` chain:
    jsonargparse and Lightning wrap what a data module's constructor or a training step raised)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DGError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def user_message(err: DGError) -> str:
    """The error's own message. An error re-raised by a DataLoader worker carries the worker's
    traceback as its message ("Caught X in DataLoader worker process 0. Original Traceback ..."):
    keep what follows the last ``<module>.<class>: `` line, the message the worker raised."""
    text = str(err)
    if "Original Traceback" in text:
        tag = f"{type(err).__module__}.{type(err).__qualname__}: "
        at = text.rfind(tag)
        if at >= 0:
            text = text[at + len(tag):]
    return text.strip()


def raise_if_not_finite(losses: dict, step: int, hint: Callable[[], str] | None = None) -> None:
    """Stop at the first NaN or infinite loss term: a :class:`NonFiniteLossError` naming the step, the
    term (a component before the total ``loss``) and its value; ``hint()`` says what to change.
    One device-to-host sync per call (all terms checked together)."""
    import torch

    values = {k: v for k, v in losses.items() if torch.is_tensor(v)}
    if not values or bool(torch.isfinite(torch.stack([v.detach().float().sum() for v in values.values()])).all()):
        return
    bad = [k for k, v in values.items() if not bool(torch.isfinite(v.detach()).all())]
    name = next((k for k in bad if k != "loss"), bad[0])
    value = values[name].detach().float()
    value = value.item() if value.numel() == 1 else "non-finite entries"
    raise NonFiniteLossError(f"loss term '{name}' is {value} at step {step} (train/{name}); the run stopped "
                             "and wrote no results.json", fix=hint() if hint else None)
