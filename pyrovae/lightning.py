"""Training any model/guide pair with Lightning: several devices and nodes (DDP), Lightning's
loggers and mixed precision.

The pattern is Pyro's ``examples/svi_lightning.py``: the pair's ``ELBOModule``
(``loss(model, guide)``) inside a :class:`lightning.LightningModule`, a torch optimizer, and
Lightning's DistributedDataParallel. What :func:`pyrovae.fit` does on one device is reused, not
rewritten: the same no-sync losses and captured replay (:mod:`pyrovae.capture`; DDP's gradient
all-reduce hooks sit on the parameters, so they fire on a replayed loss's backward pass too),
:class:`~pyrovae.KLSchedule` for warm-up and :class:`~pyrovae.EarlyStopping` for the best
weights, wrapped as Lightning callbacks.

Pitfalls it designs for: every parameter must live in a module (Pyro's global param store is
not synchronized by DDP, so a plain ``pyro.param`` site is refused); parameters created lazily
are created before DDP wraps the model (one batch runs when the module is built) and a pair that
creates more after that is refused; ``nn.DataParallel`` breaks Pyro's plates, so only DDP.

Each rank trains on its shard of the data (:class:`~torch.utils.data.DistributedSampler`,
seeded, reshuffled every epoch); the train and validation ELBO are summed over ranks and divided
by the number of datapoints, so they are per datapoint over the whole split. Validation shards
are disjoint and unpadded: every image is scored exactly once.

``lightning`` is an optional dependency (``pip install lightning``); this module imports it, and
``import pyrovae`` does not import this module.

References:
[1] Pyro's examples/svi_lightning.py, https://github.com/pyro-ppl/pyro
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import lightning as L
import pyro
import torch
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    TensorDataset,
    default_collate,
)

from .batches import should_stream, validation_streams
from .data import as_tensors
from .errors import DataError, count
from .nonfinite import NonFiniteGuard
from .pair import (
    Objective,
    Term,
    as_objectives,
    capture_terms,
    check_data,
    check_fit_args,
    discover,
    epoch_record,
    validation_elbo,
    validation_seed,
)
from .schedules import Clock, KLSchedule
from .selection import EarlyStopping
from .state import TrainState, load_moments
from .state import record as record_state
from .steps import make_optimizer, replay

__all__ = [
    "PairModule",
    "ShardedData",
    "EpochCallback",
    "KLWarmup",
    "SelectBest",
    "LogEpoch",
    "fit",
]


class PairModule(L.LightningModule):
    """A model/guide pair and its loss (or several objectives) as a
    :class:`lightning.LightningModule`.

    One batch runs when it is built (:func:`pyrovae.pair.discover`, as :func:`pyrovae.fit`'s
    first step): it creates the parameters a pair makes lazily (before DDP wraps the module)
    and finds the modules that hold them (those the pair is bound to, and those it registers
    with ``pyro.module``). With several :class:`~pyrovae.Objective`, every step takes one batch
    of each and minimizes Σ weight × loss, as :func:`pyrovae.fit` does. After every epoch the
    validation data of the run's :class:`ShardedData` are scored with the first objective's
    pair by :func:`pyrovae.pair.validation_elbo` (the unscaled ELBO, as ``fit`` scores it).

    :param model: a Pyro model, called as ``model(*batch)``; or a list of
        :class:`~pyrovae.Objective` (then ``guide`` is ``None``, ``loss`` too, and ``example``
        is a list of batches, one per objective).
    :param guide: the matching guide.
    :param example: a batch (tensor or tuple of tensors) of the data, to build the parameters.
    :param loss: a Pyro ELBO (default :class:`~pyro.infer.Trace_ELBO`), run as its no-sync twin.
    :param float lr: the learning rate.
    :param optimizer: a ``torch.optim`` class (default Adam);
        or any callable ``(params, lr=..., **optim_args) -> Optimizer`` (e.g. one that gives
        some parameters a group of their own, as examples/air.py does for its baselines).
    :param dict optim_args: its keyword arguments besides the parameters.
    :param batch_transform: applied to each training batch of the (first) objective, e.g.
        dynamic binarization; the others use their data's ``batch_transform``, if any.
    :param bool fast: replay the captured loss where the pair allows it (else eager).
    :param TrainState state: where the run stands (epochs done, Adam's moments), updated after
        every epoch (see :func:`fit`).
    :param int seed: the validation draws' seed (as :class:`pyrovae.Trainer`'s).
    :param dict step_kwargs: keyword arguments for the (first) objective's pair on every step
        (:mod:`pyrovae.keywords`), as :func:`pyrovae.fit` takes them.
    :raises ValueError: for a pair with ``pyro.param`` sites outside modules, or none at all.
    """

    def __init__(self, model, guide: Callable | None, example, loss: ELBO | None = None,
                 lr: float = 1e-3, optimizer=None, optim_args: dict | None = None,
                 batch_transform: Callable | None = None, fast: bool = True,
                 state: TrainState | None = None, seed: int = 0,
                 step_kwargs: dict | None = None):  # fmt: skip
        super().__init__()
        if callable(model) and not isinstance(model, Objective):
            objectives, examples = [Objective(model, guide, None, loss)], [example]
        else:
            objectives, examples = as_objectives(model, guide, None, loss), list(example)
            if len(examples) != len(objectives):
                raise ValueError("give one example batch per objective")
        self.terms = [Term(o, i, batch_transform, step_kwargs) for i, o in enumerate(objectives)]
        for t in self.terms:  # the first step of the run's next epoch
            t.clock = Clock(int(state.epoch) if state is not None else 0, 0, None)
        self.pair = nn.ModuleList(self._build(examples))  # registered once, here
        self._n_sites = len(pyro.get_param_store())  # grows if the pair makes more parameters
        self.lr, self.optimizer_cls, self.optim_args = lr, optimizer, dict(optim_args or {})
        self.fast, self.val_seed = fast, int(seed)
        self.state = state if state is not None else TrainState()
        self.offset = int(self.state.epoch)  # epochs trained before this call
        self._example: list | None = None  # a batch of each objective, to capture the losses on
        self._record: dict | None = None
        self._started = time.perf_counter()
        self.check_batches = False  # check every training batch (streamed data)

    def _build(self, examples: list) -> list[nn.Module]:
        # The first step's discovery, without its update; free pyro.param sites are refused.
        batches = [t.prepare(as_tensors(e, "the example batch")) for t, e in
                   zip(self.terms, examples, strict=True)]  # fmt: skip
        for term, batch in zip(self.terms, batches, strict=True):
            if term.check is not None and is_validation_enabled():
                term.check(*batch)  # a clear error before the loss's (bad data)
        batches = [t.keyworded(b) for t, b in zip(self.terms, batches, strict=True)]
        found = discover(self.terms, batches)
        for p in found.params:
            p.grad = None
        if found.free:
            raise ValueError(
                f"pyro.param sites outside every module: {', '.join(found.free)}; DDP "
                "synchronizes module parameters only: hold them in a PyroModule (PyroParam) or "
                "nn.Module"
            )
        return found.modules

    @property
    def elbo(self) -> Callable:
        """The (first) objective's ELBOModule."""
        return self.terms[0].elbo_module

    @property
    def step_loss(self) -> Callable:
        """The loss the (first) objective's steps run: the ELBOModule, or its captured replay."""
        return self.terms[0].step_loss

    def configure_optimizers(self):
        # the optimizer fit builds (Adam, fused where available, by default)
        params = list(self.pair.parameters())
        return make_optimizer(params, self.lr, self.optimizer_cls, self.optim_args)[0]

    def on_train_start(self) -> None:
        params = list(self.pair.parameters())
        if self.state.optimizer is not None:  # continue with Adam's moments where they were
            load_moments(self.optimizers().optimizer, self.state.optimizer, params)
        # NaN/Inf as in fit, deferred to the epoch's end on every rank (one cannot stop alone)
        self.guard = NonFiniteGuard(self.device, deferred=True)
        self.guard.keep(params)

    def on_train_epoch_start(self) -> None:
        self._record, self._started = None, time.perf_counter()
        for t in self.terms:
            t.start_epoch(self.device)
        self.guard.start_epoch()
        if self.fast and self._example is not None:  # after a whole eager epoch: see below
            self.fast = False
            capture_terms(self.terms, list(self.pair), self._example,
                          say=lambda m: self.print(f"pyrovae.lightning: {m}"))  # fmt: skip

    def training_step(self, batch, batch_idx):
        # one batch per objective (CombinedLoader's list with several)
        batches = [batch] if len(self.terms) == 1 else list(batch)
        batches = [t.prepare(b) for t, b in zip(self.terms, batches, strict=True)]
        if self.check_batches and self.terms[0].check is not None:
            self.terms[0].check(*batches[0])
        steps = self.trainer.num_training_batches
        for t in self.terms:
            t.clock = Clock(self.offset + self.current_epoch, batch_idx,
                            int(steps) if math.isfinite(steps) else None)  # fmt: skip
        batches = [t.keyworded(b) for t, b in zip(self.terms, batches, strict=True)]
        loss = 0.0
        for term, b in zip(self.terms, batches, strict=True):
            value = replay(term.step_loss, term.train_loss, b)  # −ELBO summed, as in fit
            term.add(value, len(b[0]))
            loss = loss + term.weight * value
        self.guard.finite(batch_idx, loss)  # the first bad step, kept on the device
        # The first epoch runs eagerly, so that every batch shape has run Pyro's handlers once
        # and a parameter made after the first batch is caught here; later epochs replay.
        if len(pyro.get_param_store()) > self._n_sites:
            raise ValueError(
                "the pair created parameters after its first batch; DDP cannot synchronize them: "
                "create every parameter when the modules are built (or on the first batch)"
            )
        if self._example is None:
            self._example = batches
        return loss

    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        # Σ over ranks of a [Σ, datapoints] pair
        return self.trainer.strategy.reduce(sums.to(self.device).clone(), reduce_op="sum")

    def epoch_record(self) -> dict:
        """The finished epoch's record, as :func:`pyrovae.fit` gives its callback
        (:func:`pyrovae.pair.epoch_record`): the train ELBO per datapoint over the whole split
        (every rank), the validation ELBO (:func:`pyrovae.pair.validation_elbo`), ``seconds``
        of training. Computed once per epoch; call it on every rank. It also brings
        :attr:`state` (a :class:`~pyrovae.TrainState`) to the end of the epoch, so a callback
        can save it.

        :raises NonFiniteLossError: on every rank, if a step's loss on any rank (or the epoch's
            ELBO) was not finite, after restoring the parameters to the end of the last good
            epoch, as :func:`pyrovae.fit` does."""
        if self._record is None:
            seconds = time.perf_counter() - self._started
            epoch = self.offset + self.current_epoch + 1
            record = epoch_record(epoch, self.terms, seconds, None, self._reduce)
            self._check_finite(record)
            data = self.trainer.datamodule
            val = data.validation(self.device) if data is not None else None
            if val is not None:
                main, seed = self.terms[0], validation_seed(self.val_seed, epoch)
                record["val_elbo"] = validation_elbo(main, val, seed, self._reduce)
            record_state(self.state, epoch, self.optimizers().optimizer, self.device)
            self._record = record
        return self._record

    def on_train_epoch_end(self) -> None:
        self.epoch_record()  # after the callbacks' (which call it first): once per epoch, always

    def _check_finite(self, epoch_record: dict) -> None:
        # The first bad step over all ranks (the earliest), then fit's check of the epoch.
        bad = self.guard.bad_step
        never = torch.iinfo(bad.dtype).max
        first = self.all_gather(torch.where(bad < 0, never, bad)).min()
        self.guard.bad_step = torch.where(first == never, -1, first)
        train = epoch_record["train_elbo"]
        last_step = max(int(self.trainer.num_training_batches) - 1, 0)
        self.guard.end_epoch(epoch_record["epoch"], 0.0 if train is None else train, last_step)


class ShardedData(L.LightningDataModule):
    """Training and validation data, sharded over the ranks of the run.

    Training: a :class:`~torch.utils.data.DistributedSampler` per rank (seeded, reshuffled each
    epoch by Lightning's ``set_epoch``); with several training sets (one per objective), one
    sampler each, combined by Lightning's ``CombinedLoader`` in ``max_size_cycle`` mode: an
    epoch is a pass over the largest, the others cycle, as in :func:`pyrovae.fit`.
    Validation (:meth:`validation`): scored by the module after every epoch, each block by
    one rank. Use with ``Trainer(use_distributed_sampler=False)``.

    Data in memory are collated once into tensors and batched by index. A map-style Dataset
    that streams (:func:`pyrovae.batches.should_stream`: ``stream=True``, or larger than
    :data:`~pyrovae.batches.STREAM_BYTES`) is read item by item by a DataLoader on each rank,
    over the same sampler, its ``num_workers`` worker processes decoding while the model trains.

    :param train: training data (tensor, tuple of tensors or Dataset), or a list of them.
    :param valid: optional validation data.
    :param batch_size: datapoints per step on each rank (an int, or one per training set).
    :param int seed: the shuffling seed.
    :param stream: ``True`` to stream map-style Datasets, ``None`` to decide by size.
    :param int num_workers: DataLoader workers per rank for a streamed Dataset.
    :raises DataError: for a DataLoader or iterable of batches (it cannot be sharded: pass its
        Dataset).
    """

    def __init__(self, train, valid=None, batch_size: int | list[int] = 128, seed: int = 0,
                 stream: bool | None = None, num_workers: int = 0):  # fmt: skip
        super().__init__()
        several = isinstance(train, list)
        sets = train if several else [train]
        sizes = batch_size if isinstance(batch_size, list) else [batch_size] * len(sets)
        if len(sizes) != len(sets):
            raise ValueError("give one batch size per training set")
        what = ["training data"] + [f"the data of objective {i + 1}" for i in range(1, len(sets))]
        self.sets = [_held(d, w, stream) for d, w in zip(sets, what, strict=True)]
        self.train = self.sets if several else self.sets[0]
        self.valid = None if valid is None else _held(valid, "validation data", stream, True)
        self.sizes = [count("batch_size", b) for b in sizes]
        self.batch_size, self.seed = self.sizes[0], int(seed)
        self.num_workers = int(num_workers)

    def streamed(self, data) -> bool:
        """Whether ``data`` (one of :attr:`sets`, or :attr:`valid`) is streamed."""
        return not isinstance(data, TensorDataset)

    def example(self, i: int) -> tuple[torch.Tensor, ...]:
        """The first batch of training set ``i``, to build the parameters on."""
        data, size = self.sets[i], self.sizes[i]
        if not self.streamed(data):
            return data[: min(len(data), size)]
        return as_tensors(default_collate([data[j] for j in range(min(len(data), size))]),
                          "the example batch")  # fmt: skip

    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self):
        world, rank = self._ranks()
        loaders = []
        for i, (data, size) in enumerate(zip(self.sets, self.sizes, strict=True)):
            seed = self.seed + 1_000_003 * i  # each set its own order
            sampler = DistributedSampler(data, world, rank, shuffle=True, seed=seed)
            loaders.append(self._batches(data, sampler, size))
        if len(loaders) == 1:
            return loaders[0]
        from lightning.pytorch.utilities import CombinedLoader

        return CombinedLoader(loaders, mode="max_size_cycle")

    def validation(self, device):
        """The validation data as :func:`pyrovae.pair.validation_elbo` takes them: every
        tensor on ``device`` (each rank holds them all; the scoring shares the blocks out), or,
        streamed, this rank's batches (images r, r + W, r + 2W, …: disjoint, unpadded);
        ``None`` without validation data."""
        if self.valid is None:
            return None
        if not self.streamed(self.valid):
            return tuple(t.to(device) for t in self.valid.tensors)
        world, rank = self._ranks()
        shard = range(rank, len(self.valid), world)
        batches = self._batches(self.valid, shard, max(self.batch_size, 256))
        return (tuple(t.to(device) for t in as_tensors(b, "validation data")) for b in batches)

    def _batches(self, data, sampler, batch_size: int) -> DataLoader:
        if self.streamed(data):  # items read and collated by the loader (and its workers)
            return DataLoader(data, batch_size=batch_size, sampler=sampler,
                              num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0)  # fmt: skip
        # whole batches taken by index from the tensors (no per-image collation)
        return DataLoader(data, sampler=_EpochBatches(sampler, batch_size, drop_last=False),
                          batch_size=None)  # fmt: skip


def _held(data, what: str, stream: bool | None, validation: bool = False):
    # A set as ShardedData holds it: its tensors, or a map-style Dataset to stream.
    streams = validation_streams(data, stream) if validation else should_stream(data, stream)
    if not streams:
        return TensorDataset(*as_tensors(data, what))
    if not (isinstance(data, Dataset) and hasattr(data, "__getitem__")):
        raise DataError(
            f"{what}: the Lightning engine shards a map-style Dataset over its ranks; a "
            "DataLoader or iterable of batches cannot be sharded: pass its Dataset"
        )
    return data


class _EpochBatches(BatchSampler):
    # Batches of indices; passes Lightning's set_epoch on to the DistributedSampler inside.
    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class EpochCallback(L.Callback):
    """Calls ``callback(record)`` after every epoch on every rank, as :func:`pyrovae.fit` does;
    ``True`` from any rank stops training. The record is :meth:`PairModule.epoch_record`.

    :param callback: a function of the epoch's record (a dict).
    """

    def __init__(self, callback: Callable[[dict], bool | None]):
        self.callback = callback

    def on_train_epoch_end(self, trainer, pl_module: PairModule) -> None:
        stop = bool(self.callback(pl_module.epoch_record()))
        if trainer.strategy.reduce_boolean_decision(stop, all=False):
            trainer.should_stop = True


class KLWarmup(EpochCallback):
    """KL warm-up as a Lightning callback: :class:`~pyrovae.KLSchedule` sets β for each epoch
    and records the finished epoch's β in its record.

    :param KLSchedule schedule: the schedule (its target is the model with the ``beta``).
    """

    def __init__(self, schedule: KLSchedule):
        super().__init__(schedule)

    def on_train_start(self, trainer, pl_module: PairModule) -> None:
        self.callback.set_epoch(pl_module.offset + 1)


class SelectBest(EpochCallback):
    """Early stopping and the best weights as a Lightning callback: :class:`~pyrovae.EarlyStopping`
    reads the epoch's validation ELBO (summed over ranks) from the record, keeps the best
    weights (its ``on_improve`` saves a checkpoint) and stops after its patience.

    :param EarlyStopping stopper: the selection rule.
    """

    def __init__(self, stopper: EarlyStopping):
        super().__init__(stopper)


class LogEpoch(L.Callback):
    """Send each epoch's record to the trainer's logger (e.g. TensorBoard): every number in it
    (ELBO, its reconstruction and KL parts, β, active units, …, and each objective's ELBO as
    ``train_elbo/NAME`` with several) as a scalar at step = epoch,
    and every ``every`` epochs image grids of reconstructions and prior samples.

    Put it after the callbacks that fill the record (:class:`KLWarmup`, :class:`SelectBest`,
    :class:`EpochCallback`).

    :param vae: the model, with ``reconstruct`` and ``sample`` (e.g. :class:`~pyrovae.VAE`);
        ``None`` logs no images.
    :param images: images ``(n, C, H, W)`` to reconstruct.
    :param int every: epochs between image grids (0: none).
    """

    def __init__(self, vae=None, images: torch.Tensor | None = None, every: int = 5):
        self.vae, self.images, self.every = vae, images, int(every)

    def on_train_epoch_end(self, trainer, pl_module: PairModule) -> None:
        record = pl_module.epoch_record()
        if trainer.logger is None or trainer.global_rank != 0:
            return
        parts = {f"train_elbo/{k}": v for k, v in (record.get("parts") or {}).items()}
        numbers = {
            k: float(v)
            for k, v in {**record, **parts}.items()
            if isinstance(v, (int, float)) and k != "epoch" and math.isfinite(v)
        }
        trainer.logger.log_metrics(numbers, step=record["epoch"])
        if self.vae is not None and self.every and record["epoch"] % self.every == 0:
            self._images(trainer.logger.experiment, record["epoch"])

    def _images(self, writer, epoch: int) -> None:
        from torchvision.utils import make_grid

        device = next(self.vae.parameters()).device
        with torch.no_grad():
            x = self.images.to(device)
            pairs = torch.stack([x, self.vae.reconstruct(x)], 1).flatten(0, 1)  # (2n, C, H, W)
            samples = self.vae.sample(len(x))
        for tag, images in (("reconstructions", pairs), ("samples", samples)):
            images = images.cpu().clamp(0, 1)
            if images.shape[-1] < 32:  # tiny images (8×8 digits): 4× larger, pixels kept
                images = torch.nn.functional.interpolate(images, scale_factor=4.0)
            writer.add_image(tag, make_grid(images, nrow=8, pad_value=0.5), epoch)


def fit(
    model,
    guide: Callable | None = None,
    data=None,
    *,
    val_data=None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    loss: ELBO | None = None,
    seed: int = 0,
    callbacks: list[L.Callback] | None = None,
    fast: bool = True,
    optimizer=None,
    optim_args: dict | None = None,
    state: TrainState | None = None,
    stream: bool | None = None,
    num_workers: int = 0,
    step_kwargs: dict | None = None,
    **trainer_args,
) -> L.Trainer:
    """Train a pair (or several objectives) with Lightning; the counterpart of
    :func:`pyrovae.fit` for several devices.

    :param model: a Pyro model, called as ``model(*batch)``; or a list of
        :class:`~pyrovae.Objective` (then pass no ``guide``, ``data`` or ``loss``): every step
        takes one batch of each objective's data (its shard on this rank) and minimizes
        Σ weight × loss.
    :param guide: the matching guide.
    :param data: training data (tensor, tuple of tensors or Dataset).
    :param val_data: optional validation data, scored every epoch with the (first) objective
        (per datapoint, all ranks).
    :param int epochs: passes over the data (over the largest objective's, with several).
    :param int batch_size: datapoints per step *on each rank* (an objective's own
        ``batch_size`` overrides it).
    :param float lr: the learning rate.
    :param loss: a Pyro ELBO (default ``Trace_ELBO``).
    :param int seed: seeds the data order; rank r draws its noise from ``seed + r``.
    :param callbacks: Lightning callbacks (e.g. :class:`KLWarmup`, :class:`SelectBest`).
    :param bool fast: replay the captured loss where the pair allows it.
    :param optimizer: a ``torch.optim`` class (default Adam);
        or any callable ``(params, lr=..., **optim_args) -> Optimizer`` (e.g. one that gives
        some parameters a group of their own, as examples/air.py does for its baselines).
    :param dict optim_args: its keyword arguments besides the parameters.
    :param TrainState state: continue a run (from one engine or the other): epochs
        ``state.epoch + 1 .. epochs`` are trained, Adam starts from ``state.optimizer``; the
        model's weights must be those of ``state.epoch``. Updated in place after every epoch
        (``trainer.lightning_module.state``). Continuing on another number of processes changes
        the data order, so the result is not the uninterrupted run's bit for bit.
    :param stream: ``True`` to stream map-style Datasets through a DataLoader on each rank
        (data larger than memory) instead of collating them; ``None`` (default) streams those
        larger than :data:`pyrovae.batches.STREAM_BYTES` (see :class:`ShardedData`).
    :param int num_workers: DataLoader worker processes per rank for a streamed Dataset.
    :param dict step_kwargs: keyword arguments for the (first) objective's pair on every step,
        ``{name: constant or schedule}``, as :func:`pyrovae.fit` takes them (the clock is the
        epoch and the step of this rank's shard, the same on every rank).
    :param trainer_args: passed to :class:`lightning.Trainer` (``devices``, ``num_nodes``,
        ``strategy``, ``accelerator``, ``precision``, ``logger``, …).
    :returns: the trainer (``trainer.lightning_module`` is the trained :class:`PairModule`).
    """
    done = 0 if state is None else int(state.epoch)
    check_fit_args(epochs, batch_size, lr, done)
    objectives = as_objectives(model, guide, data, loss)
    sizes = [int(o.batch_size if o.batch_size is not None else batch_size) for o in objectives]
    data_module = ShardedData([o.data for o in objectives], val_data, sizes, seed + done, stream,
                              num_workers)  # fmt: skip
    pyro.set_rng_seed(seed)
    examples = [data_module.example(i) for i in range(len(objectives))]
    module = PairModule(objectives, None, examples, None, lr, optimizer, optim_args, None, fast,
                        state, seed, step_kwargs)  # fmt: skip
    _check_data(module, data_module)
    args = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "log_every_n_steps": 1, **trainer_args}  # fmt: skip
    trainer = L.Trainer(max_epochs=int(epochs) - done, callbacks=list(callbacks or []),
                        use_distributed_sampler=False, **args)  # fmt: skip
    seed_ranks = _SeedRanks(seed + 7919 * done)
    trainer.callbacks.insert(0, seed_ranks)
    trainer.fit(module, datamodule=data_module)
    return trainer


def _check_data(module: PairModule, data: ShardedData) -> None:
    # As fit does (pyrovae.pair.check_data): data in memory once, streamed training batches
    # as they come (PairModule.check_batches).
    for i, (term, held) in enumerate(zip(module.terms, data.sets, strict=True)):
        streamed = data.streamed(held)
        module.check_batches |= i == 0 and streamed
        check_data(term, None if streamed else held.tensors)
    valid = data.valid
    if valid is not None and not data.streamed(valid):
        check_data(module.terms[0], None, valid.tensors)


class _SeedRanks(L.Callback):
    # Each rank draws its own noise (seed + rank), the same on every run.
    def __init__(self, seed: int):
        self.seed = seed

    def on_train_start(self, trainer, pl_module) -> None:
        pyro.set_rng_seed(self.seed + trainer.global_rank)
