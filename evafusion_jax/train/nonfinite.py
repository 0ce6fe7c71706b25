"""The trainers' non-finite policy: a NaN/inf loss or training state stops the run unsaved.

* :func:`check_finite` / :func:`check_finite_state` / :func:`check_finite_leaves`: the checks.
* :func:`guard_step`: what the training loop (:mod:`evafusion_jax.train.loop`) calls after every
  update, before anything is saved; it deletes the checkpoint whose parameters gave a
  non-finite loss on finite data (:meth:`TrainCheckpointer.discard`).
* :class:`NonFiniteLossError`: what they raise; the CLIs exit with code 3
  (:mod:`evafusion_jax.cli`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

if TYPE_CHECKING:
    from evafusion_jax.train.checkpointer import TrainCheckpointer


class NonFiniteLossError(FloatingPointError):
    """The loss (or another monitored value) became NaN or infinite."""


_NONFINITE_ADVICE = (
    "The run was stopped without saving. Rerun the same command with a lower learning rate "
    "(--config.learning_rate / --config.init_lr) or fixed input data: it resumes from the last good "
    "checkpoint")


def check_finite(loss: Any, step: int, what: str = "loss") -> float:
    """Returns ``float(loss)``; raises :class:`NonFiniteLossError` if it is NaN or inf.

    ``loss`` may be a scalar array or a dict of scalars (every entry is checked
    and the message names the bad ones). The caller should stop without saving,
    so that the last checkpoint on disk stays the last good one.
    """
    if isinstance(loss, dict):
        values = {k: float(np.asarray(jax.device_get(v))) for k, v in loss.items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(f"non-finite {what} at step {step}: {bad}. {_NONFINITE_ADVICE}.")
        return values.get("loss", next(iter(values.values()), float("nan")))
    value = float(np.asarray(jax.device_get(loss)))
    if not math.isfinite(value):
        raise NonFiniteLossError(f"non-finite {what} ({value}) at step {step}. {_NONFINITE_ADVICE}.")
    return value


@jax.jit
def _finite_leaves(tree):
    import jax.numpy as jnp
    leaves = [x for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def check_finite_state(state: Any, step: int, what: str = "training state") -> None:
    """Raises :class:`NonFiniteLossError` when any float leaf of ``state`` (the updated
    parameters, optimizer state, ...) holds a NaN or inf; the message names the first ones."""
    flags = check_finite_leaves(state)
    if all(flags):
        return
    paths = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
             if np.issubdtype(np.dtype(getattr(x, "dtype", None) or np.asarray(x).dtype),
                              np.inexact)]
    bad = [p for p, f in zip(paths, flags) if not bool(f)]
    raise NonFiniteLossError(
        f"non-finite values in the {what} after step {step} ({len(bad)} arrays, e.g. "
        f"{', '.join(bad[:3])}). {_NONFINITE_ADVICE}.")


def guard_step(checkpointer: "TrainCheckpointer", loss: Any, new_state: Any, step: int,
               batch: Any = None) -> float:
    """The trainers' NaN guard after the update of step ``step`` (0-based) -> ``step + 1``.

    * A non-finite ``loss`` on a finite input ``batch`` was computed with the parameters of
      checkpoint ``step`` (if one was saved at that step): finite but useless parameters
      (e.g. 1e30 after a huge learning rate) must not be resumed from, so that checkpoint is
      deleted and a rerun (with a lower learning rate) resumes from the one before it. When
      the batch itself holds NaN/inf, the data is to blame and the checkpoint is kept.
    * A non-finite ``new_state`` (updated parameters / optimizer state) is never saved.

    Raises :class:`NonFiniteLossError` (the CLIs exit with code 3); returns ``float(loss)``.
    """
    try:
        value = check_finite(loss, step)
    except NonFiniteLossError as e:
        if batch is not None and not all(check_finite_leaves(batch)):
            raise NonFiniteLossError(f"{e} The input batch of this step holds NaN/inf values: "
                                     "check the input data.") from None
        if checkpointer.discard(step):
            raise NonFiniteLossError(f"{e} (checkpoint {step}, whose parameters gave this loss, "
                                     "was deleted)") from None
        raise
    check_finite_state(new_state, step + 1)
    return value


def check_finite_leaves(tree: Any) -> list[bool]:
    """Whether each float leaf of ``tree`` is all finite (one device round trip)."""
    return [bool(f) for f in jax.device_get(_finite_leaves(tree))]
