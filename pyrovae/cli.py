"""The ``pyrovae`` command: ``train``, ``resume``, ``evaluate``, ``sample`` and ``bench``.

``pyrovae train`` with no options trains a small VAE on scikit-learn's bundled 8×8 digits, offline,
and leaves a run directory with the config, a checkpoint, per-epoch metrics and PNG plots.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from .errors import CheckpointError
from .footprint import check_fits
from .launch import add_launch_args, check_launch, distributed, launched_rank
from .launch import start as start_processes
from .rundir import METRICS as METRICS_FILE
from .rundir import (
    SUMMARY,
    WEIGHTS,
    RunLock,
    atomic_path,
    clear_for_new_run,
    read_json,
    read_manifest,
    read_metrics,
    recover,
)
from .runs import (
    OPTIONS,
    SAMPLE_TITLES,
    draw_plots,
    load_split,
    run_device,
    run_training,
)

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    # One line on a usage error, not usage + error; every option's help ends with its default.
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}{_did_you_mean(message)}\n")


def _did_you_mean(message: str) -> str:
    # "invalid choice: 'vamprior' (choose from 'normal', ..., 'vampprior')" -> the closest one
    import difflib
    import re

    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if not found:
        return ""
    choices = re.findall(r"'([^']*)'", found.group(2))
    close = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class _DefaultsFormatter(argparse.HelpFormatter):
    # "(default: X)" after an option's help, unless the help names its default already or
    # there is none to name (a flag, an option that is unset unless given)
    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    from .config import LOSSES, MODELS, STREAM, Config
    from .data import BINARIZE, DATASETS
    from .guides import GUIDES
    from .likelihoods import LIKELIHOODS
    from .nets import ACTIVATIONS, NETS
    from .priors import PRIORS

    d = Config()
    from . import __version__

    parser = _Parser(prog="pyrovae", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pyrovae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a VAE and write a run directory")
    t.add_argument("--dataset", choices=list(DATASETS), default=d.dataset,
                   help="the images to train on (folder: your own, in --data-dir)")  # fmt: skip
    t.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="data root (default $PYROVAE_DATA, else ~/.cache/pyrovae)",
    )
    t.add_argument(
        "--binarize",
        choices=["auto", *BINARIZE],
        default=d.binarize,
        help="auto: for a Bernoulli likelihood, threshold digits and binarize (M)NIST dynamically",
    )
    t.add_argument(
        "--download", action="store_true", help="let torchvision download mnist/fashion-mnist"
    )
    t.add_argument("--image-size", type=int, default=d.image_size,
                   help="folder: resize (shorter side) and centre-crop to S×S")  # fmt: skip
    t.add_argument("--channels", type=int, choices=[1, 3], default=d.channels,
                   help="folder: convert images to grey (1) or RGB (3)")  # fmt: skip
    t.add_argument("--skip-bad-files", action="store_true",
                   help="folder: skip unreadable files (counted in train.json)")  # fmt: skip
    t.add_argument("--valid-fraction", type=float, default=d.valid_fraction,
                   help="folder without train/valid/test subfolders: validation share")  # fmt: skip
    t.add_argument("--test-fraction", type=float, default=d.test_fraction,
                   help="folder without train/valid/test subfolders: test share")  # fmt: skip
    t.add_argument("--stream", choices=list(STREAM), default=d.stream,
                   help="folder: decode training images in DataLoader workers while training "
                   "(auto: when they would take more than 2 GiB decoded)")  # fmt: skip
    t.add_argument("--workers", type=int, default=d.workers,
                   help="folder, streamed: DataLoader worker processes")  # fmt: skip
    t.add_argument("--net", choices=list(NETS), default=d.net, help="encoder and decoder")
    t.add_argument("--hidden", type=int, nargs="+", default=list(d.hidden), help="hidden sizes")
    t.add_argument("--widths", type=int, nargs="+", default=list(d.widths),
                   help="conv: channels of the residual blocks (one halving each)")  # fmt: skip
    t.add_argument("--gated", action="store_true", help="GatedDense layers (VampPrior paper)")
    t.add_argument("--activation", choices=list(ACTIVATIONS), default=d.activation,
                   help="the hidden layers' nonlinearity")  # fmt: skip
    t.add_argument("--z-dim", type=int, default=d.z_dim, help="latent size (top layer of hvae)")
    t.add_argument(
        "--model", choices=list(MODELS), default=d.model, help="hvae: two layers z2 -> z1 -> x"
    )
    t.add_argument("--prior", choices=list(PRIORS), default=d.prior, help="prior on z (z2 in hvae)")
    t.add_argument(
        "--components",
        type=int,
        default=d.components,
        help="K: mixture components (mog) or pseudo-inputs (vampprior)",
    )
    t.add_argument(
        "--guide", choices=list(GUIDES), default=d.guide, help="flow: IAF on the encoder's Gaussian"
    )
    t.add_argument(
        "--flows", type=int, default=d.flows, help="transforms of the flow prior / flow guide"
    )
    t.add_argument("--likelihood", choices=list(LIKELIHOODS), default=d.likelihood,
                   help="p(x|z) of a pixel (discretized-*: 8-bit images)")  # fmt: skip
    t.add_argument(
        "--variance", type=float, default=d.variance, help="c of the Gaussian N(f(z), c·I)"
    )
    t.add_argument("--allow-non-binary", action="store_true", help="Bernoulli on grey values")
    t.add_argument("--mixtures", type=int, default=d.mixtures,
                   help="logistic components per pixel (discretized-logistic)")  # fmt: skip
    t.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training data")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    t.add_argument("--lr", type=float, default=d.lr, help="Adam's learning rate")
    t.add_argument("--loss", choices=list(LOSSES), default=d.loss,
                   help="elbo (Trace_ELBO), meanfield (closed-form KL), iwae")  # fmt: skip
    t.add_argument(
        "--particles", type=int, default=d.particles, help="samples per datapoint (iwae's k)"
    )
    t.add_argument("--beta", type=float, default=d.beta, help="KL weight (β-VAE when != 1)")
    t.add_argument(
        "--warmup", type=int, default=d.warmup, help="KL warm-up epochs: β rises linearly to --beta"
    )
    t.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="stop after N epochs (after warm-up) without a better validation ELBO",
    )
    t.add_argument(
        "--train-limit", type=int, default=d.train_limit, help="train on the first N images"
    )
    t.add_argument(
        "--test-every",
        type=int,
        default=0,
        help="every N epochs, record log p(x) on test images in metrics.csv (0: never)",
    )
    t.add_argument("--test-samples", type=int, default=100, help="K for --test-every")
    t.add_argument("--test-limit", type=int, default=1000, help="test images for --test-every")
    t.add_argument("--seed", type=int, default=d.seed,
                   help="fixes the initial weights, the batches and every draw")  # fmt: skip
    t.add_argument("--device", default=d.device, help="auto (CUDA when there is one), cpu, cuda")
    t.add_argument("--out", default=None, help="run directory (default runs/DATASET-TIMESTAMP)")
    t.add_argument("--config", default=None, metavar="FILE",
                   help="settings from a JSON or TOML file with config.json's keys; flags given "
                   "on the command line override them")  # fmt: skip
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (default: refuse it)")  # fmt: skip
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_launch_args(t, train=True)

    r = sub.add_parser("resume", help="continue an interrupted run where its last epoch ended")
    r.add_argument("run_dir")
    r.add_argument(
        "--epochs", type=int, default=None, help="train up to N epochs in all (default: the run's)"
    )
    r.add_argument("--device", default=None, help="train on another device (default: the run's)")
    r.add_argument("--data-dir", default=None, help="override the run's data root")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_launch_args(r, train=True)

    e = sub.add_parser("evaluate", help="ELBO and importance-sampled log p(x) of a run")
    e.add_argument("run_dir")
    e.add_argument("--num-samples", type=int, default=5000, help="K importance samples")
    e.add_argument("--split", choices=["train", "valid", "test"], default="test",
                   help="the split to score")  # fmt: skip
    e.add_argument(
        "--limit", type=int, default=None, help="score N datapoints spread over the split"
    )
    e.add_argument("--batch-size", type=int, default=None, help="datapoints per chunk")
    e.add_argument("--data-dir", default=None, help="override the run's data root")
    e.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda")
    e.add_argument("--seed", type=int, default=0, help="seeds the importance samples")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_launch_args(e, train=False)

    s = sub.add_parser("sample", help="a grid of images from the prior: decoder means or draws")
    s.add_argument("run_dir")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("-n", "--num", type=int, default=64, help="number of images")
    s.add_argument("--seed", type=int, default=0, help="seeds the prior draws")
    what = s.add_mutually_exclusive_group()
    what.add_argument("--mean", dest="draw", action="store_false", default=False,
                      help="show the mean of p(x|z) for each z ~ p(z) (the default)")  # fmt: skip
    what.add_argument("--draw", dest="draw", action="store_true",
                      help="draw x ~ p(x|z) (binary pixels for a Bernoulli)")  # fmt: skip

    p = sub.add_parser("plot", help="redraw a run's plots from its weights and metrics")
    p.add_argument("run_dir")
    p.add_argument("--data-dir", default=None, help="override the run's data root")

    b = sub.add_parser("bench", help="images/s of fit and log p(x) against hand-written PyTorch")
    b.add_argument("--dataset", choices=list(DATASETS), default="digits", help="training images")
    b.add_argument("--data-dir", default=None, help="data root (default $PYROVAE_DATA)")
    b.add_argument("--arch", choices=["mlp", "vampprior"], default="mlp",
                   help="mlp: 784-400-50; vampprior: GatedDense(300) x 2, z=40")  # fmt: skip
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[256], help="batch sizes timed")
    b.add_argument("--rounds", type=int, default=3, help="timed repeats per method")
    b.add_argument("--limit", type=int, default=None, help="use the first N training images")
    b.add_argument("--num-samples", type=int, nargs="*", default=[5000],
                   help="K values for log p(x) (none: skip)")  # fmt: skip
    b.add_argument("--eval-n", type=int, default=100, help="test images scored")
    b.add_argument("--eval-rounds", type=int, default=None,
                   help="timed repeats per log p(x) method (default: --rounds)")  # fmt: skip
    b.add_argument("--chunk-elements", type=int, nargs="+", default=None, metavar="N",
                   help="log p(x) chunk bounds to sweep (max_chunk_elements; default: "
                   "the device's default)")  # fmt: skip
    only = b.add_mutually_exclusive_group()
    only.add_argument("--train-only", action="store_true", help="skip the log p(x) table")
    only.add_argument("--eval-only", action="store_true", help="skip the training tables")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--machine", choices=["quiet", "loaded", "both"], default="quiet",
                   help="time training alone, beside one busy process (a shared machine), "
                   "or both")  # fmt: skip
    b.add_argument("--seed", type=int, default=0, help="seeds data order and weights")
    from .verify import add_parser as add_verify_parser

    add_verify_parser(sub)  # pyrovae verify RUN [--adopt]
    c = sub.add_parser("completion", help="print a shell completion script")
    c.add_argument("shell", choices=["bash", "zsh"],
                   help="source its output, e.g. eval \"$(pyrovae completion bash)\"")  # fmt: skip
    for command in sub.choices.values():
        command.add_argument("--threads", type=int, default=None,
                             help="torch's CPU threads (default: one per core, waiting "
                             "passively; 1 is fastest beside other busy processes)")  # fmt: skip
    return parser


def _with_config_file(parser, path: str, argv):
    """The arguments again, with the file's settings as the train command's defaults (so flags
    given on the command line win)."""
    from .config import Config

    values = _config_file_values(path)
    values.pop("x_shape", None)  # a run's config.json: the data decide it
    odd = [key for key in values if not key.isprintable()]  # named as Python writes them
    if odd:
        raise ValueError(f"--config {path}: unknown config key {odd[0][:40]!r}")
    try:
        Config.from_dict(values)  # names and types, with the key named
    except (ValueError, TypeError, AttributeError, OverflowError) as e:
        raise ValueError(f"--config {path}: {e}") from None
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train.choices["train"].set_defaults(**values)
    return parser.parse_args(argv)


def _config_file_values(path: str) -> dict:
    # the settings of a --config file: a JSON or TOML table, read as UTF-8
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"--config {path}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    try:
        if path.endswith(".toml"):
            import tomllib

            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except RecursionError:
        raise ValueError(f"--config {path}: it nests too deeply to be a config") from None
    except ValueError as e:
        raise ValueError(f"--config {path}: not readable ({str(e)[:200]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: should hold a table of settings (config.json's "
                         f"keys), not a {type(values).__name__}")  # fmt: skip
    return values


def _quiet_openmp() -> None:
    # OpenMP threads that spin while they wait for work steal the core from a busy neighbour:
    # beside one busy process, torch's two threads ran the main job's epochs 2-3x slower
    # (30x once) than passive waiting, which costs nothing on a quiet machine (docs/speed.md).
    # Read when torch loads, so set before that, and never over the user's choice.
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _as_flags(message: str, names) -> str:
    # "batch_size must be ..." -> "--batch-size must be ..." (a message that starts with one)
    import re

    return re.sub(r"^(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b",
                  lambda m: "--" + m.group(1).replace("_", "-"), message, count=1)  # fmt: skip


def _check_train_args(args) -> None:
    for key in ("test_samples", "test_limit"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.test_every < 0:
        raise ValueError(f"--test-every must be >= 0, got {args.test_every}")


def _train(args) -> int:
    from .config import Config

    names = {f.name for f in fields(Config)}
    try:
        config = Config.from_dict({k: v for k, v in vars(args).items() if k in names})
        config.validate()
    except ValueError as e:  # name the option the user typed, not the Config field
        raise ValueError(_as_flags(str(e), names)) from None
    check_fits(config)  # sizes that cannot fit in memory, refused before anything is allocated
    _check_train_args(args)
    run_dir = Path(args.out or f"runs/{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.out = str(run_dir)  # for the message of a failure
    options = {key: getattr(args, key) for key in OPTIONS}
    progress = not args.no_progress
    launch = args if distributed(args) else None
    if distributed(args) or args.engine == "fit":
        check_launch(args)
        if launched_rank() > 0:  # a rank the launcher started: trains its shard, writes nothing
            return run_training(run_dir, config, options, False, launch)
    created = not run_dir.exists()
    try:
        with _writer(run_dir, "pyrovae train"):
            clear_for_new_run(run_dir, args.overwrite)
            return run_training(run_dir, config, options, progress, launch)
    finally:  # a run that failed before anything was saved leaves no directory
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()


@contextmanager
def _writer(run_dir: Path, command: str, note: bool = True):
    # hold the run's lock; on an interrupt, say which epoch is saved and how to continue
    lock = RunLock(run_dir, command)
    with lock:
        if lock.took_over:
            who = lock.took_over
            print(f"{command}: took over the lock of pid {who.get('pid')} ({who.get('command')}), "
                  "which is no longer running", file=sys.stderr)  # fmt: skip
        try:
            yield
        except KeyboardInterrupt:
            if not note:
                raise
            raise KeyboardInterrupt(_saved_note(run_dir)) from None


def _saved_note(run_dir: Path) -> str:
    try:
        manifest = read_manifest(run_dir)
    except ValueError:
        manifest = None
    if manifest is None:
        return f"nothing was saved in {run_dir}"
    if manifest["stage"] == "done":
        return f"the run in {run_dir} is complete"
    saved = f"epoch {manifest['epoch']} is saved" if manifest["epoch"] else "no epoch is saved yet"
    return f"{saved} in {run_dir}; continue with `pyrovae resume {run_dir}`"


def _resume(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    launch = args if distributed(args) else None
    if distributed(args) or args.engine == "fit":
        check_launch(args)
        if launched_rank() > 0:  # a rank the launcher started (after rank 0 recovered the run)
            return _resume_locked(run_dir, args, launch)
    with _writer(run_dir, "pyrovae resume"):
        return _resume_locked(run_dir, args, launch)


def _resume_locked(run_dir: Path, args, launch=None) -> int:
    from .checkpoint import load_config

    writer = launch is None or launched_rank() == 0
    manifest = recover(run_dir) if writer else read_manifest(run_dir)
    config = load_config(run_dir)
    finished = run_dir / SUMMARY
    if finished.is_file() and (manifest is None or manifest["stage"] == "done"):
        summary = read_json(finished, "the run's summary")
        if summary.get("stopped_early") is True:
            raise ValueError(
                f"{run_dir} stopped early at epoch {summary.get('epochs_run')} (no better "
                f"validation ELBO for {config.patience} epochs); there is nothing to continue"
            )
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        config.epochs = args.epochs
    if args.device is not None:
        config.device = args.device
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    return run_training(run_dir, config, None, not args.no_progress and writer, launch)


def _evaluate(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if distributed(args):
        check_launch(args)
        if launched_rank() > 0:  # a rank the launcher started: scores its share, writes nothing
            return _evaluate_locked(args, start_processes(args))
    with _writer(run_dir, "pyrovae evaluate", note=False):
        recover(run_dir)
        return _evaluate_locked(args, start_processes(args) if distributed(args) else None)


def _rescoring_note(run_dir: Path, ident: dict) -> None:
    # evaluate says when it replaces an earlier score, and of which weights that one was
    old = run_dir / "eval.json"
    if not os.path.lexists(old):
        return
    try:
        before = read_json(old).get("checkpoint") or {}  # a regular file, not a link
    except (ValueError, AttributeError):
        before = {}
    same = "the same weights" if before.get("sha256") == ident["sha256"] else "other weights"
    print(f"re-scoring: replacing {old} (of {same}, epoch {before.get('epoch')})")


def _evaluate_locked(args, fabric=None) -> int:
    # fabric: the processes scoring together (each scores its blocks of the split; rank 0
    # writes), or None for this process alone
    import numpy as np
    import pyro

    from .checkpoint import load_run, weights_id
    from .data import spread
    from .evaluation import elbo, log_likelihood
    from .likelihoods import bits_per_dim
    from .rundir import DERIVED, register_derived, write_text

    device = run_device(args.device) if fabric is None else fabric.device
    vae, config = load_run(args.run_dir, device)
    ident = weights_id(Path(args.run_dir, WEIGHTS))  # what the files below are scores of
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    data = load_split(config, args.split)
    x = data.images
    if args.limit is not None:  # evenly spread: a split may be ordered by class
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        x = x[spread(len(x), args.limit)]
    x = x.to(device)
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    # per-block seeds: the same numbers from one process or from several (blocks shared out)
    ll = log_likelihood(vae.model, vae.guide, x, num_samples=args.num_samples, seed=args.seed,
                        batch_size=args.batch_size, progress=not args.no_progress)  # fmt: skip
    seconds = time.perf_counter() - start
    el = elbo(vae.model, vae.guide, x, seed=args.seed + 1)
    if fabric is not None and fabric.global_rank > 0:
        return 0
    result = {
        "log_likelihood": float(ll.mean()),
        # standard error of the mean over the scored images (the spread between images, not
        # the importance-sampling noise, dominates it)
        "log_likelihood_se": float(ll.std() / len(ll) ** 0.5) if len(ll) > 1 else None,
        "elbo": float(el.mean()),
        "num_samples": args.num_samples,
        "split": args.split,
        "n": len(x),
        "dataset": config.dataset,
        "seconds": seconds,
        "device": str(device),
        "processes": 1 if fabric is None else fabric.world_size,
        "checkpoint": ident,
    }
    bpd = ""
    if vae.likelihood.levels is not None:  # a probability mass on 8-bit values: bits/dim
        bits = bits_per_dim(ll, vae.x_shape)
        result["bits_per_dim"] = float(bits.mean())
        result["bits_per_dim_se"] = float(bits.std() / len(bits) ** 0.5) if len(bits) > 1 else None
        bpd = f", {result['bits_per_dim']:.4f} bits/dim"
    run_dir = Path(args.run_dir)
    _rescoring_note(run_dir, ident)
    write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    # per-image values, in the order scored: paired comparisons between runs on the same images
    values = io.StringIO()
    header = f"log p(x) of {WEIGHTS} epoch {ident['epoch']} sha256 {ident['sha256']}"
    np.savetxt(values, ll.cpu().double().numpy(), fmt="%.6f", header=header)
    write_text(run_dir / "log_px.csv", values.getvalue())
    from . import plots

    with atomic_path(run_dir / "log_px.png") as tmp:
        plots.plot_log_likelihood(
            ll.cpu(),
            tmp,
            title=f"log p(x), {args.split} split, K={args.num_samples}, epoch {ident['epoch']}",
        )
    register_derived(run_dir, DERIVED, ident["sha256"])
    print(
        f"{config.dataset} {args.split} (n={len(x)}): ELBO {result['elbo']:.3f}, "
        f"log p(x) {result['log_likelihood']:.3f} nats{bpd} (K={args.num_samples}, "
        f"{seconds:.1f} s)"
    )
    return 0


def _sample(args) -> int:
    import pyro

    from . import plots
    from .checkpoint import load_run

    if args.num < 1:
        raise ValueError(f"-n/--num must be >= 1, got {args.num}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    vae, _ = load_run(args.run_dir)
    pyro.set_rng_seed(args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    kind = "draw" if args.draw else "mean"
    with atomic_path(out) as tmp:  # a reader sees the old image or the new one, never a part
        plots.plot_images(vae.sample(args.num, mean=not args.draw), tmp, SAMPLE_TITLES[kind])
    print(f"wrote {args.num} {'draws' if args.draw else 'decoder means'} to {out}")
    return 0


def _bench(args) -> int:
    from .bench import main as bench_main
    from .training import resolve_device

    for key in ("rounds", "eval_n"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    for key in ("batch_sizes", "num_samples"):
        if any(v < 1 for v in getattr(args, key)):
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    args.device = str(resolve_device(args.device))
    return bench_main(args)


def _plot(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    with _writer(run_dir, "pyrovae plot", note=False):
        manifest = recover(run_dir)
        return _plot_locked(run_dir, args, manifest)


def _plot_locked(run_dir: Path, args, manifest: dict | None) -> int:
    # the plots of a run, redrawn from its best weights, metrics and validation data
    from .checkpoint import load_run

    vae, config = load_run(run_dir)
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    if manifest is not None and manifest["epoch"] == 0:
        raise CheckpointError(f"{run_dir} has no epoch saved yet: nothing to plot")
    epochs = manifest["epoch"] if manifest is not None else None
    if epochs is None:  # a run of an older pyrovae: as many rows as metrics.csv holds
        epochs = sum(1 for _ in (run_dir / METRICS_FILE).open()) - 1
    records = read_metrics(run_dir, epochs)
    draw_plots(run_dir, vae, records, load_split(config, "valid"), config.seed)
    print(f"plots of {run_dir} redrawn from its weights and {len(records)} epochs of metrics")
    return 0


def _completion(args) -> int:
    """A completion script for bash (zsh through bashcompinit): the subcommands, each one's
    options, and the values of options with choices, read from the parser itself."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, parser in sub.choices.items():
        flags = [s for a in parser._actions for s in a.option_strings]
        values = [f'      {" | ".join(a.option_strings)}) words="{" ".join(map(str, a.choices))}";;'
                  for a in parser._actions if a.option_strings and a.choices]  # fmt: skip
        cases.append(f'    {name})\n      case "$prev" in\n' + "\n".join(values)
                     + f'\n      *) words="{" ".join(flags)}";;\n      esac;;')  # fmt: skip
    script = _COMPLETION.format(commands=" ".join(sub.choices), cases="\n".join(cases))
    if args.shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    print(script)
    return 0


_COMPLETION = """_pyrovae() {{
  local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} words
  if [ "$COMP_CWORD" -eq 1 ]; then
    COMPREPLY=($(compgen -W "{commands} --version --help" -- "$cur")); return
  fi
  case "${{COMP_WORDS[1]}}" in
{cases}
  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
  [ ${{#COMPREPLY[@]}} -eq 0 ] && COMPREPLY=($(compgen -f -- "$cur"))
}}
complete -F _pyrovae pyrovae"""


def _verify(args) -> int:
    from .verify import command

    return command(args)


COMMANDS = {
    "verify": _verify,
    "train": _train,
    "resume": _resume,
    "evaluate": _evaluate,
    "sample": _sample,
    "plot": _plot,
    "bench": _bench,
    "completion": _completion,
}


def _sigterm(signum, frame):
    raise KeyboardInterrupt


#: Exit statuses of the pyrovae command (docs/cli.md).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _debugging(argv: list[str]) -> tuple[bool, list[str]]:
    # --debug anywhere on the command line (or PYROVAE_DEBUG=1): tracebacks are shown
    debug = "--debug" in argv or os.environ.get("PYROVAE_DEBUG", "") not in ("", "0")
    return debug, [a for a in argv if a != "--debug"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (errors print one line to stderr; ``--debug`` or
    ``PYROVAE_DEBUG=1`` adds the traceback). SIGTERM stops it like SIGINT: the run keeps its
    last saved epoch, and the message says how to continue."""
    _quiet_openmp()
    debug, argv = _debugging(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also PYROVAE_DEBUG=1)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        if getattr(args, "config", None):
            args = _with_config_file(parser, args.config, argv)
        _set_threads(args.threads)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as e:
        note = f"; {e}" if str(e) else ""
        print(f"pyrovae {args.command}: interrupted{note}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # every failure: one line, and the traceback only when asked
        if debug:
            import traceback

            traceback.print_exc()
        code, line = _one_line(e, args)
        print(f"pyrovae {args.command}: {line}", file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(e: Exception, args) -> tuple[int, str]:
    # (exit status, message) of a failure: the error's own message for bad input, else what
    # failed and how to see more
    from .launch import rank_failure

    text = " ".join(str(e).split())[:1000]
    run_dir = getattr(args, "run_dir", None) or getattr(args, "out", None)
    if hasattr(args, "devices") and distributed(args) and (line := rank_failure(e, run_dir)):
        return EXIT_ERROR, f"error: {line}"
    if isinstance(e, (ValueError, OSError)):
        return EXIT_ERROR, f"error: {text}"
    if isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return EXIT_ERROR, (f"error: out of memory ({text[:300]}); use smaller sizes (--hidden, "
                            "--batch-size) or free memory")  # fmt: skip
    what = f"internal error: {type(e).__name__}: {text[:300]}"
    return EXIT_INTERNAL, f"{what}; run again with --debug for the traceback, and please report it"


if __name__ == "__main__":
    sys.exit(main())
