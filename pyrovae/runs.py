"""A training run from start to finish, for the CLI and for both engines: the data of a
:class:`~pyrovae.Config`, a new run or the continuation of one saved in a run directory, the
per-epoch work (KL warm-up, early stopping and the best checkpoint, the ELBO's parts, test
log p(x), the state that ``pyrovae resume`` continues from), the summary and the figures.

:func:`run_training` trains with :func:`pyrovae.fit` on one device or, given launch options,
with :mod:`pyrovae.lightning` over several processes; the per-epoch function is the same for
both, so a run of one engine can be continued by the other. ``pyrovae.cli`` parses options and
dispatches here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from .errors import CheckpointError
from .launch import launched_rank
from .rundir import (
    CONFIG,
    LAST,
    MANIFEST,
    STATE,
    SUMMARY,
    WEIGHTS,
    commit,
    committed,
    metrics_bytes,
    read_json,
    read_manifest,
    read_metrics,
    update_manifest,
)
from .rundir import METRICS as METRICS_FILE

if TYPE_CHECKING:
    from .runpair import RunPair

log = logging.getLogger("pyrovae")

__all__ = [
    "Run",
    "open_run",
    "record_epoch",
    "finish_run",
    "done",
    "fit_run",
    "make_loss",
    "draw_history",
    "run_training",
    "load_split",
    "draw_plots",
    "draw_figures",
    "run_device",
    "METRICS",
    "OPTIONS",
    "SAMPLE_TITLES",
    "FOLDER_OPTIONS",
    "absolute_dir",
    "data_dir_for",
    "binarize_note",
    "collapse_note",
    "prior_draws",
    "took",
]


def _resolve_binarize(config) -> str:
    if config.binarize != "auto":
        return config.binarize
    if config.likelihood != "bernoulli" or config.dataset == "binarized-mnist":
        return "none"
    return "threshold" if config.dataset == "digits" else "dynamic"


#: Config fields passed to pyrovae.data.load as reader options (the folder dataset's).
FOLDER_OPTIONS = ("image_size", "channels", "skip_bad_files", "valid_fraction", "test_fraction")


def load_split(config, split: str):
    from .data import load

    options = {key: getattr(config, key) for key in FOLDER_OPTIONS}
    # a missing, truncated or corrupt file is a DataError naming the file (pyrovae.data)
    return load(
        config.dataset, split, config.data_dir, config.binarize, config.download, config.seed,
        **options,
    )  # fmt: skip


def absolute_dir(path: str | None) -> str | None:
    """``path`` (``~`` expanded) as an absolute path, as a run records its ``--data-dir``: a
    relative one would only work from the folder the run was started in."""
    import os

    return None if path is None else os.path.abspath(os.path.expanduser(str(path)))


def data_dir_for(run_dir: Path, config, given: str | None) -> str | None:
    """The data folder a saved run reads from (``evaluate``, ``plot``, ``resume``): ``given``
    (``--data-dir``) made absolute, else the one the run recorded (a run of an older pyrovae
    recorded it as typed: relative to the current folder).

    :raises DataError: naming the recorded folder and ``--data-dir``, when it no longer exists.
    """
    from .errors import DataError

    if given is not None:
        return absolute_dir(given)
    recorded = config.data_dir
    if recorded is not None and not Path(recorded).expanduser().exists():
        raise DataError(
            f"{run_dir} was trained on data in {recorded}, which no longer exists; pass "
            "--data-dir to point to where the data is now"
        )
    return recorded


def _echo(config) -> None:
    # the settings of the run, those that differ from the defaults (config.json has them all)
    from .config import Config

    default = Config()
    names = [f.name for f in fields(config) if f.name != "x_shape"]
    changed = [
        f"{n}={getattr(config, n)}" for n in names if getattr(config, n) != getattr(default, n)
    ]
    print("config: " + (" ".join(changed) if changed else "the defaults"))
    note = binarize_note(config)
    if note:
        print(note)


def binarize_note(config) -> str:
    """A line saying how pixels are binarized for the Bernoulli likelihood (``--binarize``,
    ``auto`` resolved), or ``""`` when they are not: a grey folder trained as binary is a
    surprise otherwise."""
    how = {
        "dynamic": "binarized dynamically: each training batch a fresh Bernoulli draw of the grey "
        "values, validation and test one seeded draw",
        "static": "binarized once: one seeded Bernoulli draw of the grey values per image",
        "threshold": "binarized at 0.5",
    }.get(config.binarize)
    if how is None:
        return ""
    return (
        f"pixels: {config.dataset}'s images are {how} (--binarize {config.binarize}); to "
        "model grey values, pass --binarize none with a likelihood for them (gaussian, "
        "continuous-bernoulli, discretized-logistic)"
    )


def took(seconds: float, before: float) -> str:
    """``"12.3 s"``, or for a continued run ``"4.1 s (12.3 s in all, with earlier calls)"``."""
    if before <= 0:
        return f"{seconds:.1f} s"
    return f"{seconds - before:.1f} s ({seconds:.1f} s in all, with earlier calls)"


def _training_data(config, arrays: str | None = None):
    """The training split: an ImageDataset in memory (or the arrays of an ``.npz`` file), or for
    a folder that streams (--stream) a FolderDataset whose images DataLoader workers decode
    while the model trains."""
    from .batches import should_stream
    from .data import FolderDataset

    if arrays is not None:
        from .runpair import ArrayData

        data = _split(config, "train", arrays)
        if config.train_limit is None:
            return data
        return ArrayData(tuple(t[: config.train_limit] for t in data.tensors), "train", data.name)
    if config.dataset != "folder" or config.stream == "no" or config.data_dir is None:
        if config.stream == "yes":
            raise ValueError(f"--stream yes: only --dataset folder streams, not {config.dataset}")
        return _limited(load_split(config, "train"), config.train_limit)
    ds = FolderDataset(config.data_dir, "train", config.image_size, config.channels,
                       config.valid_fraction, config.test_fraction)  # fmt: skip
    # --skip-bad-files decodes up front (should_stream would probe file 0, which may be bad)
    if config.stream == "auto" and (config.skip_bad_files or not should_stream(ds, None)):
        return _limited(load_split(config, "train"), config.train_limit)
    if config.skip_bad_files:
        raise ValueError("--skip-bad-files needs the training images decoded up front: pass "
                         "--stream no, or remove the unreadable files")  # fmt: skip
    if config.train_limit is not None:  # the first N files, as for data in memory
        ds.files = ds.files[: config.train_limit]
        ds.labels = None if ds.labels is None else ds.labels[: config.train_limit]
    ds.batch_transform = _stream_binarization(config.binarize)
    return ds


def _stream_binarization(binarize: str):
    # --binarize for streamed training batches, as load applies it to data in memory
    from .data import dynamic_binarize, threshold_binarize

    if binarize == "static":
        raise ValueError("--binarize static draws each image once, in memory: pass --stream no, "
                         "or --binarize dynamic|threshold")  # fmt: skip
    return {"dynamic": dynamic_binarize, "threshold": threshold_binarize}.get(binarize)


def _limited(train, limit: int | None):
    from .data import ImageDataset

    if limit is None or limit >= len(train):
        return train
    labels = None if train.labels is None else train.labels[:limit]
    return ImageDataset(train.images[:limit], labels, train.name, train.split,
                        train.batch_transform)  # fmt: skip


#: Columns of metrics.csv: fit's record, the KL weight β of the epoch, (with --test-every) the
#: test log-likelihood estimate, and the ELBO's parts and the active units on validation images
#: (pyrovae.metrics).
METRICS = ["epoch", "train_elbo", "val_elbo", "seconds", "beta", "test_ll",
           "val_reconstruction", "val_kl", "active_units"]  # fmt: skip


def draw_plots(run_dir: Path, vae, records, data, seed: int) -> None:
    # the plots, each renamed into place once drawn, registered as made from the best weights
    from .checkpoint import weights_id
    from .rundir import WEIGHTS, register_derived, staging_dir

    ident = weights_id(run_dir / WEIGHTS)  # the best checkpoint, which the figures show
    binarize = read_json(run_dir / CONFIG).get("binarize", "none")
    with staging_dir(run_dir) as tmp:
        draw_figures(tmp, vae, records, data, seed, name=run_dir.name, binarize=binarize,
                     epoch=ident.get("epoch"))  # fmt: skip
        names = [p.name for p in tmp.iterdir()]
    register_derived(run_dir, names, ident["sha256"])
    note = collapse_note(records)
    if note:
        print(note)


#: what the validation images shown as "data" are, by --binarize
_SHOWN = {
    "dynamic": "data: one seeded binarization of the grey images",
    "static": "data: the seeded binarization of the grey images",
    "threshold": "data: binarized at 0.5",
}


def draw_figures(run_dir: Path, vae, records, data, seed: int, name: str = "",
                 binarize: str = "none", epoch=None) -> None:  # fmt: skip
    import pyro
    import torch

    from . import plots
    from .data import spread

    pyro.set_rng_seed(seed)
    where = f"best checkpoint, epoch {epoch}" if epoch is not None else ""
    shows = f"\ncurves of every epoch; the run's other figures show the {where}" if where else ""
    title = (name or run_dir.name) + shows
    plots.plot_history(records, run_dir / "elbo.png", title=title)
    device = next(vae.parameters()).device
    x = data.images[spread(len(data.images), 50)].to(device)  # spread over the split
    plots.plot_reconstructions(x.cpu(), vae.reconstruct(x).cpu(), run_dir / "reconstructions.png",
                               _SHOWN.get(binarize, "data"), where)  # fmt: skip
    plots.plot_images(vae.sample(64).cpu(), run_dir / "samples.png",
                      SAMPLE_TITLES["mean"] + (f"\n{where}" * bool(where)))  # fmt: skip
    with torch.no_grad():
        means = torch.cat([vae.encode(b.to(device))[0].cpu() for b in data.images.split(1024)])
    layer = "q(z2|x), the top layer" if hasattr(vae, "z1_decoder") else "q(z|x)"
    plots.plot_latent(means, data.labels, run_dir / "latent.png",
                      f"means of {layer}: {data.split} split, {len(means)} images"
                      + (f"\n{where}" * bool(where)),
                      classes=getattr(data, "classes", None))  # fmt: skip
    decode = lambda z: vae.decode(z.to(device)).cpu()  # noqa: E731
    if means.shape[1] == 2:  # the decoded latent plane, where the prior puts its mass
        plots.plot_manifold(decode, run_dir / "manifold.png", samples=prior_draws(vae),
                            of=f"the {type(vae.prior).__name__} prior p(z)")  # fmt: skip
    elif len(means) >= 2:  # one row per latent unit, over the range of its encoded means
        plots.plot_traversals(decode, means.mean(0), run_dir / "traversals.png", means=means,
                              where=where)  # fmt: skip


def prior_draws(vae, n: int = 4096):
    """``n`` codes drawn from the model's prior p(z) (the top layer's, for an HVAE), on the
    CPU: the quantiles the manifold figure takes."""
    import torch

    with torch.no_grad():
        return vae.prior().sample((int(n),)).cpu()  # (n, z_dim)


def collapse_note(records) -> str:
    """A line for the terminal when the last epoch's model uses none of its latent units
    (posterior collapse: ``active_units`` 0), with what to try; else ``""``."""
    units = records[-1].get("active_units") if records else None
    if units is None or units != units or int(units) > 0:
        return ""
    return (
        f"warning: 0 active latent units at epoch {records[-1]['epoch']}: the posterior "
        "collapsed to the prior and the decoder ignores z; try a KL warm-up (--warmup N), a "
        "lower β (--beta 0.5), fewer latent units (--z-dim), or a weaker decoder"
    )


#: the title of a grid of prior samples, by what is drawn of p(x|z)
SAMPLE_TITLES = {
    "mean": "z ~ p(z), decoded to the mean of p(x|z) (not a draw of x)",
    "draw": "z ~ p(z), then x ~ p(x|z): draws of the model's images",
}


#: The train options that are not part of the model's Config; a continued run keeps them.
OPTIONS = ("test_every", "test_samples", "test_limit")
#: Those options for a run that asks for none (pyrovae.fit(run_dir=...)).
NO_OPTIONS = {"test_every": 0, "test_samples": 1, "test_limit": 1}


def _check_extra(extra: dict, path: Path) -> dict:
    # the run's bookkeeping in a saved state, type-checked
    options, stopper = extra.get("options"), extra.get("stopper")
    ok = (
        isinstance(options, dict)
        and all(type(options.get(k)) is int and options[k] >= 0 for k in OPTIONS)
        and type(extra.get("train_seconds")) in (int, float)
        and (
            stopper is None
            or isinstance(stopper, dict)
            and type(stopper.get("wait")) is int
            and type(stopper.get("best_value")) in (int, float)
            and all(
                type(stopper.get(k)) in (int, type(None)) for k in ("best_epoch", "stopped_epoch")
            )  # noqa: E501
        )
    )
    if not ok:
        raise CheckpointError(
            f"{path} lacks a run's bookkeeping (options, stopper, train_seconds) or it is "
            "ill-typed: it was not saved by pyrovae train or pyrovae.fit(run_dir=...); the run "
            "cannot be continued"
        )
    return extra


@dataclass
class Run:
    """A training run in a run directory, whichever engine trains it and whatever the pair: its
    data, where it stands (the state, the metrics so far) and the per-epoch bookkeeping (KL
    warm-up for the built-in VAE, the best epoch by validation ELBO, the ELBO's parts, test
    log p(x)). Made by :func:`open_run`, advanced by :func:`record_epoch` after every epoch,
    closed by :func:`finish_run`."""

    run_dir: Path
    pair: RunPair
    train: object  # what the engine trains on (tensors or a Dataset)
    valid: object | None  # data with .tensors, scored after every epoch
    epochs: int  # the epoch to train up to
    device: object
    writer: bool  # this process writes the run (rank 0)
    options: dict
    state: object = field(default_factory=lambda: _state())  # a TrainState
    records: list = field(default_factory=list)
    before: float = 0.0  # seconds trained by earlier calls
    stopper: object = None  # EarlyStopping over the validation ELBO, if there is validation data
    schedule: object = None  # KLSchedule of the built-in VAE
    metrics_x: tuple | None = None  # validation tensors for the ELBO's parts
    test_x: tuple | None = None  # test tensors for log p(x) every --test-every epochs
    load_test: Callable | None = None  # the test split, for --test-every
    best: dict = field(default_factory=dict)  # the best checkpoint, committed with its epoch
    start: float = field(default_factory=time.perf_counter)
    progress: bool = False

    @property
    def seconds(self) -> float:
        """Seconds of training, this call's and the earlier ones'."""
        return self.before + time.perf_counter() - self.start


def _state():
    from .state import TrainState

    return TrainState()


def _world(launch) -> int:
    return launch.devices * launch.num_nodes


def open_run(run: Run, files: dict, patience: int | None = None, warmup: int = 0,
             beta: float = 1.0, fresh: bool = True) -> Run:  # fmt: skip
    """Start ``run`` (``fresh``) or continue the one saved in its directory (its weights,
    optimizer, generators, warm-up, early stopping and metrics as at the end of its last
    epoch), then commit ``files`` (config.json, pair.json) before its first epoch.

    :raises ValueError: if a continued run has trained its epochs already.
    """
    from .data import spread
    from .metrics import METRICS_IMAGES
    from .schedules import KLSchedule
    from .selection import EarlyStopping

    module, device = run.pair.module, run.device
    if run.valid is not None:
        val = tuple(t.to(device) for t in run.valid.tensors)
        keep = lambda record: run.best.update({WEIGHTS: _weights(module, record)})  # noqa: E731
        run.stopper = EarlyStopping(module, val, patience, warmup, on_improve=keep)
        run.metrics_x = tuple(t[spread(len(val[0]), METRICS_IMAGES)] for t in val)
    if not fresh:
        _continue(run)
    if run.options["test_every"] and run.load_test is not None:
        test = run.load_test().tensors
        pick = spread(len(test[0]), run.options["test_limit"])
        run.test_x = tuple(t[pick].to(device) for t in test)
    if run.pair.vae is not None:
        run.schedule = KLSchedule(run.pair.vae, warmup, beta)
        run.schedule.set_epoch(run.state.epoch + 1)
    if run.writer:
        _commit_start(run.run_dir, files, run.state.epoch, run.options)
    return run


def _weights(module, record: dict) -> bytes:
    from .checkpoint import weights_bytes

    return weights_bytes(module, {"epoch": str(record["epoch"])})


def _continue(run: Run) -> None:
    # the run saved in its directory, loaded into the run's module and stopper
    import copy

    from .checkpoint import load_state, load_weights

    run_dir, manifest = run.run_dir, read_manifest(run.run_dir)
    if manifest is not None and manifest["epoch"] == 0:  # cut off before its first epoch
        run.options = _check_extra({"options": manifest.get("options"), "train_seconds": 0.0},
                                   run_dir / MANIFEST)["options"]  # fmt: skip
        return
    state, extra = load_state(run_dir, run.pair.module, run.device)
    extra = _check_extra(extra, run_dir / STATE)
    done = _finished(run_dir, manifest, state)
    if state.epoch > run.epochs or (state.epoch == run.epochs and done):
        raise ValueError(
            f"{run_dir} has trained {state.epoch} epochs already; give --epochs N with "
            f"N > {state.epoch} to train longer"
        )
    if run.stopper is not None and extra.get("stopper") is not None:
        best = load_weights(copy.deepcopy(run.pair.module), committed(run_dir, WEIGHTS))
        weights = {k: v.to(run.device) for k, v in best.state_dict().items()}
        run.stopper.load_state_dict(extra["stopper"], weights)
        if run.stopper.stopped_epoch is not None:  # stopped early, then cut off before the end
            run.epochs = state.epoch  # nothing to train: only finish the run
    run.state, run.options = state, extra["options"]
    run.records, run.before = read_metrics(run_dir, state.epoch), float(extra["train_seconds"])


def _finished(run_dir: Path, manifest: dict | None, state) -> bool:
    if manifest is not None:
        return manifest["stage"] == "done"
    # a run of an older pyrovae: its train.json may be an earlier call's
    summary = read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else {}
    return type(summary.get("epochs_run")) is int and summary["epochs_run"] >= state.epoch


def _commit_start(run_dir: Path, files: dict, epoch: int, options: dict) -> None:
    # the config this call trains with, committed before its first epoch; a run of an older
    # pyrovae (no manifest) has its files adopted into one
    files = dict(files)
    if read_manifest(run_dir) is None:
        for name in (WEIGHTS, LAST, STATE, METRICS_FILE):
            if (run_dir / name).is_file():
                files[name] = (run_dir / name).read_bytes()
    commit(run_dir, files, epoch=epoch, stage="training", options=options)


def record_epoch(run: Run, record: dict) -> bool:
    """After every epoch, whichever engine trains (under Lightning on every rank, the
    validation ELBO already summed over ranks in the record): the epoch's β, selection and the
    best checkpoint, the ELBO's parts and test log p(x) in the record, then the state that
    ``pyrovae resume`` continues from, committed. Returns whether to stop early."""
    from .checkpoint import save_state

    if run.schedule is not None:
        run.schedule(record)  # records the epoch's β, sets the next one
    stop = run.stopper(record) if run.stopper is not None else False
    if run.stopper is None:  # no validation data: the last epoch's weights are the run's
        run.best[WEIGHTS] = _weights(run.pair.module, record)
    record.update(_scores(run, record))  # before saving
    run.records.append(record)
    extra = {"stopper": run.stopper.state_dict() if run.stopper is not None else None,
             "options": run.options, "train_seconds": run.seconds}  # fmt: skip
    rows = [{**r, **(r.get("step_kwargs") or {})} for r in run.records]  # a column each
    files = {METRICS_FILE: metrics_bytes(rows, METRICS + run.pair.scheduled()), **run.best}
    if run.writer:  # what `pyrovae resume` continues from
        save_state(run.run_dir, run.pair.module, run.state, extra, files)
    run.best.clear()
    return stop


def _scores(run: Run, record: dict) -> dict:
    # the ELBO's parts on validation data (where the pair's sites allow them) and, every
    # --test-every epochs, test log p(x)
    import torch

    from .evaluation import log_likelihood
    from .metrics import epoch_metrics

    out, pair = {}, run.pair
    on = next(iter(run.pair.module.parameters()), torch.empty(0)).device
    if run.metrics_x is not None and len(run.metrics_x) == 1:  # a pair of one tensor, x
        try:
            out.update(epoch_metrics(pair.model, pair.guide, run.metrics_x[0].to(on)))
        except (ValueError, RuntimeError, NotImplementedError, KeyError) as e:
            log.debug("pyrovae: no ELBO parts for this pair: %s", e)  # its sites do not allow it
    if run.test_x is not None and record["epoch"] % run.options["test_every"] == 0:
        test = tuple(t.to(on) for t in run.test_x)
        k = run.options["test_samples"]
        ll = log_likelihood(pair.model, pair.guide, test, num_samples=k, progress=run.progress)
        out["test_ll"] = float(ll.mean())
    return out


def finish_run(run: Run, summary: dict) -> dict:
    """The run's end: the best weights back in the module (as committed in model.safetensors),
    ``train.json`` (the summary, with ``summary``'s entries), then stage "done" once the plots
    are drawn by the caller (:func:`done`).

    :raises ValueError: if no epoch had a finite validation ELBO (nothing was saved).
    """
    stopper = run.stopper
    if stopper is not None and stopper.best_epoch is None:
        raise ValueError(
            f"no epoch had a finite validation ELBO; nothing was saved in {run.run_dir}"
        )
    if stopper is not None:
        stopper.restore()
    if run.pair.vae is not None and run.schedule is not None:
        run.pair.vae.beta = run.schedule.beta
    summary = {
        "best_epoch": stopper.best_epoch if stopper is not None else len(run.records),
        "best_val_elbo": stopper.best_value if stopper is not None else None,
        "epochs_run": len(run.records),
        "stopped_early": stopper is not None and stopper.stopped_epoch is not None,
        "train_seconds": run.seconds,
        **summary,
    }
    commit(run.run_dir, {SUMMARY: json.dumps(summary, indent=2).encode()}, stage="finishing")
    return summary


def done(run_dir: Path) -> None:
    """Mark a finished run as complete (after its plots)."""
    update_manifest(run_dir, stage="done")


def run_training(
    run_dir: Path,
    config,
    options: dict | None,
    progress: bool,
    launch=None,
    pair_spec: str | None = None,
    arrays: str | None = None,
) -> int:
    """Train ``config``'s model, or a user's pair (``pair_spec``, ``FILE.py:NAME``, on
    ``config``'s dataset or on the arrays of an ``.npz`` file), in ``run_dir``: a new run when
    ``options`` are given, else the continuation of the run saved there (its pair re-created
    from its ``config.json`` or ``pair.json``). ``launch``: the parsed launch options to train
    with the Lightning engine (:mod:`pyrovae.launch`), else ``fit`` trains; a run of one engine
    can be continued by the other. Under Lightning every rank runs this, and rank 0 alone
    writes."""
    import pyro

    # a fresh model: no parameter of an earlier run in this process may shadow its own (a
    # PyroModule registers its parameters in the global store by name)
    pyro.clear_param_store()
    run, files = _prepare(run_dir, config, options, launch, pair_spec, arrays)
    run.progress = progress
    open_run(run, files, config.patience, config.warmup, config.beta, fresh=options is not None)
    if launch is not None:
        run.options.update(devices=launch.devices, num_nodes=launch.num_nodes)
    _say_start(run, config, launch)
    _train(run, config, launch, progress)
    if not run.writer:
        return 0
    summary = finish_run(run, _engine_summary(run, launch))
    _draw(run, config)
    done(run_dir)
    _say_done(run, summary)
    return 0


def _prepare(run_dir, config, options, launch, pair_spec, arrays) -> tuple[Run, dict]:
    # the run's pair, data and files, before any epoch
    from .runpair import PAIR_FILE

    writer = launch is None or launched_rank() == 0
    device = run_device(config.device if launch is None else "cpu")  # Lightning moves the model
    source = None if options is not None else _source(run_dir)
    spec = pair_spec or (f"{source['file']}:{source['name']}" if source else None)
    arrays = arrays or (source.get("data") if source else None)
    config.binarize = "none" if arrays is not None else _resolve_binarize(config)
    config.data_dir = absolute_dir(config.data_dir)  # the run works from any folder
    train, valid = _training_data(config, arrays), _split(config, "valid", arrays)
    config.x_shape = train.x_shape
    pair = _run_pair(config, spec, arrays, train, device)
    if pair.vae is not None and hasattr(train, "tensors"):  # (fit checks streamed batches)
        transform = train.batch_transform
        pair.vae.check_data(train.images if transform is None else transform(train.tensors)[0])
    options = dict(options or NO_OPTIONS)
    options = {k: v for k, v in options.items() if k in OPTIONS}  # this call's own processes
    run = Run(run_dir, pair, train, valid, config.epochs, device, writer, options)
    run.load_test = lambda: _split(config, "test", arrays)
    files = {CONFIG: config.to_json().encode()}
    if pair.source is not None:
        files[PAIR_FILE] = json.dumps(pair.source, indent=2).encode()
    return run, files


def _source(run_dir: Path) -> dict | None:
    # the recorded pair of a run being continued, its file (and arrays) unchanged
    from .runpair import check_source, read_source

    source = read_source(run_dir)
    if source is not None:
        check_source(source, run_dir)
    return source


def _split(config, split: str, arrays: str | None):
    # a split of the run's data: config's dataset, or the arrays of an .npz file
    if arrays is None:
        return load_split(config, split)
    from .runpair import load_arrays

    return load_arrays(arrays, split, config.valid_fraction, config.test_fraction, config.seed)


def _run_pair(config, spec: str | None, arrays: str | None, train, device) -> RunPair:
    # the built-in VAE of config (its initial weights fixed by config.seed), or the user's pair
    # (made after seeding with config.seed), its parameters found on a first batch
    import pyro

    from .pair import modules_of
    from .runpair import RunPair, load_pair, pair_source

    pyro.set_rng_seed(config.seed)
    if spec is None:
        from .config import build_vae

        return RunPair.of_vae(build_vae(config).to(device))
    pair = load_pair(spec, config.seed)
    if arrays is not None:
        pair.source = pair_source(Path(pair.source["file"]), pair.source["name"], Path(arrays))
    for m in modules_of(pair.model, pair.guide):
        m.to(device)
    pair.bind(_first_batch(train, config.batch_size, device), make_loss(config))
    return pair


def make_loss(config):
    """The loss of a run's config: ``None`` for the plain ELBO (fit's default, which fit knows
    how to run fastest), else :func:`pyrovae.objectives.make_loss`'s."""
    from .objectives import make_loss as make

    default = (config.loss, config.particles) == ("elbo", 1)
    return None if default else make(config.loss, config.particles)


def _first_batch(data, batch_size: int, device) -> tuple:
    # the first rows of the training data, as the pair sees them (batch transform applied)
    from torch.utils.data import default_collate

    from .data import as_tensors

    if hasattr(data, "tensors"):
        batch = tuple(t[:batch_size] for t in data.tensors)
    else:  # a streamed Dataset: its first items, collated
        items = [data[i] for i in range(min(len(data), batch_size))]
        batch = as_tensors(default_collate(items), "the training data")
    batch = tuple(t.to(device) for t in batch)
    transform = getattr(data, "batch_transform", None)
    return tuple(transform(batch)) if transform is not None else batch


def _train(run: Run, config, launch, progress: bool) -> None:
    # the engine's epochs, record_epoch after each
    from .errors import NonFiniteLossError
    from .training import fit

    common = {"epochs": run.epochs, "batch_size": config.batch_size, "lr": config.lr,
              "loss": make_loss(config), "seed": config.seed, "state": run.state,
              "stream": not hasattr(run.train, "tensors"), "num_workers": config.workers,
              "val_data": run.valid.tensors if run.valid is not None else None,
              "step_kwargs": run.pair.step_kwargs}  # fmt: skip
    model, guide = run.pair.model, run.pair.guide
    callback = lambda record: record_epoch(run, record)  # noqa: E731
    try:
        if launch is None:
            fit(model, guide, run.train, device=run.device, callback=callback, progress=progress,
                **common)  # fmt: skip
        elif run.epochs > run.state.epoch:
            _train_lightning(run, callback, launch, progress, common)
    except NonFiniteLossError as e:
        best = run.stopper.best_epoch if run.stopper is not None else None
        kept = (f"the checkpoint of epoch {best} is kept in {run.run_dir} (the best validation "
                "ELBO so far)" if best is not None else "no checkpoint was written")  # fmt: skip
        raise ValueError(f"{e}; {kept}") from e


def _engine_summary(run: Run, launch) -> dict:
    skipped = len(getattr(run.train, "skipped", ())) + len(getattr(run.valid, "skipped", ()))
    return {
        "device": str(run.device) if launch is None else launch.accelerator,
        "skipped_files": skipped,
        "engine": "fit" if launch is None else "lightning",
        "world_size": 1 if launch is None else _world(launch),
    }


def _say_start(run: Run, config, launch) -> None:
    if not run.writer:
        return
    what = "training" if run.state.epoch == 0 else f"continuing from epoch {run.state.epoch}"
    skipped = _engine_summary(run, launch)["skipped_files"]
    note = f", {skipped} unreadable files skipped" if skipped else ""
    where = run.device if launch is None else f"Lightning, {_world(launch)} proc."
    source = run.pair.source
    pair = "" if source is None else f"{source['name']} from {source['file']} "
    data = config.dataset if source is None or "data" not in source else source["data"]
    _echo(config)
    print(f"{what} {pair}on {data} ({len(run.train)} datapoints{note}, {where}); run "
          f"directory {run.run_dir}")  # fmt: skip


def _draw(run: Run, config) -> None:
    # the figures: elbo.png for any pair; the image plots of the built-in VAE
    if run.pair.vae is not None and run.pair.vae is run.pair.module:
        if run.state.epoch == 0 and not run.records:
            return
        draw_plots(run.run_dir, run.pair.vae, run.records, run.valid, config.seed)
    else:
        draw_history(run.run_dir, run.records)


def _say_done(run: Run, summary: dict) -> None:
    stop = f"stopped early at epoch {len(run.records)}; " if summary["stopped_early"] else ""
    best = (f"best validation ELBO {summary['best_val_elbo']:.3f} nats per datapoint at epoch "
            f"{summary['best_epoch']}" if summary["best_val_elbo"] is not None
            else f"{len(run.records)} epochs")  # fmt: skip
    print(f"done in {took(summary['train_seconds'], run.before)}: {stop}{best}, kept in "
          f"{run.run_dir}")  # fmt: skip
    print(f"figures and metrics.csv are in {run.run_dir}; score the test split with: "
          f"pyrovae evaluate {run.run_dir} --split test")  # fmt: skip


def fit_run(run_dir: Path, model, guide, data, *, epochs: int, callback=None,
            progress: bool = True, state=None, **args):  # fmt: skip
    """:func:`pyrovae.fit` with ``run_dir``: train the pair in a crash-consistent run directory
    (its module weights as model.safetensors, the best epoch's by validation ELBO when
    ``val_data`` is given, else the last's; last.safetensors and state.safetensors for
    continuing; metrics.csv with the ELBO's parts where the pair allows them; elbo.png;
    manifest.json), or continue the run saved there, exactly where it stopped (call it again
    with the same pair, data and arguments). Returns the :class:`~pyrovae.History` of the
    epochs this call trained.

    :raises ValueError: with ``state`` too (the run directory keeps its own), or when the run
        has trained ``epochs`` already.
    """
    from .rundir import RunLock, recover
    from .runpair import RunPair
    from .training import Trainer, resolve_device, train_epochs

    if state is not None:
        raise ValueError("pass state or run_dir, not both: a run directory keeps its own state")
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir, "pyrovae.fit"):
        fresh = recover(run_dir) is None
        device = resolve_device(args["device"])
        pair = RunPair(model, guide, step_kwargs=args["step_kwargs"])
        pair.bind(_first_batch(_as_data(data), args["batch_size"], device), args["loss"])
        valid = None if args["val_data"] is None else _as_data(args["val_data"])
        run = Run(run_dir, pair, data, valid, int(epochs), device, True, dict(NO_OPTIONS))
        open_run(run, {}, fresh=fresh)
        trainer = Trainer(model, guide, data, state=run.state, **args)

        def after(record: dict) -> bool:
            stop = callback is not None and callback(record)  # before the state is saved
            return record_epoch(run, record) or bool(stop)

        history = train_epochs(trainer, run.epochs, after, progress)
        finish_run(run, {"device": str(device), "engine": "fit", "world_size": 1})
        draw_history(run_dir, run.records)
        done(run_dir)
    return history


def _as_data(data):
    # data with .tensors: tensors, a tuple of them or a Dataset (collated once)
    from .data import as_tensors

    return SimpleNamespace(tensors=as_tensors(data, "training data"), skipped=())


def draw_history(run_dir: Path, records: list[dict]) -> None:
    """elbo.png of a run (any pair), registered as drawn from the run's best weights."""
    from . import plots
    from .checkpoint import weights_id
    from .rundir import register_derived, staging_dir

    with staging_dir(run_dir) as tmp:
        plots.plot_history(records, tmp / "elbo.png", title=run_dir.name)
    register_derived(run_dir, ["elbo.png"], weights_id(run_dir / WEIGHTS)["sha256"])


def _train_lightning(run: Run, callback, launch, progress: bool, common: dict) -> None:
    # The Lightning engine's part of a run: the same callback after every epoch, the run's
    # TensorBoard logger if asked for (with image grids for the built-in VAE).
    from . import lightning as engine
    from .data import spread
    from .launch import quiet_lightning, trainer_args

    quiet_lightning()
    bar = _epoch_lines(run, progress)
    if bar is not None:  # a log, not a terminal: a line per epoch, as fit writes
        progress, said = False, callback

        def callback(record: dict) -> bool:
            stop = said(record)
            bar.end_epoch(record, run.stopper.best_value if run.stopper is not None else None)
            return stop

    callbacks = [engine.EpochCallback(callback)]
    logger = False
    if launch.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(run.run_dir, name="tensorboard", version="")
        if run.pair.vae is not None:
            shown = run.valid.images[spread(len(run.valid), 16)]
            callbacks.append(engine.LogEpoch(run.pair.vae, shown, launch.log_images_every))
        else:
            callbacks.append(engine.LogEpoch())
    engine.fit(run.pair.model, run.pair.guide, run.train, callbacks=callbacks, logger=logger,
               enable_progress_bar=progress and launched_rank() == 0, **trainer_args(launch),
               **common)  # fmt: skip
    if run.writer:
        run.pair.module.cpu()


def _epoch_lines(run: Run, progress: bool):
    # where stderr is a log rather than a terminal, the bar that writes a line per epoch
    from .progress import TrainingBar, is_terminal

    if not progress or launched_rank() != 0 or is_terminal():
        return None
    return TrainingBar(run.state.epoch + 1, run.epochs, None, lambda: None)


def run_device(name: str | None):
    # the torch device to train or score on: one that can (not meta, say)
    from .training import resolve_device

    device = resolve_device(name)
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {name}: pyrovae runs on cpu or cuda, not {device.type}")
    return device


def load_run_pair(run_dir: Path, device, data_dir: str | None = None):
    """Re-create a finished (or saved) run's pair with its best weights, for ``evaluate``,
    ``plot`` and ``sample``: the built-in VAE from config.json, or a user's pair from
    pair.json (its file, and arrays, unchanged since the run was made).

    :returns: ``(pair, config)``, the weights in eval mode on ``device``.
    :raises ValueError: (or CheckpointError) in one line, for a changed or missing pair file.
    """
    import pyro

    from .checkpoint import load_config, load_run, load_weights
    from .runpair import RunPair

    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    source = _source(run_dir)
    if source is None:
        vae, config = load_run(run_dir, device)
        config.data_dir = data_dir_for(run_dir, config, data_dir)
        return RunPair.of_vae(vae), config
    config = load_config(run_dir)
    config.data_dir = data_dir_for(run_dir, config, data_dir)
    pyro.clear_param_store()
    arrays = source.get("data")
    train = _training_data(config, arrays)
    pair = _run_pair(config, f"{source['file']}:{source['name']}", arrays, train, device)
    load_weights(pair.module, committed(run_dir, WEIGHTS), str(device))
    pair.module.eval()
    return pair, config


def scoring_split(config, split: str, pair: RunPair):
    """The split of a run's data that ``evaluate`` scores (its ``.tensors``)."""
    arrays = pair.source.get("data") if pair.source is not None else None
    return _split(config, split, arrays)
