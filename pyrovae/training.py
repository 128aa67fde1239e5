"""Training any model/guide pair with stochastic variational inference.

:func:`fit` builds Pyro's ``ELBOModule`` (``loss(model, guide)``, :class:`~pyro.infer.Trace_ELBO`
by default) and optimizes it with a torch optimizer over every parameter the pair touches: those
of the :class:`torch.nn.Module` s it is bound to, and every ``pyro.param``/``pyro.module`` site.
The data live on the training device and batches are taken by index; the loss is accumulated on
the device, so on CUDA the loop reads nothing back from the GPU until the epoch ends.

A :class:`TrainState` passed to :func:`fit` is kept up to date at the end of every epoch (epochs
done, the optimizer's moments, the random generators), so a run can be saved
(:func:`pyrovae.checkpoint.save_state`) and continued later where it stopped.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.util import is_validation_enabled
from torch import nn

from .capture import CaptureError, CudaGraphStep, NoSyncTrace_ELBO, capture
from .data import as_tensors
from .errors import NonFiniteLossError

__all__ = ["fit", "History", "TrainState", "resolve_device"]

log = logging.getLogger("pyrovae")


@dataclass
class History:
    """Per-epoch metrics of a :func:`fit` run. ELBOs are per datapoint, in nats (higher is
    better); ``val_elbo`` holds ``None`` when no validation data was given."""

    epoch: list[int] = field(default_factory=list)
    train_elbo: list[float] = field(default_factory=list)
    val_elbo: list[float | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def append(self, record: dict) -> None:
        for key in asdict(self):
            getattr(self, key).append(record[key])

    def records(self) -> list[dict]:
        """One dict per epoch: ``epoch``, ``train_elbo``, ``val_elbo``, ``seconds``."""
        columns = asdict(self)
        return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]

    def __len__(self) -> int:
        return len(self.epoch)


@dataclass
class TrainState:
    """Where a :func:`fit` run stands: what it takes to continue it later.

    :func:`fit` updates it in place at the end of every epoch, before the callback runs, so a
    callback can save it with :func:`pyrovae.checkpoint.save_state`. Passed to a later
    :func:`fit` (with the model's weights restored), training continues with epoch
    ``epoch + 1``, Adam's moments as they were, and the random generators where they were.
    """

    epoch: int = 0  # epochs completed
    optimizer: dict | None = None  # the torch optimizer's state_dict() at the end of `epoch`
    rng: torch.Tensor | None = None  # torch's CPU generator state, torch.get_rng_state()
    cuda_rng: torch.Tensor | None = None  # the training device's CUDA generator state


def _load_moments(optimizer: torch.optim.Optimizer, saved: dict, params) -> None:
    # Load a saved optimizer's per-parameter state (Adam's moments and step) into a new optimizer
    # over the same parameters, keeping the new one's hyperparameters and implementation (fused,
    # capturable), which may differ between devices.
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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when there is one, else the CPU.

    :raises ValueError: if CUDA is asked for and not available, or the name is unknown.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available here")
    return device


def _modules_of(*fns: Callable) -> list[nn.Module]:
    # The modules a model/guide is, or is a bound method of.
    mods: list[nn.Module] = []
    for fn in fns:
        owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module) and all(owner is not m for m in mods):
            mods.append(owner)
    return mods


def _params(param_trace, modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    # The modules' parameters, plus the unconstrained leaves of the pyro.param sites seen (as
    # pyro.infer.SVI collects them) that the first backward pass reached: a same-named tensor
    # that Pyro's global param store still holds from another model gets no gradient and is
    # left out.
    seen: dict[int, torch.Tensor] = {}
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    for site in param_trace.nodes.values():
        value = site["value"]
        leaf = value.unconstrained() if hasattr(value, "unconstrained") else value
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.grad is not None:
            seen.setdefault(id(leaf), leaf)
    return list(seen.values())


def _epoch_loss(elbo_module, tensors, batch_size) -> torch.Tensor:
    # Sum of the loss over all of ``tensors`` without gradients, on the device.
    total = torch.zeros((), device=tensors[0].device)
    with torch.no_grad():
        for i in range(0, len(tensors[0]), batch_size):
            total += elbo_module(*(t[i : i + batch_size] for t in tensors)).detach()
    return total


def _make_optimizer(params, lr: float, device: torch.device, capturable: bool):
    # A fused Adam where this torch has one for the device, else the default implementation.
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr, capturable=capturable)


def fit(
    model: Callable,
    guide: Callable,
    data,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    loss: ELBO | None = None,
    device: str | torch.device | None = None,
    val_data=None,
    seed: int | None = None,
    transform: Callable | None = None,
    callback: Callable[[dict], bool | None] | None = None,
    progress: bool = True,
    fast: bool = True,
    state: TrainState | None = None,
) -> History:
    """Fit a model/guide pair with SVI.

    Works for any pair that takes the batch tensors as positional arguments and puts datapoints
    in a plate: :class:`~pyrovae.VAE`'s ``model``/``guide``, a :class:`~pyro.nn.PyroModule`, or
    plain functions using ``pyro.param``/``pyro.module``. Modules the pair is bound to are moved
    to ``device``; parameters a plain function creates should be made on the data's device.

    The fast path (``fast=True``): the first step runs eagerly, under Pyro's validation as you
    have it set, and finds the parameters; then the loss is captured once
    (:func:`pyrovae.capture.capture`) and replayed on every later step without running Pyro's
    handlers, and on CUDA the whole step is replayed as a CUDA graph. A pair that cannot be
    replayed safely (data-dependent Python, host syncs, parameters outside its modules) trains
    eagerly, which is said once in the ``pyrovae`` log. If the model is a method of an object
    with a ``check_data`` method (as :class:`~pyrovae.VAE` has), it is called once on the whole
    training and validation data first, since replayed steps run no per-step checks.

    :param model: Pyro model, called as ``model(*batch)``.
    :param guide: Pyro guide, called as ``guide(*batch)``.
    :param data: a tensor ``(N, ...)``, a tuple of tensors, or a torch Dataset.
    :param int epochs: passes over the data.
    :param int batch_size: datapoints per step.
    :param float lr: Adam learning rate.
    :param loss: a Pyro ELBO instance (e.g. ``TraceMeanField_ELBO()`` for the closed-form KL).
        Default, and in place of a plain ``Trace_ELBO``:
        :class:`~pyrovae.capture.NoSyncTrace_ELBO`, the same estimator without host syncs.
    :param device: ``"cpu"``, ``"cuda"``, … (default: CUDA when there is one).
    :param val_data: optional held-out data, scored with the same objective after each epoch.
    :param int seed: seeds Pyro, torch, numpy and random before training.
    :param transform: function applied to each training batch (a tuple of tensors); defaults to
        ``data.transform`` when ``data`` has one (e.g. dynamic binarization).
    :param callback: called with each epoch's record (a dict); returning ``True`` stops training.
    :param bool progress: show a tqdm progress bar.
    :param bool fast: capture and replay the loss when the pair allows it.
    :param TrainState state: continue a run: epochs ``state.epoch + 1 .. epochs`` are trained,
        the optimizer starts from ``state.optimizer`` and the generators from ``state.rng``
        (after ``seed``); the model's weights must already be those of ``state.epoch``. Updated
        in place after every epoch.
    :returns: the :class:`History` of per-epoch train/validation ELBO per datapoint (the epochs
        trained by this call).
    :raises ValueError: for bad arguments or data (checked before the first step).
    :raises NonFiniteLossError: if a loss is NaN/Inf; the parameters are restored to the end of
        the last good epoch first.
    """
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device = resolve_device(device)
    transform = transform if transform is not None else getattr(data, "transform", None)
    tensors = tuple(t.to(device) for t in as_tensors(data, "training data"))
    val = None
    if val_data is not None:
        val = tuple(t.to(device) for t in as_tensors(val_data, "validation data"))
    check = getattr(getattr(model, "__self__", None), "check_data", None)
    if callable(check) and is_validation_enabled():
        check(*(transform(tensors) if transform is not None else tensors))
        if val is not None:
            check(*val)
    if state is None:
        state = TrainState()
    if int(state.epoch) < 0:
        raise ValueError(f"state.epoch must be >= 0, got {state.epoch}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    if state.rng is not None:
        torch.set_rng_state(state.rng.cpu())
    if state.cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state.cuda_rng.cpu(), device)
    modules = _modules_of(model, guide)
    for m in modules:
        m.to(device)
    if loss is None:
        loss = NoSyncTrace_ELBO()
    elif type(loss) is Trace_ELBO:  # same estimator and settings, without the host syncs
        loss = copy.copy(loss)
        loss.__class__ = NoSyncTrace_ELBO
    elbo_module = loss(model, guide)
    n, batch_size = len(tensors[0]), min(int(batch_size), len(tensors[0]))
    steps = -(-n // batch_size)
    on_cuda = device.type == "cuda"

    from tqdm.auto import tqdm

    history = History()
    step_loss: Callable = elbo_module  # the eager loss until a capture succeeds
    graph_step: CudaGraphStep | None = None
    warm_up: list[torch.Tensor] = []  # batches run before a CUDA graph is recorded
    optimizer: torch.optim.Optimizer | None = None
    params: list[torch.Tensor] = []
    good: list[torch.Tensor] = []  # parameter values at the end of the last good epoch
    first_epoch = int(state.epoch) + 1
    total_steps = max(int(epochs) - first_epoch + 1, 0) * steps
    bar = tqdm(total=total_steps, disable=not progress, unit="step", dynamic_ncols=True)
    try:
        for epoch in range(first_epoch, int(epochs) + 1):
            start = time.perf_counter()
            perm = torch.randperm(n, device=device)
            total = torch.zeros((), device=device)
            bad_step = torch.full((), -1, dtype=torch.long, device=device)
            if graph_step is not None:
                graph_step.reset()
            for step in range(steps):
                idx = perm[step * batch_size : (step + 1) * batch_size]
                if graph_step is not None and not graph_step.failed and len(idx) == batch_size:
                    if graph_step.ready:
                        graph_step(idx)
                        bar.update()
                        continue
                    warm_up.append(idx)  # recording a CUDA graph takes three eager steps first
                    if len(warm_up) == 3:
                        try:
                            graph_step.warm_up(warm_up)
                        except CaptureError as e:
                            log.warning("pyrovae.fit: no CUDA graph, replaying eagerly: %s", e)
                        bar.update(len(warm_up))
                        warm_up = []
                    continue
                batch = tuple(t[idx] for t in tensors)
                if transform is not None:
                    batch = tuple(transform(batch))
                if optimizer is None:  # first step: eager; find the parameters the pair trains
                    with poutine.trace(param_only=True) as param_capture:
                        loss_t = elbo_module(*batch)
                    for site in param_capture.trace.nodes.values():  # count this loss's grads only
                        leaf = getattr(site["value"], "unconstrained", lambda: None)()
                        if isinstance(leaf, torch.Tensor):
                            leaf.grad = None
                    for m in modules:
                        m.zero_grad(set_to_none=True)
                    loss_t.backward()
                    params = _params(param_capture.trace, modules)
                    if not params:
                        raise ValueError("the model and guide have no trainable parameters")
                    if fast:
                        step_loss, graph_step = _fast_path(
                            elbo_module, modules, params, batch, tensors, batch_size, transform
                        )
                    optimizer = _make_optimizer(params, lr, device, graph_step is not None)
                    if state.optimizer is not None:
                        _load_moments(optimizer, state.optimizer, params)
                    if graph_step is not None:
                        graph_step.optimizer = optimizer
                        graph_step.step.fill_(step + 1)  # this step runs eagerly
                    good = [p.detach().clone() for p in params]
                    first = True
                else:
                    loss_t = step_loss(*batch)
                    first = False
                finite = torch.isfinite(loss_t)
                if on_cuda:  # remember the first bad step without a host sync
                    bad_step = torch.where(~finite & (bad_step < 0), step, bad_step)
                elif not bool(finite):
                    bad_step.fill_(step)
                    break
                if not first:  # the first step's gradients are in place already
                    optimizer.zero_grad(set_to_none=True)
                    loss_t.backward()
                optimizer.step()
                total += loss_t.detach()
                bar.update()
            if graph_step is not None:
                if warm_up:  # an epoch too short to record the graph: run its batches eagerly
                    graph_step.warm_up(warm_up, record=False)
                    bar.update(len(warm_up))
                    warm_up = []
                total = total + graph_step.total
                bad_step = torch.where(bad_step < 0, graph_step.bad_step, bad_step)
            if int(bad_step) >= 0:  # the epoch's one host sync (besides the ELBO below)
                with torch.no_grad():
                    for p, g in zip(params, good, strict=True):
                        p.copy_(g)
                restored = f"the end of epoch {epoch - 1}" if epoch > 1 else "their initial values"
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch}, step {int(bad_step) + 1}; parameters "
                    f"were restored to {restored}",
                    epoch=epoch,
                    step=int(bad_step) + 1,
                    history=history,
                )
            with torch.no_grad():
                for p, g in zip(params, good, strict=True):
                    g.copy_(p)
            state.epoch, state.optimizer = epoch, optimizer.state_dict()
            state.rng = torch.get_rng_state()
            state.cuda_rng = torch.cuda.get_rng_state(device) if on_cuda else None
            record = {
                "epoch": epoch,
                "train_elbo": -float(total) / n,
                "val_elbo": None,
                "seconds": time.perf_counter() - start,
            }
            if val is not None:
                record["val_elbo"] = -float(_epoch_loss(step_loss, val, batch_size)) / len(val[0])
            history.append(record)
            bar.set_postfix(
                train_elbo=f"{record['train_elbo']:.2f}",
                **({"val_elbo": f"{record['val_elbo']:.2f}"} if val is not None else {}),
            )
            log.debug("epoch %d: %s", epoch, record)
            if callback is not None and callback(record):
                break
    finally:
        bar.close()
    return history


def _fast_path(elbo_module, modules, params, batch, tensors, batch_size, transform):
    # Capture the loss; on CUDA also prepare a CUDA graph of the whole step. On failure say why,
    # once, and keep the eager loss.
    owned = {id(p) for m in modules for p in m.parameters()}
    outside = [p for p in params if id(p) not in owned]
    try:
        if outside:
            raise CaptureError(f"{len(outside)} parameter(s) live outside the pair's modules")
        captured = capture(elbo_module, modules, batch)
    except CaptureError as e:
        log.warning("pyrovae.fit: training eagerly, the loss cannot be replayed: %s", e)
        return elbo_module, None
    log.info("pyrovae.fit: replaying the captured loss")
    if tensors[0].device.type != "cuda":
        return captured, None
    return captured, CudaGraphStep(captured, None, tensors, batch_size, transform)
