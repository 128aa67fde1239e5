"""The pair core: what both training engines (:func:`pyrovae.fit` and
:mod:`pyrovae.lightning`) do with a model/guide pair, written once.

- :class:`Objective` and :func:`as_objectives`: what is minimized (one pair, or several with
  their own data and weights) and :func:`check_fit_args`, the checks of both ``fit`` s.
- :class:`Term`: an objective at run time: its no-sync ``ELBOModule``, the loss each step runs
  (eager, or its captured replay: :func:`capture_terms`), and the epoch's running sums.
- :func:`discover`: the first, eager step: it creates the parameters a pair makes lazily and
  finds the modules and ``pyro.param`` sites that hold them (:class:`Discovery`).
- :func:`check_data`: a pyrovae VAE's one-off data check (replayed steps check nothing).
- :func:`validation_elbo`: the validation score of both engines, the unscaled ELBO per
  datapoint (:func:`pyrovae.elbo`'s estimator) whatever the training loss (KL warm-up, IWAE,
  several objectives): what selects the best epoch is the same number on both.
- :func:`epoch_record`: the record of an epoch that both engines hand their callbacks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, TraceEnum_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.subsample_messenger import _Subsample
from torch import nn
from torch.distributions import constraints

from .capture import capture, recording_modules
from .errors import CaptureError, count
from .keywords import StepKeywords
from .nosync import NoSyncTrace_ELBO, no_sync
from .plates import subsample_advice
from .schedules import Clock

__all__ = [
    "Objective",
    "as_objectives",
    "check_fit_args",
    "Term",
    "Discovery",
    "discover",
    "modules_of",
    "capture_terms",
    "check_data",
    "batch_sum",
    "validation_elbo",
    "validation_seed",
    "epoch_record",
]

log = logging.getLogger("pyrovae")


@dataclass
class Objective:
    """One term of what :func:`pyrovae.fit` minimizes: a model/guide pair, its loss, and its own
    data.

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


def as_objectives(model, guide, data, loss) -> list[Objective]:
    """``fit``'s first arguments as a list of objectives: ``model`` is one objective or a list
    of them (then ``guide``, ``data`` and ``loss`` are ``None``), or a pair with its data.

    :raises ValueError: for a mix of both forms, or a pair without guide or data.
    """
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


def check_fit_args(epochs, batch_size, lr, done: int = 0) -> None:
    """The checks of both engines' ``fit`` arguments (``done``: epochs a continued run has).

    :raises ValueError: naming the argument.
    """
    count("epochs", epochs)
    count("batch_size", batch_size)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if done >= int(epochs) and done > 0:
        raise ValueError(f"the run has trained {done} epochs already; epochs must be > {done}")


def batch_sum(loss: torch.Tensor, rows: int, full: int | None) -> torch.Tensor:
    """A batch's loss as the sum over its ``rows`` datapoints, for the per-datapoint ELBO:
    ``loss`` itself; or, for a pair whose plate scales the batch up to ``full`` datapoints
    (``pyro.plate(name, full, subsample_size=rows)``, Pyro's minibatch idiom for global
    latents, whose loss estimates the whole data's), ``loss × rows / full``.

    :param loss: the batch's loss (−ELBO).
    :param int rows: datapoints in the batch.
    :param full: the plate's full size, or ``None`` for a plate over the batch itself.
    """
    return loss if full is None else loss * (rows / full)


class Term:
    """One objective at run time, in either engine: its no-sync ``ELBOModule``
    (``loss(model, guide)``), the loss each step runs (``step_loss``: the ``ELBOModule``, or
    its captured replay), its weight, name and batch transform, and the epoch's running sums.

    :param Objective objective: the objective.
    :param int i: its position (0: the main objective, which validation scores).
    :param batch_transform: applied to each training batch (default: ``data.batch_transform``).
    :param dict step_kwargs: keyword arguments fed to the (main) objective's pair every step
        (:mod:`pyrovae.keywords`); checked against its model and guide here.
    """

    def __init__(self, objective: Objective, i: int, batch_transform: Callable | None = None,
                 step_kwargs: dict | None = None):  # fmt: skip
        loss = objective.loss
        self.elbo_module = (no_sync(loss) if loss is not None else NoSyncTrace_ELBO())(
            objective.model, objective.guide
        )
        self.keywords = None
        if step_kwargs and i == 0:
            self.keywords = StepKeywords(step_kwargs, objective.model, objective.guide)
        # what a training step calls: the ELBOModule, taking the step's keywords if any
        self.train_loss = (
            self.keywords.bind(self.elbo_module) if self.keywords is not None else self.elbo_module
        )
        self.step_loss: Callable = self.train_loss  # replaced by the captured loss
        self.clock = Clock(0, 0, None)  # the step being prepared (set by the engine)
        self.model, self.guide = objective.model, objective.guide
        self.weight, self.name = float(objective.weight), objective.name or f"objective{i + 1}"
        if batch_transform is None or i > 0:
            batch_transform = getattr(objective.data, "batch_transform", None)
        self.transform = batch_transform
        # how the pair reads a batch, in validation as in training (pyrovae.sequences.Sequences)
        self.preparation = getattr(objective.data, "batch_preparation", None)
        self.full: int | None = None  # the full size its plate scales batches up to, if any
        check = getattr(getattr(objective.model, "__self__", None), "check_data", None)
        self.check = check if callable(check) else None  # a pyrovae VAE's data check
        self.total: torch.Tensor | float = 0.0  # the epoch's summed loss (on the device)
        self.seen = 0  # datapoints in it

    def prepare(self, batch) -> tuple[torch.Tensor, ...]:
        """A training batch as the pair sees it: a tuple, the batch transform applied."""
        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        return tuple(self.transform(batch)) if self.transform is not None else batch

    def keyworded(self, batch: tuple) -> tuple:
        """A prepared batch with the values of the step's scheduled keywords after its tensors
        (at :attr:`clock`), as :attr:`train_loss` takes it."""
        if self.keywords is None or not self.keywords.scheduled:
            return batch
        return batch + self.keywords.values(self.clock, batch[0].device)

    def start_epoch(self, device) -> None:
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.seen = 0

    def add(self, loss: torch.Tensor, rows: int) -> None:
        """Add a step's loss on ``rows`` datapoints to the epoch's sum (on the device: no host
        read)."""
        self.total += batch_sum(loss.detach(), rows, self.full)
        self.seen += rows


def modules_of(*fns: Callable) -> list[nn.Module]:
    """The modules that ``fns`` (models, guides) are, or are bound methods of, in order (a
    ``functools.partial`` of one counts as it)."""
    mods: list[nn.Module] = []
    for fn in fns:
        while isinstance(fn, functools.partial):
            fn = fn.func
        owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module) and all(owner is not m for m in mods):
            mods.append(owner)
    return mods


def check_data(term: Term, train: tuple | None, val: tuple | None = None) -> None:
    """A pyrovae VAE checks data in memory once (shapes, support), since replayed steps check
    nothing; streamed batches are checked as they come (:meth:`Term.prepare` callers).

    :param train: the training tensors (the batch transform is applied first), or ``None``.
    :param val: the validation tensors, or ``None``.
    """
    if term.check is None or not is_validation_enabled():
        return
    if train is not None:
        term.check(*term.prepare(train))
    if val is not None:
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
            if fn.subsample_size is not None and 0 < fn.subsample_size != fn.size:
                if fn.subsample_size != self.rows:
                    raise ValueError(subsample_advice(msg["name"], fn.size, fn.subsample_size))
                self.full = fn.size


def _watched(elbo_module: Callable, batch: tuple) -> tuple[torch.Tensor, int | None]:
    # A pair's loss on its first batch, with its plates watched (_SubsampleWatch): the loss,
    # and the full size its plate scales the batch up to (None if it does not).
    try:
        with _SubsampleWatch(len(batch[0])) as watch:
            loss = elbo_module(*batch)
    except ValueError as e:  # Pyro appends the trace's shapes: keep the first line
        first = (str(e).splitlines() or [""])[0]
        if "pyrovae.fit hands the pair" in first:
            raise ValueError(first) from None
        if "subsample_size" in first:
            raise ValueError(f"{first}; {subsample_advice('data', 'N', 'B')}") from e
        raise
    return loss, watch.full


@dataclass
class Discovery:
    """What the first step found: each term's loss (gradients in place), the modules that hold
    the pair's parameters, every trained parameter, and the ``pyro.param`` sites outside every
    module (``{name: (unconstrained leaf, constraint)}``)."""

    losses: list[torch.Tensor]
    modules: list[nn.Module]
    params: list[torch.Tensor]
    free: dict


def discover(terms: Sequence[Term], batches: Sequence[tuple]) -> Discovery:
    """The first step, eager, under Pyro's validation as set: run each term's loss on its batch
    (creating the parameters a pair makes lazily, finding the full size of a plate that
    scales its batch up), backpropagate the weighted loss, and find what holds the parameters:
    the modules the pairs are bound to or register with ``pyro.module``, and ``pyro.param``
    sites (as :class:`pyro.infer.SVI` collects them, those the backward pass reached: a
    same-named tensor the global param store holds from another model is left out).

    :raises ValueError: for a pair with nothing to train, or one that is not amortized.
    """
    found: list[nn.Module] = []
    losses = []
    with poutine.trace(param_only=True) as param_capture, recording_modules(found):
        for term, b in zip(terms, batches, strict=True):
            loss, term.full = _watched(term.train_loss, b)
            _check_amortized(term.guide, len(b[0]))
            losses.append(loss)
    sites = param_capture.trace.nodes
    for site in sites.values():  # count this loss's gradients only
        leaf = getattr(site["value"], "unconstrained", lambda: None)()
        if isinstance(leaf, torch.Tensor):
            leaf.grad = None
    modules = modules_of(*(f for t in terms for f in (t.model, t.guide)), *found)
    for m in modules:
        m.zero_grad(set_to_none=True)
    loss = sum(t.weight * v for t, v in zip(terms, losses, strict=True))
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        raise ValueError(
            "the loss has nothing to train: the model and guide have no sample sites that depend "
            "on parameters (no pyro.sample inside, or no pyro.param/pyro.module/PyroModule)"
        )
    loss.backward()
    params, free = _reached(sites, modules)
    if not params:
        raise ValueError("the model and guide have no trainable parameters")
    return Discovery(losses, modules, params, free)


def _reached(sites: dict, modules: Sequence[nn.Module]) -> tuple[list, dict]:
    # The modules' parameters, then the pyro.param leaves the backward pass reached; and of
    # those, the ones outside every module (with their constraints).
    seen: dict[int, torch.Tensor] = {}
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    owned, store, free = set(seen), pyro.get_param_store(), {}
    for name, site in sites.items():
        value = site["value"]
        leaf = value.unconstrained() if hasattr(value, "unconstrained") else value
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.grad is not None:
            seen.setdefault(id(leaf), leaf)
            if id(leaf) not in owned:
                free[name] = (leaf, store._constraints.get(name, constraints.real))
    return list(seen.values()), free


def capture_terms(terms: Sequence[Term], modules, batches, free: dict | None = None,
                  say: Callable[[str], None] | None = None) -> list[bool]:  # fmt: skip
    """Replay each term's loss from now on where the pair allows it
    (:func:`pyrovae.capture.capture`), else keep it eager and say why, once.

    :param modules: the modules holding the parameters (:class:`Discovery`).
    :param batches: a batch of each term to record on.
    :param dict free: ``pyro.param`` sites outside every module (graph inputs).
    :param say: where the reason goes (default: the ``pyrovae`` log, as a warning).
    :returns: whether each term was captured.
    """
    done = []
    for term, batch in zip(terms, batches, strict=True):
        try:
            term.step_loss = capture(term.train_loss, list(modules), batch, free=free)
        except CaptureError as e:
            (say or log.warning)(f"{term.name} trains eagerly, its loss cannot be replayed: {e}")
            done.append(False)
            continue
        log.info("pyrovae: replaying the captured loss of %s", term.name)
        done.append(True)
    return done


def _loss_sum(term: Term, batch: tuple) -> torch.Tensor:
    # −(the training loss) summed over a batch, without gradients, on the device (for pairs
    # pyrovae.elbo cannot score: global latents). TraceEnum_ELBO refuses to run without
    # gradients: it gets them, and they are dropped.
    grads = isinstance(getattr(term.elbo_module, "elbo", None), TraceEnum_ELBO)
    if term.preparation is not None:
        batch = tuple(term.preparation(batch))
    with torch.set_grad_enabled(grads):
        return -batch_sum(term.elbo_module(*batch).detach(), len(batch[0]), term.full)


def _scores(term: Term, batch: tuple, seed: int | None) -> torch.Tensor:
    # The validation ELBO summed over a batch: pyrovae.elbo's (unscaled densities, whatever β
    # the model trains with), or the loss's for a pair that elbo cannot score (said once).
    from .evaluation import elbo

    if getattr(term, "scored_by_loss", False):
        return _loss_sum(term, batch).double()
    try:
        return elbo(term.model, term.guide, batch, seed=seed,
                    batch_transform=term.preparation).double().sum()  # fmt: skip
    except (ValueError, NotImplementedError) as e:
        term.scored_by_loss = True
        log.warning("pyrovae: the validation ELBO of %s is its training loss's (pyrovae.elbo "
                    "cannot score the pair: %s)", term.name, str(e).splitlines()[0])  # fmt: skip
    return _loss_sum(term, batch).double()


def validation_elbo(term: Term, val, seed: int, reduce: Callable | None = None) -> float | None:
    """The validation score of both engines: the ELBO per datapoint of ``term``'s pair, from
    unscaled densities with one particle (:func:`pyrovae.elbo`), whatever the training loss
    (KL warm-up, IWAE, several objectives); the training loss's for a pair that ``elbo``
    cannot score (global latents). Draws from ``seed`` and leaves the generators as they were.

    :param val: the validation tensors in memory (every rank holds them all: inside a
        ``torch.distributed`` group :func:`pyrovae.elbo` deals the blocks out over the ranks),
        or an iterable of this rank's batches (streamed).
    :param int seed: the draws' seed (:func:`validation_seed`).
    :param reduce: sums a ``(2,)`` tensor ``[Σ ELBO, datapoints]`` over the ranks, for
        streamed batches (default: one process).
    :returns: nats per datapoint, or ``None`` for no data.
    """
    with torch.no_grad() if not _enum(term) else contextlib.nullcontext():
        if isinstance(val, tuple):
            with torch.random.fork_rng(devices=_cuda(val)):
                torch.manual_seed(seed)
                return float(_scores(term, val, seed)) / len(val[0])
        total = None
        for i, batch in enumerate(val):
            with torch.random.fork_rng(devices=_cuda(batch)):
                torch.manual_seed(seed + i)
                value = _scores(term, batch, None)
            pair = torch.stack([value, torch.tensor(float(len(batch[0])), device=value.device,
                                                     dtype=value.dtype)])  # fmt: skip
            total = pair if total is None else total + pair
    if reduce is not None:
        total = reduce(total if total is not None else torch.zeros(2, dtype=torch.float64))
    if total is None or float(total[1]) == 0:
        return None
    return float(total[0] / total[1])


def _enum(term: Term) -> bool:
    return isinstance(getattr(term.elbo_module, "elbo", None), TraceEnum_ELBO)


def _cuda(tensors) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def validation_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's validation draws: fresh noise every epoch, the same for every
    engine and number of processes."""
    return (int(seed) * 1_000_003 + int(epoch)) % 2**63


def epoch_record(
    epoch: int,
    terms: Sequence[Term],
    seconds: float,
    val_elbo: float | None,
    reduce: Callable | None = None,
    data_seconds: float | None = None,
) -> dict:
    """The record of a finished epoch that both engines hand their callbacks: ``epoch``
    (1-based), ``train_elbo`` (the main objective's ELBO per datapoint), ``val_elbo``
    (:func:`validation_elbo`), ``seconds`` (of training), ``parts`` (with several objectives,
    each one's ELBO per datapoint; else ``None``), ``data_seconds`` (seconds waited for
    streamed batches; else ``None``) and ``step_kwargs`` (with ``step_kwargs`` schedules, each
    one's value at the epoch's last step, ``{"annealing_factor": 0.6}``; else ``None``).

    :param reduce: sums each term's ``(2,)`` tensor ``[Σ loss, datapoints]`` over the ranks
        (default: one process).
    """
    parts = {}
    for t in terms:
        sums = torch.stack([torch.as_tensor(t.total, dtype=torch.float64).reshape(()).cpu(),
                            torch.tensor(float(t.seen), dtype=torch.float64)])  # fmt: skip
        sums = reduce(sums) if reduce is not None else sums
        parts[t.name] = -float(sums[0]) / max(float(sums[1]), 1.0)
    keywords = terms[0].keywords
    return {
        "epoch": epoch,
        "train_elbo": parts[terms[0].name],
        "val_elbo": val_elbo,
        "seconds": seconds,
        "parts": parts if len(terms) > 1 else None,
        "data_seconds": data_seconds,
        "step_kwargs": dict(keywords.last) if keywords is not None and keywords.last else None,
    }
