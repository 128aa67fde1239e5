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

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, TraceEnum_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.subsample_messenger import _Subsample
from torch import nn
from torch.distributions import constraints

from . import steps
from .batches import Stream, should_stream
from .capture import NoSyncTrace_ELBO, no_sync, recording_modules
from .data import as_tensors
from .errors import count
from .nonfinite import NonFiniteGuard
from .progress import TrainingBar
from .state import TrainState, load_moments, restore_generators
from .state import record as record_state

__all__ = ["fit", "Objective", "History", "resolve_device"]

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

    def append(self, record: dict) -> None:
        for key in asdict(self):
            getattr(self, key).append(record.get(key))

    def records(self) -> list[dict]:
        """One dict per epoch: ``epoch``, ``train_elbo``, ``val_elbo``, ``seconds`` (and
        ``parts`` with several objectives, ``data_seconds`` with streamed data)."""
        columns = asdict(self)
        for optional in ("parts", "data_seconds"):
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


def _epoch_loss(elbo_module, tensors, batch_size, full: int | None = None) -> torch.Tensor:
    # Sum of the loss over all of ``tensors`` without gradients, on the device (``full``: the
    # plate's full size for a pair that scales its batches up, see steps.batch_sum).
    # TraceEnum_ELBO refuses to run without gradients: it gets them, and they are dropped.
    grads = isinstance(getattr(elbo_module, "elbo", None), TraceEnum_ELBO)
    total = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    with torch.set_grad_enabled(grads):
        for i in range(0, len(tensors[0]), batch_size):
            batch = tuple(t[i : i + batch_size] for t in tensors)
            total += steps.batch_sum(elbo_module(*batch).detach(), len(batch[0]), full)
    return total


@dataclass
class Objective:
    """One term of what :func:`fit` minimizes: a model/guide pair, its loss, and its own data.

    Several objectives train together with one optimizer (e.g. Kingma et al.'s M2: the ELBO
    on unlabelled images, the ELBO on labelled ones, and a classifier loss): every step takes
    one batch from each objective's data and steps on Σ weight × loss.

    :param model: Pyro model, called as ``model(*batch)``.
    :param guide: Pyro guide, called as ``guide(*batch)``.
    :param data: a tensor ``(N, ...)``, a tuple of tensors, or a torch Dataset.
    :param loss: a Pyro ELBO (default :class:`~pyro.infer.Trace_ELBO`).
    :param int batch_size: datapoints per step (default: :func:`fit`'s ``batch_size``).
    :param float weight: the term's weight in the summed loss.
    :param str name: the term's name in metrics (default ``objective1``, ``objective2``, ...).
    """

    model: Callable
    guide: Callable
    data: object
    loss: ELBO | None = None
    batch_size: int | None = None
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(
                f"an objective's weight must be a finite number > 0, got {self.weight}"
            )


class _Term:
    # One objective at run time: its batches (device-resident tensors indexed by a permutation,
    # or a stream from a DataLoader), its ELBOModule, the loss each step runs (eager, or
    # captured once it is), and the epoch's running sums.
    def __init__(self, obj: Objective, i: int, device, batch_size: int, batch_transform,
                 stream: bool | None = None, num_workers: int = 0):  # fmt: skip
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
        self.weight = float(obj.weight)
        self.name = obj.name or f"objective{i + 1}"
        self.model, self.guide = obj.model, obj.guide
        loss = no_sync(obj.loss) if obj.loss is not None else NoSyncTrace_ELBO()
        self.elbo_module = loss(obj.model, obj.guide)
        self.step_loss: Callable = self.elbo_module  # replaced by the captured loss
        self.full: int | None = None  # the full size a plate scales batches up to (first step)
        self.transform = (
            batch_transform if i == 0 and batch_transform is not None
            else getattr(obj.data, "batch_transform", None)
        )  # fmt: skip
        check = getattr(getattr(obj.model, "__self__", None), "check_data", None)
        self.check = check if callable(check) else None
        self.device = device

    def start_epoch(self) -> None:
        if self.stream is not None:
            self.stream.start_epoch()
        else:
            self.perm = torch.randperm(self.n, device=self.device)
            self.pos = 0
        self.total = torch.zeros((), dtype=torch.float64, device=self.device)
        self.seen = 0

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
        # were not checked up front), with the batch transform applied.
        if self.stream is None:
            batch = tuple(t[item] for t in self.tensors)
        else:
            batch = item
            if self.check is not None and is_validation_enabled():
                self.check(*(self.transform(batch) if self.transform is not None else batch))
        return tuple(self.transform(batch)) if self.transform is not None else batch


def _objectives(model, guide, data, loss, batch_size) -> list[Objective]:
    if isinstance(model, Objective) or (
        isinstance(model, (list, tuple)) and model and isinstance(model[0], Objective)
    ):
        objectives = [model] if isinstance(model, Objective) else list(model)
        if guide is not None or data is not None or loss is not None:
            raise ValueError("pass either objectives, or model, guide and data (and loss)")
        if not all(isinstance(o, Objective) for o in objectives):
            raise ValueError("every objective must be a pyrovae.Objective")
        return objectives
    if guide is None or data is None:
        raise ValueError("fit needs a model, a guide and data (or a list of pyrovae.Objective)")
    return [Objective(model, guide, data, loss)]


def _check_args(epochs, batch_size, lr) -> None:
    count("epochs", epochs)
    count("batch_size", batch_size)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")


def _check_data(term: _Term, val) -> None:
    # A pyrovae VAE checks its data once (shapes, support), since replayed steps check nothing;
    # streamed data are checked batch by batch instead.
    if term.check is None or not is_validation_enabled():
        return
    if term.tensors is not None:
        tensors = term.tensors
        term.check(*(term.transform(tensors) if term.transform is not None else tensors))
    if val is not None and not isinstance(val, Stream):
        term.check(*val)


def _check_amortized(guide: Callable, rows: int) -> None:
    # An AutoGuide with latent sites in the plate over the batch is not amortized (refused);
    # one over global latents only (as in Pyro's examples/svi_lightning.py) is fine.
    from pyro.infer.autoguide import AutoGuide

    owner = guide if isinstance(guide, nn.Module) else getattr(guide, "__self__", None)
    trace = getattr(owner, "prototype_trace", None) if isinstance(owner, AutoGuide) else None
    if trace is None:
        return
    local = [
        name
        for name, site in trace.iter_stochastic_nodes()
        if not isinstance(site["fn"], _Subsample)
        and any(f.size == rows for f in site["cond_indep_stack"])
    ]
    if local:
        raise ValueError(
            f"the guide is a {type(owner).__name__}, which holds one set of parameters per "
            f"datapoint of the plate it first saw (sites {', '.join(local)}): it is not "
            "amortized, so it cannot be trained on shuffled batches or score new data. A VAE's "
            "guide maps x to q(z|x) with a network (an encoder): use pyrovae.VAE, or write "
            "guide(x) that calls an encoder"
        )


class _SubsampleWatch(poutine.messenger.Messenger):
    # Watches a pair's plates on its first run on a batch of ``rows`` datapoints. A plate that
    # subsamples exactly the batch it is given, pyro.plate(name, N, subsample_size=len(x)) (Pyro's
    # minibatch idiom for global latents, as in examples/svi_lightning.py), scales the batch's
    # log-likelihood by N / rows: its loss estimates the whole data's, and ``full`` = N. A plate
    # that subsamples anything else is refused: fit hands the pair its batches.
    def __init__(self, rows: int):
        super().__init__()
        self.rows, self.full = rows, None

    def _process_message(self, msg) -> None:
        fn = msg.get("fn")
        if msg["type"] == "sample" and isinstance(fn, _Subsample):
            if fn.subsample_size is not None and 0 < fn.subsample_size < fn.size:
                if fn.subsample_size != self.rows:
                    raise ValueError(_subsample_advice(msg["name"], fn.size, fn.subsample_size))
                self.full = fn.size


def _watched(elbo_module: Callable, batch: tuple) -> tuple[torch.Tensor, int | None]:
    """A pair's loss on its first batch, with its plates watched (:class:`_SubsampleWatch`):
    the loss, and the full size its plate scales the batch up to (``None`` if it does not)."""
    try:
        with _SubsampleWatch(len(batch[0])) as watch:
            loss = elbo_module(*batch)
    except ValueError as e:  # Pyro appends the trace's shapes: keep the first line
        first = (str(e).splitlines() or [""])[0]
        if "pyrovae.fit hands the pair" in first:
            raise ValueError(first) from None
        if "subsample_size" in first:
            raise ValueError(f"{first}; {_subsample_advice('data', 'N', 'B')}") from e
        raise
    return loss, watch.full


def _subsample_advice(name, size, subsample_size) -> str:
    return (
        f"the pair subsamples its plate {name!r} itself (size {size}, subsample_size "
        f"{subsample_size}); pyrovae.fit hands the pair shuffled batches and covers every "
        f"datapoint once per epoch: write pyro.plate({name!r}, x.shape[0]) over the batch the "
        f"model is given, and pass batch_size={subsample_size} to fit"
    )


def _free_params(param_trace, modules) -> dict:
    # Plain pyro.param sites the loss reached, outside every module: {name: (leaf, constraint)}.
    owned = {id(p) for m in modules for p in m.parameters()}
    store = pyro.get_param_store()
    free = {}
    for name, site in param_trace.nodes.items():
        value = site["value"]
        leaf = value.unconstrained() if hasattr(value, "unconstrained") else value
        if isinstance(leaf, torch.Tensor) and leaf.grad is not None and id(leaf) not in owned:
            free[name] = (leaf, store._constraints.get(name, constraints.real))
    return free


def _first_step(terms: list[_Term], batches) -> tuple[torch.Tensor, object, list[nn.Module]]:
    # Eager, under Pyro's validation as set: the weighted loss with its gradients in place, the
    # param sites it read, and the modules it registered with pyro.module.
    found: list[nn.Module] = []
    losses = []
    with poutine.trace(param_only=True) as param_capture, recording_modules(found):
        for term, b in zip(terms, batches, strict=True):
            loss, term.full = _watched(term.elbo_module, b)
            _check_amortized(term.guide, len(b[0]))
            losses.append(loss)
    for site in param_capture.trace.nodes.values():  # count this loss's gradients only
        leaf = getattr(site["value"], "unconstrained", lambda: None)()
        if isinstance(leaf, torch.Tensor):
            leaf.grad = None
    modules = _modules_of(*(f for t in terms for f in (t.model, t.guide)), *found)
    for m in modules:
        m.zero_grad(set_to_none=True)
    loss = sum(t.weight * v for t, v in zip(terms, losses, strict=True))
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        raise ValueError(
            "the loss has nothing to train: the model and guide have no sample sites that depend "
            "on parameters (no pyro.sample inside, or no pyro.param/pyro.module/PyroModule)"
        )
    loss.backward()
    return losses, param_capture.trace, modules


class _Trainer:
    # What fit's epoch loop carries: the terms, the step engine (chosen on the first step), the
    # non-finite guard and the run's state.
    def __init__(self, terms, device, lr, optimizer, optim_args, fast: bool, state: TrainState):
        self.terms, self.device, self.state = terms, device, state
        self.lr, self.optimizer_cls, self.optim_args, self.fast = lr, optimizer, optim_args, fast
        self.engine: steps.StepEngine | None = None
        self.guard = NonFiniteGuard(device)
        lengths = [t.steps for t in terms]
        if None in lengths and len(terms) > 1:
            raise ValueError(
                "with several objectives every stream needs a length (a DataLoader has one)"
            )
        self.steps = None if None in lengths else max(lengths)

    def start(self, step: int, items: list) -> int:
        # The first step, eager: find the parameters, choose the engine (capturing the losses),
        # build the optimizer, then update with the first step's gradients.
        batches = [t.batch(i) for t, i in zip(self.terms, items, strict=True)]
        losses, param_trace, modules = _first_step(self.terms, batches)
        params = _params(param_trace, modules)
        if not params:
            raise ValueError("the model and guide have no trainable parameters")
        free = _free_params(param_trace, modules) if self.fast else {}
        self.engine = steps.build(
            self.terms, batches, modules, free, fast=self.fast, device=self.device,
            guard=self.guard, optimizer=lambda capturable: self.optimizer(params, capturable),
        )  # fmt: skip
        self.engine.start_epoch()
        self.guard.keep(params)
        return self.engine.update(step, batches, losses, backward=False)

    def optimizer(self, params, capturable: bool):
        # The run's optimizer, with Adam's moments where a resumed run left them.
        made = steps.make_optimizer(params, self.lr, self.optimizer_cls, self.optim_args,
                                    capturable)  # fmt: skip
        if self.state.optimizer is not None:
            load_moments(made[0], self.state.optimizer, params)
        return made

    def epoch(self, bar) -> None:
        # One epoch of steps; the guard holds the first bad step.
        for t in self.terms:
            t.start_epoch()
        self.guard.start_epoch()
        if self.engine is not None:
            self.engine.start_epoch()
        for step in itertools.count() if self.steps is None else range(self.steps):
            items = [t.next_index() for t in self.terms]
            if items[0] is None:  # the end of a stream of unknown length
                break
            run = self.engine.step if self.engine is not None else self.start
            bar.update(run(step, items))
            if self.guard.stopped:
                break
        if self.engine is None:
            raise ValueError("the training data gave no batches")
        bar.update(self.engine.end_epoch())

    def running_elbo(self) -> float | None:
        # The epoch's train ELBO per datapoint so far, for the progress bar.
        return self.engine.running_elbo() if self.engine is not None else None


def _record(trainer: _Trainer, epoch: int, start: float) -> dict:
    # The epoch's training metrics, per datapoint (one host sync).
    main = trainer.terms[0]
    parts = {t.name: -float(t.total) / max(t.seen, 1) for t in trainer.terms}
    record = {
        "epoch": epoch,
        "train_elbo": parts[main.name],
        "val_elbo": None,
        "seconds": time.perf_counter() - start,
        "parts": parts if len(trainer.terms) > 1 else None,
        "data_seconds": (
            sum(t.stream.wait for t in trainer.terms if t.stream is not None)
            if any(t.stream is not None for t in trainer.terms)
            else None
        ),
    }
    return record


def _val_elbo(trainer: _Trainer, val) -> float:
    main = trainer.terms[0]
    if not isinstance(val, Stream):
        return -float(_epoch_loss(main.step_loss, val, main.batch_size, main.full)) / len(val[0])
    total, n = 0.0, 0
    val.start_epoch()
    while (batch := val.next(cycle=False)) is not None:
        total += float(_epoch_loss(main.step_loss, batch, len(batch[0]), main.full))
        n += len(batch[0])
    return -total / n


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
) -> History:
    """Fit a model/guide pair (or several objectives) with SVI.

    Works for any pair that takes the batch tensors as positional arguments and puts datapoints
    in a plate, written in any of Pyro's styles: :class:`~pyrovae.VAE`'s ``model``/``guide``, a
    :class:`~pyro.nn.PyroModule`, or plain functions using ``pyro.module``/``pyro.param``.
    Modules the pair is bound to are moved to ``device``; parameters a plain function creates
    should be made on the data's device.

    The fast path (``fast=True``): the first step runs eagerly, under Pyro's validation as you
    have it set, and finds the parameters; then each loss is captured once
    (:func:`pyrovae.capture.capture`) and replayed on every later step without running Pyro's
    handlers, and on CUDA the whole step is replayed as a CUDA graph. Pyro's ``Trace_ELBO``,
    ``TraceMeanField_ELBO`` and ``TraceEnum_ELBO`` run as their no-sync twins
    (:func:`pyrovae.capture.no_sync`). A pair that cannot be replayed safely trains eagerly,
    and the ``pyrovae`` log says why, once. If the model is a method of an object with a
    ``check_data`` method (as :class:`~pyrovae.VAE` has), it is called once on the whole
    training and validation data first, since replayed steps run no per-step checks.

    The pair's plate covers the batch it is given (``pyro.plate(name, x.shape[0])``). A plate
    of the whole data's size that subsamples exactly that batch (``pyro.plate(name, N,
    subsample_size=len(x))``, Pyro's minibatch idiom for global latents) scales each batch's
    loss to the whole data's; the ELBO per datapoint is then the whole data's over ``N``.

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
    :param optimizer: a ``torch.optim`` class (default: Adam, fused where available).
    :param dict optim_args: its keyword arguments besides the parameters (``lr`` overrides the
        ``lr`` above), e.g. ``{"betas": (0.95, 0.999)}``.
    :param stream: ``True`` to stream a map-style Dataset through a DataLoader instead of
        collating it onto the device; ``None`` (default) streams DataLoaders, iterables and
        Datasets larger than :data:`pyrovae.batches.STREAM_BYTES`.
    :param int num_workers: DataLoader worker processes when a Dataset is streamed.
    :returns: the :class:`History` of per-epoch train/validation ELBO per datapoint (the epochs
        trained by this call).
    :raises ValueError: for bad arguments, data or pairs (checked before the first update).
    :raises NonFiniteLossError: if a loss is NaN/Inf; the parameters are restored to the end of
        the last good epoch first.
    """
    _check_args(epochs, batch_size, lr)
    device = resolve_device(device)
    objectives = _objectives(model, guide, data, loss, batch_size)
    terms = [_Term(o, i, device, batch_size, batch_transform, stream, num_workers)
             for i, o in enumerate(objectives)]  # fmt: skip
    val = None
    if val_data is not None and should_stream(val_data, stream):
        val = Stream(val_data, int(batch_size), num_workers, device, "validation data")
    elif val_data is not None:
        val = tuple(t.to(device) for t in as_tensors(val_data, "validation data"))
    _check_data(terms[0], val)
    state = state if state is not None else TrainState()
    if seed is not None:
        pyro.set_rng_seed(seed)
    restore_generators(state, device)
    for m in _modules_of(*(f for t in terms for f in (t.model, t.guide))):
        m.to(device)
    trainer = _Trainer(terms, device, lr, optimizer, optim_args, fast, state)
    return _epochs(trainer, int(state.epoch) + 1, int(epochs), val, callback, progress)


def _epochs(trainer: _Trainer, first: int, last: int, val, callback, progress) -> History:
    history, state, device = History(), trainer.state, trainer.device
    bar = TrainingBar(first, last, trainer.steps, trainer.running_elbo, enabled=progress)
    best = None  # the best validation ELBO so far, for the bar
    try:
        for epoch in range(first, last + 1):
            bar.start_epoch(epoch)
            start = time.perf_counter()
            trainer.epoch(bar)
            record = _record(trainer, epoch, start)
            last_step = (trainer.steps or 1) - 1
            trainer.guard.end_epoch(epoch, record["train_elbo"], last_step, history)
            record_state(state, epoch, trainer.engine.optimizer, device)
            if val is not None:
                record["val_elbo"] = _val_elbo(trainer, val)
            record["seconds"] = time.perf_counter() - start
            history.append(record)
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
    return history
