"""Model selection as in the VAE papers: score a validation split after every epoch, keep the
best model, stop when it has not improved for a while.

:class:`EarlyStopping` is a :func:`pyrovae.fit` callback. After each epoch it computes the
validation ELBO per datapoint with :func:`pyrovae.elbo` — the true ELBO from unscaled densities,
whatever the training objective (IWAE) or KL weight (warm-up, β-VAE) — keeps a copy of the
weights of the best epoch so far (and calls ``on_improve``, e.g. to write a checkpoint), and asks
fit to stop after ``patience`` epochs without improvement. Epochs of KL warm-up do not count
towards the patience, as in the VampPrior paper's code [1].

References:
  [1] J. M. Tomczak, M. Welling, "VAE with a VampPrior", AISTATS 2018 (early stopping with a
      look-ahead of 50 epochs after 100 warm-up epochs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .data import as_tensors
from .evaluation import elbo

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Track the validation ELBO, keep the best weights, stop after ``patience`` bad epochs.

    Calling it with an epoch's record (as :func:`pyrovae.fit` does) adds ``record["val_elbo"]``
    (nats per datapoint; a record that has one already is judged by it) and returns ``True``
    when training should stop.

    :param nn.Module model: a module with ``model`` and ``guide`` methods (e.g. a
        :class:`~pyrovae.VAE`); its ``state_dict`` is what "the best weights" are.
    :param val_data: validation data (tensor, tuple of tensors or Dataset), on the model's
        device.
    :param int patience: stop after this many epochs (after warm-up) without a better validation
        ELBO; ``None`` never stops early (the best weights are still tracked).
    :param int warmup: epochs 1..warmup never count towards the patience.
    :param on_improve: called with the record of each new best epoch (after the weights are
        copied), e.g. to save a checkpoint.
    :param int num_particles: samples per datapoint for the validation ELBO.
    :param int batch_size: datapoints per chunk for the validation ELBO (default: automatic).
    :raises ValueError: for a non-positive patience or negative warm-up.
    """

    def __init__(
        self,
        model: nn.Module,
        val_data,
        patience: int | None = None,
        warmup: int = 0,
        on_improve: Callable[[dict], None] | None = None,
        num_particles: int = 1,
        batch_size: int | None = None,
    ):
        if patience is not None and (int(patience) != patience or int(patience) < 1):
            raise ValueError(f"patience must be a positive number of epochs, got {patience}")
        if int(warmup) < 0:
            raise ValueError(f"warmup must be >= 0 epochs, got {warmup}")
        self.model = model
        self.val = as_tensors(val_data, "validation data")
        self.patience = None if patience is None else int(patience)
        self.warmup = int(warmup)
        self.on_improve = on_improve
        self.num_particles, self.batch_size = int(num_particles), batch_size
        self.best_value = -math.inf
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def score(self) -> float:
        """The validation ELBO per datapoint (nats) of the model as it is now."""
        values = elbo(
            self.model.model,
            self.model.guide,
            self.val,
            num_particles=self.num_particles,
            batch_size=self.batch_size,
        )  # (N,)
        return float(values.mean())

    def __call__(self, record: dict) -> bool:
        # an epoch already scored (fit's val_data, or the Lightning engine's sum over ranks)
        # is not scored again
        value = record.get("val_elbo")
        if value is None:
            value = record["val_elbo"] = self.score()
        if value > self.best_value:  # NaN is never an improvement
            self.best_value, self.best_epoch, self.wait = value, record["epoch"], 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.on_improve is not None:
                self.on_improve(record)
        elif record["epoch"] > self.warmup:
            self.wait += 1
        if self.patience is not None and self.wait >= self.patience:
            self.stopped_epoch = record["epoch"]
            return True
        return False

    def state_dict(self) -> dict:
        """The bookkeeping to continue selection later (JSON-serializable; the best weights are
        not in it: they are the best checkpoint, saved by ``on_improve``)."""
        return {
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state: dict, best_state: dict[str, torch.Tensor] | None) -> None:
        """Continue from :meth:`state_dict`, with the best epoch's weights ``best_state`` (a
        ``state_dict`` of the model, e.g. read back from the best checkpoint)."""
        self.best_value = float(state["best_value"])
        self.best_epoch = state["best_epoch"]
        self.wait = int(state["wait"])
        self.stopped_epoch = state["stopped_epoch"]
        self.best_state = best_state

    def restore(self) -> None:
        """Load the best epoch's weights back into the model (no-op before the first epoch)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
