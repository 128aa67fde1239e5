"""Training any model/guide pair with stochastic variational inference, on one device.

:class:`Trainer` is the object you advance, an epoch at a time (as Pyro's ``SVI`` has
``step``): it builds Pyro's ``ELBOModule`` (``loss(model, guide)``,
:class:`~pyro.infer.Trace_ELBO` by default) and optimizes it with a torch optimizer over every
parameter the pair touches: those of the :class:`torch.nn.Module` s it is bound to, and every
``pyro.param``/``pyro.module`` site. The data live on the training device and batches are taken
by index; the loss is accumulated on the device, so on CUDA the loop reads nothing back from the
GPU until the epoch ends. :func:`fit` is a short loop over it, with a progress bar, a callback
and (``run_dir``) a crash-consistent run directory.

Any pair that takes the batch tensors as positional arguments and puts datapoints in a plate
trains, written in any of Pyro's styles: :class:`~pyrovae.VAE`'s ``model``/``guide``, a
:class:`~pyro.nn.PyroModule`, or plain functions using ``pyro.module``/``pyro.param``. Modules
the pair is bound to are moved to the device; parameters a plain function creates should be
made on the data's device.

The fast path (``fast=True``): the first step runs eagerly, under Pyro's validation as you have
it set, and finds the parameters; then each loss is captured once
(:func:`pyrovae.capture.capture`) and replayed on every later step without running Pyro's
handlers, and on CUDA the whole step is replayed as a CUDA graph. Pyro's ELBOs run as their
no-sync twins (:mod:`pyrovae.nosync`). A pair that cannot be replayed safely trains eagerly, and
the ``pyrovae`` log says why, once. If the model is a method of an object with a ``check_data``
method (as :class:`~pyrovae.VAE` has), it is called once on the whole training and validation
data first, since replayed steps run no per-step checks.

The pair's plate covers the batch it is given (``pyro.plate(name, x.shape[0])``). A plate of the
whole data's size that subsamples exactly that batch (``pyro.plate(name, N,
subsample_size=len(x))``, Pyro's minibatch idiom for global latents) scales each batch's loss to
the whole data's; the ELBO per datapoint is then the whole data's over ``N``.

What the Lightning engine shares with it (objectives at run time, parameter discovery, loss
capture, data checks, the validation score, the epoch record) is in :mod:`pyrovae.pair`.

The trainer's :class:`TrainState` is kept up to date at the end of every epoch (epochs done,
the optimizer's moments, the random generators), so a run can be saved
(:func:`pyrovae.checkpoint.save_state`) and continued later where it stopped.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import torch
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled

from . import steps
from .batches import Stream, should_stream, validation_streams
from .data import as_tensors
from .errors import count
from .nonfinite import NonFiniteGuard
from .pair import (
    Objective,
    Term,
    as_objectives,
    check_data,
    check_fit_args,
    discover,
    epoch_record,
    modules_of,
    validation_elbo,
    validation_seed,
)
from .progress import TrainingBar
from .schedules import Clock
from .state import TrainState, load_moments, restore_generators
from .state import record as record_state

__all__ = ["fit", "Trainer", "Objective", "History", "resolve_device"]

log = logging.getLogger("pyrovae")


@dataclass
class History:
    """Per-epoch metrics of a :func:`fit` run. ELBOs are per datapoint, in nats (higher is
    better); ``val_elbo`` holds ``None`` when no validation data was given."""

    epoch: list[int] = field(default_factory=list)
    train_elbo: list[float] = field(default_factory=list)
    val_elbo: list[float | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    #: with several objectives, each one's loss per datapoint ({name: value}); else None
    parts: list[dict | None] = field(default_factory=list)
    #: with streamed data, the seconds the epoch waited for batches from the loader; else None
    data_seconds: list[float | None] = field(default_factory=list)
    #: with ``step_kwargs`` schedules, their values at the epoch's last step ({name: value})
    step_kwargs: list[dict | None] = field(default_factory=list)

    def append(self, record: dict) -> None:
        for key in asdict(self):
            getattr(self, key).append(record.get(key))

    def records(self) -> list[dict]:
        """One dict per epoch: ``epoch``, ``train_elbo``, ``val_elbo``, ``seconds`` (and
        ``parts`` with several objectives, ``data_seconds`` with streamed data, ``step_kwargs``
        with schedules)."""
        columns = asdict(self)
        for optional in ("parts", "data_seconds", "step_kwargs"):
            if all(v is None for v in columns[optional]):
                del columns[optional]
        return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]

    def __len__(self) -> int:
        return len(self.epoch)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: ``$PYROVAE_DEVICE`` when set, else CUDA when there is one, else the
    CPU.

    :raises ValueError: if CUDA is asked for and not available, or the name is unknown.
    """
    if device is None or device == "auto":
        device = os.environ.get("PYROVAE_DEVICE") or None
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {device!r}: use auto, cpu, cuda or cuda:N (mps, xpu where torch "
            "has them)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available here")
    return device


class _Fed(Term):
    # A term with fit's own data feed: device-resident tensors indexed by a permutation, or a
    # stream from a DataLoader.
    def __init__(self, obj: Objective, i: int, device, batch_size: int, batch_transform,
                 stream: bool | None = None, num_workers: int = 0,
                 step_kwargs: dict | None = None):  # fmt: skip
        super().__init__(obj, i, batch_transform, step_kwargs)
        what = "training data" if i == 0 else f"the data of objective {i + 1}"
        size = count("batch_size", obj.batch_size if obj.batch_size is not None else batch_size)
        self.stream: Stream | None = None
        if should_stream(obj.data, stream):
            self.stream = Stream(obj.data, size, num_workers, device, what)
            self.tensors, self.batch_size, self.steps = None, size, self.stream.steps
        else:
            self.tensors = tuple(t.to(device) for t in as_tensors(obj.data, what))
            self.n = len(self.tensors[0])
            self.batch_size = min(size, self.n)
            self.steps = -(-self.n // self.batch_size)
        self.device = device

    def start_epoch(self, device=None) -> None:
        if self.stream is not None:
            self.stream.start_epoch()
        else:
            self.perm = torch.randperm(self.n, device=self.device)
            self.pos = 0
        super().start_epoch(self.device)

    def next_index(self):
        # The next batch of this epoch's permutation (an index tensor), or the stream's next
        # batch (None at the end of a stream of unknown length). An objective with less data
        # than the longest one cycles through it again.
        if self.stream is not None:
            return self.stream.next(cycle=self.steps is not None)
        if self.pos >= self.n:
            self.perm, self.pos = torch.randperm(self.n, device=self.device), 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def batch(self, item) -> tuple[torch.Tensor, ...]:
        # The batch the pair sees: indexed (or streamed, then checked here since a stream's data
        # were not checked up front), with the batch transform applied, and the step's
        # scheduled keywords after it.
        if self.stream is None:
            return self.keyworded(self.prepare(tuple(t[item] for t in self.tensors)))
        batch = self.prepare(item)
        if self.check is not None and is_validation_enabled():
            self.check(*batch)
        return self.keyworded(batch)


class Trainer:
    """SVI for a model/guide pair (or several objectives), advanced an epoch at a time: the
    counterpart of Pyro's :class:`~pyro.infer.SVI` (which has ``step``) for whole epochs, with
    pyrovae's fast path. :func:`fit` is a loop over :meth:`epoch`.

    The first step runs eagerly, under Pyro's validation as set, and finds the parameters
    (:func:`pyrovae.pair.discover`); then each loss is captured once and replayed on every
    later step (on CUDA the whole step as a CUDA graph), or trains eagerly with the reason
    logged once (:mod:`pyrovae.steps`).

    :param model: a Pyro model, called as ``model(*batch)``; or a list of :class:`Objective`
        (then pass no ``guide``, ``data`` or ``loss``).
    :param guide: the matching guide.
    :param data: a tensor ``(N, ...)``, a tuple of tensors, a torch Dataset, or a DataLoader
        (any iterable of batches), which is streamed (:mod:`pyrovae.batches`).
    :param val_data: optional held-out data, scored after each epoch with the (first)
        objective's pair: :func:`pyrovae.pair.validation_elbo`, the unscaled ELBO per datapoint.
    :param state: a :class:`TrainState` to continue from (the modules' weights must be those of
        ``state.epoch``); updated in place after every epoch.
    :param seed: seeds Pyro, torch, numpy and random first (see :func:`fit`).

    The other parameters are :func:`fit`'s. Use::

        trainer = Trainer(vae.model, vae.guide, x, val_data=x_val, seed=0)
        for _ in range(10):
            record = trainer.epoch()  # {"epoch": 1, "train_elbo": ..., "val_elbo": ..., ...}
        save_state(run_dir, vae, trainer.state)
    """

    def __init__(self, model, guide: Callable | None = None, data=None, *, batch_size: int = 128,
                 lr: float = 1e-3, loss: ELBO | None = None, device=None, val_data=None,
                 seed: int | None = None, batch_transform: Callable | None = None,
                 fast: bool = True, state: TrainState | None = None, optimizer=None,
                 optim_args: dict | None = None, stream: bool | None = None,
                 num_workers: int = 0, step_kwargs: dict | None = None):  # fmt: skip
        check_fit_args(1, batch_size, lr)
        self.device = device = resolve_device(device)
        objectives = as_objectives(model, guide, data, loss)
        self.terms = [_Fed(o, i, device, batch_size, batch_transform, stream, num_workers,
                           step_kwargs) for i, o in enumerate(objectives)]  # fmt: skip
        self.val = _validation(val_data, batch_size, stream, num_workers, device)
        in_memory = self.val if isinstance(self.val, tuple) else None
        check_data(self.terms[0], self.terms[0].tensors, in_memory)
        self.state = state if state is not None else TrainState()
        if seed is not None:
            pyro.set_rng_seed(seed)
        self.val_seed = 0 if seed is None else int(seed)
        restore_generators(self.state, device)
        for m in modules_of(*(f for t in self.terms for f in (t.model, t.guide))):
            m.to(device)
        self.lr, self.optimizer_cls, self.optim_args, self.fast = lr, optimizer, optim_args, fast
        self.engine: steps.StepEngine | None = None
        self.modules: list = []  # the modules holding the parameters (after the first step)
        self.guard = NonFiniteGuard(device)
        self.history = History()
        self.steps = _steps_per_epoch(self.terms)

    def epoch(self, on_step: Callable[[int], None] | None = None) -> dict:
        """Train one epoch, score the validation data, and bring :attr:`state` to its end.

        :param on_step: called with the number of steps done after each (a progress bar).
        :returns: the epoch's record (:func:`pyrovae.pair.epoch_record`), also appended to
            :attr:`history`.
        :raises NonFiniteLossError: if a loss was NaN/Inf, after restoring the parameters to
            the end of the last good epoch.
        """
        epoch, start = int(self.state.epoch) + 1, time.perf_counter()
        self._steps(on_step or (lambda n: None))
        streamed = [t.stream for t in self.terms if t.stream is not None]
        waited = sum(s.wait for s in streamed) if streamed else None
        record = epoch_record(epoch, self.terms, time.perf_counter() - start, None, None, waited)
        self.guard.end_epoch(epoch, record["train_elbo"], (self.steps or 1) - 1, self.history)
        if self.val is not None:
            seed = validation_seed(self.val_seed, epoch)
            record["val_elbo"] = validation_elbo(self.terms[0], self._val_batches(), seed)
        record_state(self.state, epoch, self.engine.optimizer, self.device)
        self.history.append(record)
        return record

    def running_elbo(self) -> float | None:
        """The epoch's train ELBO per datapoint so far (a host read, for a progress bar)."""
        return self.engine.running_elbo() if self.engine is not None else None

    def _steps(self, on_step: Callable[[int], None]) -> None:
        # One epoch of steps; the guard holds the first bad step.
        for t in self.terms:
            t.start_epoch()
        self.guard.start_epoch()
        if self.engine is not None:
            self.engine.start_epoch()
        done = int(self.state.epoch)
        for step in itertools.count() if self.steps is None else range(self.steps):
            for t in self.terms:
                t.clock = Clock(done, step, self.steps)
            items = [t.next_index() for t in self.terms]
            if items[0] is None:  # the end of a stream of unknown length
                break
            run = self.engine.step if self.engine is not None else self._start
            on_step(run(step, items))
            if self.guard.stopped:
                break
        if self.engine is None:
            raise ValueError("the training data gave no batches")
        on_step(self.engine.end_epoch())

    def _start(self, step: int, items: list) -> int:
        # The first step, eager: find the parameters, choose the engine (capturing the losses),
        # build the optimizer, then update with the first step's gradients.
        batches = [t.batch(i) for t, i in zip(self.terms, items, strict=True)]
        found = discover(self.terms, batches)
        self.modules = found.modules
        self.engine = steps.build(
            self.terms, batches, found.modules, found.free if self.fast else {}, fast=self.fast,
            device=self.device, guard=self.guard,
            optimizer=lambda capturable: self._optimizer(found.params, capturable),
        )  # fmt: skip
        self.engine.start_epoch()
        self.guard.keep(found.params)
        return self.engine.update(step, batches, found.losses, backward=False)

    def _optimizer(self, params, capturable: bool):
        # The run's optimizer, with Adam's moments where a continued run left them.
        made = steps.make_optimizer(params, self.lr, self.optimizer_cls, self.optim_args,
                                    capturable)  # fmt: skip
        if self.state.optimizer is not None:
            load_moments(made[0], self.state.optimizer, params)
        return made

    def _val_batches(self):
        # The validation data as validation_elbo takes them: tensors, or streamed batches.
        if not isinstance(self.val, Stream):
            return self.val
        self.val.start_epoch()
        return iter(lambda: self.val.next(cycle=False), None)


def _validation(val_data, batch_size: int, stream, num_workers: int, device):
    # fit's validation data: tensors on the device, or a Stream of batches (large data).
    if val_data is None:
        return None
    if validation_streams(val_data, stream):
        return Stream(val_data, int(batch_size), num_workers, device, "validation data")
    return tuple(t.to(device) for t in as_tensors(val_data, "validation data"))


def _steps_per_epoch(terms) -> int | None:
    lengths = [t.steps for t in terms]
    if None in lengths and len(terms) > 1:
        raise ValueError(
            "with several objectives every stream needs a length (a DataLoader has one)"
        )
    return None if None in lengths else max(lengths)


def fit(
    model,
    guide: Callable | None = None,
    data=None,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    loss: ELBO | None = None,
    device: str | torch.device | None = None,
    val_data=None,
    seed: int | None = None,
    batch_transform: Callable | None = None,
    callback: Callable[[dict], bool | None] | None = None,
    progress: bool = True,
    fast: bool = True,
    state: TrainState | None = None,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    optim_args: dict | None = None,
    stream: bool | None = None,
    num_workers: int = 0,
    run_dir: str | os.PathLike | None = None,
    step_kwargs: dict | None = None,
) -> History:
    """Fit a model/guide pair (or several objectives) with SVI: a :class:`Trainer` advanced to
    ``epochs`` with a progress bar (the module docstring says what the fast path does).

    :param model: a Pyro model, called as ``model(*batch)``; or a list of :class:`Objective`
        (then pass no ``guide``, ``data`` or ``loss``).
    :param guide: Pyro guide, called as ``guide(*batch)``.
    :param data: a tensor ``(N, ...)``, a tuple of tensors, a torch Dataset, or a DataLoader
        (any iterable of batches), which is streamed (:mod:`pyrovae.batches`).
    :param int epochs: passes over the data (over the largest objective's, with several).
    :param int batch_size: datapoints per step.
    :param float lr: the learning rate.
    :param loss: a Pyro ELBO instance (e.g. ``TraceMeanField_ELBO()`` for the closed-form KL);
        default ``Trace_ELBO``.
    :param device: ``"cpu"``, ``"cuda"``, … (default: CUDA when there is one).
    :param val_data: optional held-out data, scored with the (first) objective after each epoch.
    :param int seed: seeds Pyro, torch, numpy and random before training: the data order, the
        noise, and every parameter created during training (``pyro.param`` sites and modules
        built lazily on the first step). Weights that exist before ``fit`` are not touched:
        :func:`~pyrovae.build_vae` fixes its own from ``Config.seed``; seed your own modules
        with ``pyro.set_rng_seed(s)`` before constructing them.
    :param batch_transform: function applied to each training batch (a tuple of tensors);
        defaults to ``data.batch_transform`` when ``data`` has one (e.g. dynamic binarization).
    :param callback: called with each epoch's record (a dict); returning ``True`` stops training.
    :param bool progress: show a tqdm progress bar.
    :param bool fast: capture and replay the loss when the pair allows it.
    :param TrainState state: continue a run: epochs ``state.epoch + 1 .. epochs`` are trained,
        the optimizer starts from ``state.optimizer`` and the generators from ``state.rng``
        (after ``seed``); the model's weights must already be those of ``state.epoch``. Updated
        in place after every epoch.
    :param optimizer: a ``torch.optim`` class (default: Adam, fused where available);
        or any callable ``(params, lr=..., **optim_args) -> Optimizer`` (e.g. one that gives
        some parameters a group of their own, as examples/air.py does for its baselines).
    :param dict optim_args: its keyword arguments besides the parameters (``lr`` overrides the
        ``lr`` above), e.g. ``{"betas": (0.95, 0.999)}``.
    :param stream: ``True`` to stream a map-style Dataset through a DataLoader instead of
        collating it onto the device; ``None`` (default) streams DataLoaders, iterables and
        Datasets larger than :data:`pyrovae.batches.STREAM_BYTES`.
    :param int num_workers: DataLoader worker processes when a Dataset is streamed.
    :param run_dir: write a crash-consistent run directory there, as ``pyrovae train`` does
        (the pair's module weights, its training state, metrics.csv, elbo.png, manifest.json;
        see :func:`pyrovae.runs.fit_run`), and continue the run saved there if there is one.
    :param dict step_kwargs: keyword arguments for the (first) objective's model and guide on
        every training step, ``{name: constant or schedule}``: e.g. Pyro's DMM example's
        ``{"annealing_factor": Ramp(0.2, 1.0, epochs=100)}`` (:mod:`pyrovae.keywords`,
        :class:`~pyrovae.schedules.Ramp`). A schedule's value is a function of the epoch and
        step, so a continued run feeds what an uninterrupted one would; each epoch's record
        holds its value at the epoch's last step. Validation calls the pair without them.
    :returns: the :class:`History` of per-epoch train/validation ELBO per datapoint (the epochs
        trained by this call).
    :raises ValueError: for bad arguments, data or pairs (checked before the first update).
    :raises NonFiniteLossError: if a loss is NaN/Inf; the parameters are restored to the end of
        the last good epoch first.
    """
    check_fit_args(epochs, batch_size, lr)
    args = {"batch_size": batch_size, "lr": lr, "loss": loss, "device": device,
            "val_data": val_data, "seed": seed, "batch_transform": batch_transform, "fast": fast,
            "optimizer": optimizer, "optim_args": optim_args, "stream": stream,
            "num_workers": num_workers, "step_kwargs": step_kwargs}  # fmt: skip
    if run_dir is not None:
        from .runs import fit_run

        return fit_run(Path(run_dir), model, guide, data, epochs=epochs, callback=callback,
                       progress=progress, state=state, **args)  # fmt: skip
    trainer = Trainer(model, guide, data, state=state, **args)
    return train_epochs(trainer, int(epochs), callback, progress)


def train_epochs(trainer: Trainer, last: int, callback=None, progress: bool = True) -> History:
    """Advance ``trainer`` to epoch ``last`` with a progress bar, calling ``callback(record)``
    after every epoch (``True`` stops); returns the :class:`History` of the epochs trained."""
    first = int(trainer.state.epoch) + 1
    bar = TrainingBar(first, last, trainer.steps, trainer.running_elbo, enabled=progress)
    best = None  # the best validation ELBO so far, for the bar
    try:
        for epoch in range(first, last + 1):
            bar.start_epoch(epoch)
            record = trainer.epoch(bar.update)
            # the callback may add to the record (a validation ELBO of its own): show it after
            stop = callback is not None and callback(record)
            if record.get("val_elbo") is not None and math.isfinite(record["val_elbo"]):
                best = record["val_elbo"] if best is None else max(best, record["val_elbo"])
            bar.end_epoch(record, best)
            log.debug("epoch %d: %s", epoch, record)
            if stop:
                break
    finally:
        bar.close()
    return trainer.history
