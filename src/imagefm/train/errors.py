"""How a run ends early: an error it cannot go on from, or a clean stop that was asked for."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row, an empty data source)."""


class StopTraining(Exception):  # noqa: N818 - a signal, not an error
    """Ends a run cleanly: a last checkpoint and the final export are written as usual.

    Raised by early stopping (``eval.patience``) and by any callback's ``on_evaluate`` that
    wants the run to end (e.g. a search that has seen enough); the message says why.
    """
