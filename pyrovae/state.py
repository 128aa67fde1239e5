"""Where a training run stands, and how it is carried from one call to the next.

A :class:`TrainState` holds what it takes to continue a run exactly: the epochs done, the
optimizer's moments and the random generators. Both engines (:func:`pyrovae.fit` and
:func:`pyrovae.lightning.fit`) keep one up to date at the end of every epoch
(:func:`record`), and start from one (:func:`restore_generators`, :func:`load_moments`);
:func:`pyrovae.checkpoint.save_state` writes it as safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TrainState", "record", "restore_generators", "load_moments"]


@dataclass
class TrainState:
    """Where a :func:`~pyrovae.fit` run stands: what it takes to continue it later.

    :func:`~pyrovae.fit` updates it in place at the end of every epoch, before the callback
    runs, so a callback can save it with :func:`pyrovae.checkpoint.save_state`. Passed to a
    later :func:`~pyrovae.fit` (with the model's weights restored), training continues with
    epoch ``epoch + 1``, Adam's moments as they were, and the random generators where they were.
    """

    epoch: int = 0  # epochs completed
    optimizer: dict | None = None  # the torch optimizer's state_dict() at the end of `epoch`
    rng: torch.Tensor | None = None  # torch's CPU generator state, torch.get_rng_state()
    cuda_rng: torch.Tensor | None = None  # the training device's CUDA generator state


def record(state: TrainState, epoch: int, optimizer: torch.optim.Optimizer, device) -> None:
    """Bring ``state`` to the end of ``epoch``: the optimizer's state and the generators now.

    :param TrainState state: updated in place.
    :param int epoch: the epoch just completed.
    :param optimizer: the run's torch optimizer.
    :param torch.device device: the training device (its CUDA generator is kept on CUDA).
    """
    state.epoch, state.optimizer = epoch, optimizer.state_dict()
    state.rng = torch.get_rng_state()
    state.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_generators(state: TrainState, device) -> None:
    """Set torch's CPU generator (and the device's CUDA generator) to where ``state`` left them;
    a state without generators leaves them as they are.

    :raises ValueError: if ``state.epoch`` is negative.
    """
    if int(state.epoch) < 0:
        raise ValueError(f"state.epoch must be >= 0, got {state.epoch}")
    if state.rng is not None:
        torch.set_rng_state(state.rng.cpu())
    if state.cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state.cuda_rng.cpu(), device)


def load_moments(optimizer: torch.optim.Optimizer, saved: dict, params) -> None:
    """Load a saved optimizer's per-parameter state (Adam's moments and step) into a new
    optimizer over the same parameters, keeping the new one's hyperparameters and implementation
    (fused, capturable), which may differ between devices.

    :param optimizer: the new optimizer, over ``params``.
    :param dict saved: the old optimizer's ``state_dict()``.
    :param params: the parameters, in the optimizer's order.
    :raises ValueError: if the saved state does not fit the parameters.
    """
    state = saved.get("state", {})
    if set(state) - set(range(len(params))):
        raise ValueError(
            f"the saved optimizer state has {len(state)} parameters, this pair trains {len(params)}"
        )
    for i, moments in state.items():
        for key, value in moments.items():
            if key != "step" and tuple(value.shape) != tuple(params[i].shape):
                raise ValueError(
                    f"the saved optimizer state does not fit this pair: parameter {i} has shape "
                    f"{tuple(params[i].shape)}, its saved {key} {tuple(value.shape)}"
                )
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
