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
import time
from dataclasses import fields
from pathlib import Path

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

__all__ = [
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


def _training_data(config):
    """The training split: an ImageDataset in memory, or for a folder that streams (--stream) a
    FolderDataset whose images DataLoader workers decode while the model trains."""
    from .batches import should_stream
    from .data import FolderDataset

    if config.dataset != "folder" or config.stream == "no" or config.data_dir is None:
        if config.stream == "yes":
            raise ValueError(f"--stream yes: only --dataset folder streams, not {config.dataset}")
        return _limited(load_split(config, "train"), config.train_limit)
    ds = FolderDataset(config.data_dir, "train", config.image_size, config.channels,
                       config.valid_fraction, config.test_fraction)  # fmt: skip
    if config.stream == "auto" and not should_stream(ds, None):
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


def _check_extra(extra: dict, path: Path) -> dict:
    # the CLI's bookkeeping in a saved state, type-checked
    options, stopper = extra.get("options"), extra.get("stopper")
    ok = (
        isinstance(options, dict)
        and all(type(options.get(k)) is int and options[k] >= 0 for k in OPTIONS)
        and type(extra.get("train_seconds")) in (int, float)
        and isinstance(stopper, dict)
        and type(stopper.get("wait")) is int
        and type(stopper.get("best_value")) in (int, float)
        and all(type(stopper.get(k)) in (int, type(None)) for k in ("best_epoch", "stopped_epoch"))
    )
    if not ok:
        raise CheckpointError(
            f"{path} lacks the CLI's bookkeeping (options, stopper, train_seconds) or it is "
            "ill-typed: it was not saved by pyrovae train; the run cannot be continued"
        )
    return extra


def _continue(run_dir: Path, config, vae, device, stopper):
    # the run saved in run_dir, loaded into vae and stopper: (state, records, options, seconds)
    from .checkpoint import load_state, load_weights
    from .config import build_vae
    from .state import TrainState

    manifest = read_manifest(run_dir)
    if manifest is not None and manifest["epoch"] == 0:  # cut off before its first epoch
        extra = {"options": manifest.get("options"), "train_seconds": 0.0,
                 "stopper": stopper.state_dict() | {"best_value": 0.0}}  # fmt: skip
        _check_extra(extra, run_dir / MANIFEST)
        return TrainState(), [], extra["options"], 0.0
    state, extra = load_state(run_dir, vae, device)
    extra = _check_extra(extra, run_dir / STATE)
    if manifest is not None:
        done = manifest["stage"] == "done"
    else:  # a run of an older pyrovae: its train.json may be an earlier call's
        summary = read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else {}
        done = type(summary.get("epochs_run")) is int and summary["epochs_run"] >= state.epoch
    if state.epoch > config.epochs or (state.epoch == config.epochs and done):
        raise ValueError(
            f"{run_dir} has trained {state.epoch} epochs already; give --epochs N with "
            f"N > {state.epoch} to train longer"
        )
    best = load_weights(build_vae(config), committed(run_dir, WEIGHTS))
    stopper.load_state_dict(
        extra["stopper"], {k: v.to(device) for k, v in best.state_dict().items()}
    )
    records = read_metrics(run_dir, state.epoch)
    return state, records, extra["options"], float(extra["train_seconds"])


def _commit_start(run_dir: Path, config, epoch: int, options: dict) -> None:
    # the config this call trains with, committed before its first epoch; a run of an older
    # pyrovae (no manifest) has its files adopted into one
    files = {CONFIG: config.to_json().encode()}
    if read_manifest(run_dir) is None:
        for name in (WEIGHTS, LAST, STATE, METRICS_FILE):
            if (run_dir / name).is_file():
                files[name] = (run_dir / name).read_bytes()
    commit(run_dir, files, epoch=epoch, stage="training", options=options)


def run_training(run_dir: Path, config, options: dict | None, progress: bool,
                  launch=None) -> int:  # fmt: skip
    """Train ``config``'s model in ``run_dir``: a new run when ``options`` are given, else the
    continuation of the run saved there (its weights, optimizer, generators, warm-up, early
    stopping and metrics as at the end of its last epoch). ``launch``: the parsed launch
    options to train with the Lightning engine (:mod:`pyrovae.launch`), else ``fit`` trains; a
    run of one engine can be continued by the other. Under Lightning every rank runs this, and
    rank 0 alone writes."""
    import pyro

    from .checkpoint import save_state, weights_bytes
    from .config import build_vae
    from .data import ImageDataset, spread
    from .errors import NonFiniteLossError
    from .evaluation import log_likelihood
    from .metrics import METRICS_IMAGES, epoch_metrics
    from .objectives import make_loss
    from .schedules import KLSchedule
    from .selection import EarlyStopping
    from .state import TrainState
    from .training import fit

    # a fresh model: no parameter of an earlier run in this process may shadow its own (a
    # PyroModule registers its parameters in the global store by name)
    pyro.clear_param_store()
    writer = launch is None or launched_rank() == 0
    device = run_device(config.device if launch is None else "cpu")  # Lightning moves the model
    config.binarize = _resolve_binarize(config)
    config.data_dir = absolute_dir(config.data_dir)  # the run works from any folder
    train, valid = _training_data(config), load_split(config, "valid")
    streamed = not isinstance(train, ImageDataset)
    config.x_shape = train.x_shape
    pyro.set_rng_seed(config.seed)  # the seed also fixes the initial weights
    vae = build_vae(config)
    if not streamed:  # (fit checks streamed batches as they come)
        transform = train.batch_transform
        vae.check_data(train.images if transform is None else transform(train.tensors)[0])
    state, records, before = TrainState(), [], 0.0  # before: seconds trained in earlier calls
    last_epoch = config.epochs  # the epoch to train up to
    best = {}  # the best checkpoint, committed with its epoch

    def keep_best(record: dict) -> None:
        best[WEIGHTS] = weights_bytes(vae, {"epoch": str(record["epoch"])})

    stopper = EarlyStopping(
        vae, valid.images.to(device), config.patience, config.warmup, on_improve=keep_best
    )
    if options is None:  # continue the run saved in run_dir
        state, records, options, before = _continue(run_dir, config, vae, device, stopper)
        if stopper.stopped_epoch is not None:  # stopped early, then cut off before the summary
            last_epoch = state.epoch  # nothing to train: only finish the run
    options = {k: v for k, v in options.items() if k in OPTIONS}  # this call's own processes:
    if launch is not None:
        options.update(devices=launch.devices, num_nodes=launch.num_nodes)
    if writer:
        _commit_start(run_dir, config, state.epoch, options)
    # the plain ELBO is fit's default objective (which fit knows how to run fastest)
    default = (config.loss, config.particles) == ("elbo", 1)
    loss = None if default else make_loss(config.loss, config.particles)
    test_x = None
    if options["test_every"]:
        test = load_split(config, "test")
        test_x = test.images[spread(len(test), options["test_limit"])].to(device)
    metrics_x = valid.images[spread(len(valid), METRICS_IMAGES)].to(device)
    vae.to(device)
    schedule = KLSchedule(vae, config.warmup, config.beta)
    schedule.set_epoch(state.epoch + 1)
    start = time.perf_counter()

    def callback(record: dict) -> bool:
        # after every epoch, whichever engine trains (under Lightning: on every rank, with the
        # validation ELBO summed over ranks already in the record)
        schedule(record)  # records the epoch's β, sets the next one
        stop = stopper(record)  # records the validation ELBO, keeps the best weights
        on = next(vae.parameters()).device
        record.update(epoch_metrics(vae.model, vae.guide, metrics_x.to(on)))  # before saving
        if test_x is not None and record["epoch"] % options["test_every"] == 0:
            ll = log_likelihood(vae.model, vae.guide, test_x.to(on),
                                num_samples=options["test_samples"], progress=progress)  # fmt: skip
            record["test_ll"] = float(ll.mean())
        records.append(record)
        seconds = before + time.perf_counter() - start
        extra = {"stopper": stopper.state_dict(), "options": options, "train_seconds": seconds}
        files = {METRICS_FILE: metrics_bytes(records, METRICS), **best}
        if writer:  # what `pyrovae resume` continues from
            save_state(run_dir, vae, state, extra, files)
        best.clear()
        return stop

    what = "training" if state.epoch == 0 else f"continuing from epoch {state.epoch}"
    skipped = len(getattr(train, "skipped", ())) + len(valid.skipped)
    note = f", {skipped} unreadable files skipped" if skipped else ""
    where = device if launch is None else f"Lightning, {launch.devices * launch.num_nodes} proc."
    if writer:
        _echo(config)
        print(f"{what} on {config.dataset} ({len(train)} images{note}, {where}); run directory "
              f"{run_dir}")  # fmt: skip
    common = {"epochs": last_epoch, "batch_size": config.batch_size, "lr": config.lr,
              "loss": loss, "seed": config.seed, "state": state, "stream": streamed,
              "num_workers": config.workers}  # fmt: skip
    try:
        if launch is None:
            fit(vae.model, vae.guide, train, device=device, callback=callback, progress=progress,
                **common)  # fmt: skip
        elif last_epoch > state.epoch:
            _train_lightning(vae, train, valid, callback, launch, progress, run_dir, common)
    except NonFiniteLossError as e:
        kept = (
            f"the checkpoint of epoch {stopper.best_epoch} is kept in {run_dir} (the best "
            "validation ELBO so far)"
            if stopper.best_epoch is not None
            else "no checkpoint was written"
        )
        raise ValueError(f"{e}; {kept}") from e
    seconds = before + time.perf_counter() - start
    if not writer:
        return 0
    if stopper.best_epoch is None:
        raise ValueError(f"no epoch had a finite validation ELBO; nothing was saved in {run_dir}")
    stopper.restore()  # the best weights, as committed in model.safetensors
    vae.beta = config.beta
    if launch is not None:
        vae.cpu()
    summary = {
        "best_epoch": stopper.best_epoch,
        "best_val_elbo": stopper.best_value,
        "epochs_run": len(records),
        "stopped_early": stopper.stopped_epoch is not None,
        "train_seconds": seconds,
        "device": str(device) if launch is None else launch.accelerator,
        "skipped_files": skipped,
        "engine": "fit" if launch is None else "lightning",
        "world_size": 1 if launch is None else launch.devices * launch.num_nodes,
    }
    files = {CONFIG: config.to_json().encode(), SUMMARY: json.dumps(summary, indent=2).encode()}
    commit(run_dir, files, stage="finishing")  # a run cut off from here is only finished
    draw_plots(run_dir, vae, records, valid, config.seed)
    update_manifest(run_dir, stage="done")
    stop = f"stopped early at epoch {len(records)}; " if summary["stopped_early"] else ""
    print(
        f"done in {took(seconds, before)}: {stop}best validation ELBO "
        f"{stopper.best_value:.3f} nats per image at epoch {stopper.best_epoch}, kept in {run_dir}"
    )
    print(f"figures and metrics.csv are in {run_dir}; score the test split with: "
          f"pyrovae evaluate {run_dir} --split test")  # fmt: skip
    return 0


def _train_lightning(vae, train, valid, callback, launch, progress, run_dir, common) -> None:
    # The Lightning engine's part of run_training: the same callback after every epoch, the
    # run's TensorBoard logger if asked for.
    from . import lightning as engine
    from .data import spread
    from .launch import quiet_lightning, trainer_args

    quiet_lightning()
    callbacks = [engine.EpochCallback(callback)]
    logger = False
    if launch.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(run_dir, name="tensorboard", version="")
        shown = valid.images[spread(len(valid), 16)]
        callbacks.append(engine.LogEpoch(vae, shown, launch.log_images_every))
    engine.fit(vae.model, vae.guide, train, val_data=valid, callbacks=callbacks, logger=logger,
               enable_progress_bar=progress and launched_rank() == 0, **trainer_args(launch),
               **common)  # fmt: skip


def run_device(name: str | None):
    # the torch device to train or score on: one that can (not meta, say)
    from .training import resolve_device

    device = resolve_device(name)
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {name}: pyrovae runs on cpu or cuda, not {device.type}")
    return device
