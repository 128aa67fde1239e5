"""The ``pyrovae`` command: ``train``, ``resume``, ``evaluate``, ``sample``, ``plot``, ``bench``
and ``completion``.

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

from .choices import DATASETS, SPLITS
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
    data_dir_for,
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
            or default is None
            or default is False  # a flag (0 is a default to show)
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


def add_pair_args(parser: argparse.ArgumentParser) -> None:
    """``train``'s options for a user's own pair and data (not part of Config: the run records
    them in pair.json)."""
    parser.add_argument(
        "--pair",
        metavar="FILE.py:NAME",
        help="train your own pair: NAME() returns an nn.Module with model and guide methods, or "
        "a (model, guide) tuple; on --dataset's images, or on --data (default: none, the "
        "built-in VAE)",
    )
    parser.add_argument(
        "--data",
        metavar="FILE.npz",
        help="with --pair: train on the arrays of an .npz file, in the file's order as the "
        "pair's positional tensors, split by --valid-fraction/--test-fraction and --seed "
        "(default: none, --dataset's images)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``pyrovae`` command's parser; importing what it needs loads neither torch nor Pyro,
    so ``--help``, ``--version`` and ``completion`` answer at once."""
    from . import __version__

    parser = _Parser(prog="pyrovae", description="Variational autoencoders as Pyro model/guide "
                     "pairs: train one into a run directory, then score, sample and plot it.",
                     epilog="Each command's options: pyrovae COMMAND --help")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"pyrovae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                title="commands", metavar="COMMAND")  # fmt: skip
    for add in (_train_parser, _resume_parser, _evaluate_parser, _sample_parser, _plot_parser,
                _bench_parser, _verify_parser, _completion_parser):  # fmt: skip
        add(sub)
    for name, command in sub.choices.items():
        if name != "completion":  # which runs no torch
            command.add_argument("--threads", type=int, default=None, help=_THREADS)
    return parser


_THREADS = ("torch's CPU threads (default: one per core, waiting passively; 1 is fastest beside "
            "other busy processes)")  # fmt: skip


#: Python types of Config's field annotations, as argparse converts them.
_TYPES = {"int": int, "float": float, "str": str, "tuple[int, ...]": int}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    # one option per Config field (--z-dim for z_dim): default, choices and help from the field
    from .config import Config

    group = parser.add_argument_group("settings", "saved in the run's config.json; --config FILE "
                                      "reads them from a file")  # fmt: skip
    for f in fields(Config):
        setting = f.metadata.get("setting")
        if setting is None:  # x_shape: the data decide it
            continue
        flag, kind = "--" + f.name.replace("_", "-"), f.type.removesuffix(" | None")
        if kind == "bool":
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            group.add_argument(flag, action=action, help=setting.help)
            continue
        unset = f" (default: {setting.unset})" if f.default is None and setting.unset else ""
        group.add_argument(flag, type=_TYPES[kind], choices=list(setting.choices) or None,
                           nargs="+" if kind.startswith("tuple") else None,
                           default=list(f.default) if isinstance(f.default, tuple) else f.default,
                           help=setting.help + unset)  # fmt: skip


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a VAE (or your own pair) and write a run directory")
    _add_config_options(t)
    # the run's own options (not settings of the model: not in config.json)
    add_pair_args(t)
    t.add_argument("--test-every", type=int, default=0,
                   help="every N epochs, record log p(x) on test images in metrics.csv "
                   "(0: never)")  # fmt: skip
    t.add_argument("--test-samples", type=int, default=100, help="K for --test-every")
    t.add_argument("--test-limit", type=int, default=1000, help="test images for --test-every")
    t.add_argument("--out", default=None, help="run directory (default runs/DATASET-TIMESTAMP)")
    t.add_argument("--config", default=None, metavar="FILE",
                   help="settings from a JSON or TOML file with config.json's keys; flags given "
                   "on the command line override them (default: none)")  # fmt: skip
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (default: refuse it)")  # fmt: skip
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_launch_args(t, train=True)


def _run_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (what train wrote, its --out)")


def _resume_parser(sub) -> None:
    r = sub.add_parser("resume", help="continue an interrupted run where its last epoch ended")
    _run_dir(r)
    r.add_argument("--epochs", type=int, default=None,
                   help="train up to N epochs in all (default: the run's)")  # fmt: skip
    r.add_argument("--device", default=None, help="train on another device (default: the run's)")
    r.add_argument("--data-dir", default=None,
                   help="override the run's data root (default: the run's)")  # fmt: skip
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_launch_args(r, train=True)


def _evaluate_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="ELBO and importance-sampled log p(x) of a run")
    _run_dir(e)
    e.add_argument("--num-samples", type=int, default=5000, help="K importance samples")
    e.add_argument("--split", choices=list(SPLITS), default="test", help="the split to score")
    e.add_argument("--limit", type=int, default=None,
                   help="score N datapoints spread over the split (default: all)")  # fmt: skip
    e.add_argument("--batch-size", type=int, default=None,
                   help="datapoints per chunk (default: as many as the device's chunk bound "
                   "holds with K samples each)")  # fmt: skip
    e.add_argument("--data-dir", default=None,
                   help="override the run's data root (default: the run's)")  # fmt: skip
    e.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda")
    e.add_argument("--seed", type=int, default=0, help="seeds the importance samples")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--method", choices=["is", "ais", "bdmc"], default="is",
                   help="is: importance sampling from q(z|x) with --num-samples; ais: annealed "
                        "importance sampling (--chains x --steps x --leapfrog); bdmc: AIS "
                        "bounds on --limit images simulated from the model")  # fmt: skip
    e.add_argument("--chains", type=int, default=16, help="AIS chains per image (ais, bdmc)")
    e.add_argument("--steps", type=int, default=100, help="AIS annealing steps (ais, bdmc)")
    e.add_argument("--leapfrog", type=int, default=5,
                   help="leapfrog steps per HMC move (ais, bdmc)")  # fmt: skip
    add_launch_args(e, train=False)


def _sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="a grid of images from the prior: decoder means or draws")
    _run_dir(s)
    s.add_argument("--out", required=True, help="PNG file to write (required)")
    s.add_argument("-n", "--num", type=int, default=64, help="number of images")
    s.add_argument("--seed", type=int, default=0, help="seeds the prior draws")
    what = s.add_mutually_exclusive_group()
    what.add_argument("--mean", dest="draw", action="store_false", default=False,
                      help="show the mean of p(x|z) for each z ~ p(z) (the default)")  # fmt: skip
    what.add_argument("--draw", dest="draw", action="store_true",
                      help="draw x ~ p(x|z) (binary pixels for a Bernoulli)")  # fmt: skip


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="redraw a run's plots from its weights and metrics")
    _run_dir(p)
    p.add_argument("--data-dir", default=None,
                   help="override the run's data root (default: the run's)")  # fmt: skip


def _bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="images/s of fit and log p(x) against hand-written PyTorch")
    b.add_argument("--dataset", choices=list(DATASETS), default="digits", help="training images")
    b.add_argument("--data-dir", default=None, help="data root (default $PYROVAE_DATA)")
    b.add_argument("--arch", choices=["mlp", "vampprior"], default="mlp",
                   help="mlp: 784-400-50; vampprior: GatedDense(300) x 2, z=40")  # fmt: skip
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[256], help="batch sizes timed")
    b.add_argument("--rounds", type=int, default=3, help="timed repeats per method")
    b.add_argument("--limit", type=int, default=None,
                   help="use the first N training images (default: all)")  # fmt: skip
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


def _verify_parser(sub) -> None:
    from .verify import add_parser

    add_parser(sub)  # pyrovae verify RUN [--adopt]


def _completion_parser(sub) -> None:
    c = sub.add_parser("completion", help="print a shell completion script")
    c.add_argument("shell", choices=["bash", "zsh"],
                   help="source its output, e.g. eval \"$(pyrovae completion bash)\"")  # fmt: skip
    c.set_defaults(threads=None)  # no torch here: no --threads


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
    if args.data is not None and args.pair is None:
        raise ValueError("--data FILE.npz trains a pair of your own: give --pair FILE.py:NAME")
    stem = Path(args.pair.rpartition(":")[0]).stem if args.pair else config.dataset
    run_dir = Path(args.out or f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.out = str(run_dir)  # for the message of a failure
    options = {key: getattr(args, key) for key in OPTIONS}
    progress = not args.no_progress
    launch = args if distributed(args) else None
    if distributed(args) or args.engine == "fit":
        check_launch(args)
        if launched_rank() > 0:  # a rank the launcher started: trains its shard, writes nothing
            return run_training(run_dir, config, options, False, launch, args.pair, args.data)
    created = not run_dir.exists()
    try:
        with _writer(run_dir, "pyrovae train"):
            clear_for_new_run(run_dir, args.overwrite)
            return run_training(run_dir, config, options, progress, launch, args.pair, args.data)
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
    config.data_dir = data_dir_for(run_dir, config, args.data_dir)
    return run_training(run_dir, config, None, not args.no_progress and writer, launch)


def _evaluate(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if distributed(args):
        if args.method != "is":
            raise ValueError(f"--method {args.method} runs in one process; drop --devices and "
                             "the other launch options")  # fmt: skip
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
    import pyro

    from .checkpoint import weights_id
    from .evaluation import scoring_estimate
    from .runs import load_run_pair

    device = run_device(args.device) if fabric is None else fabric.device
    pair, config = load_run_pair(Path(args.run_dir), device, args.data_dir)
    ident = weights_id(Path(args.run_dir, WEIGHTS))  # what the files below are scores of
    x = _scored_data(args, config, pair, device)
    writer = fabric is None or fabric.global_rank == 0
    if writer and args.method == "is":  # the cost, said before it is spent
        print(scoring_estimate(pair.model, pair.guide, x, args.num_samples, seed=args.seed)[1])
    pyro.set_rng_seed(args.seed)
    if args.method == "bdmc":
        return _bdmc(args, pair, x, ident)
    report, el, seconds = _score(args, pair, x)
    if not writer:
        return 0
    result = {
        "log_likelihood": float(report.log_px.mean()),
        # standard error of the mean over the scored images (the spread between images, not
        # the importance-sampling noise, dominates it)
        "log_likelihood_se": _se(report.log_px),
        "elbo": float(el.mean()),
        "num_samples": _samples(args),
        "split": args.split,
        "n": len(x[0]),
        "dataset": config.dataset,
        "seconds": seconds,
        "device": str(device),
        "processes": 1 if fabric is None else fabric.world_size,
        "checkpoint": ident,
        **_reliability(args, report),
        **_bits(pair, report.log_px),
    }
    _write_scores(Path(args.run_dir), args, ident, result, report)
    bpd = f", {result['bits_per_dim']:.4f} bits/dim" if "bits_per_dim" in result else ""
    what = config.dataset if pair.source is None else pair.source["name"]
    print(
        f"{what} {args.split} (n={len(x[0])}): ELBO {result['elbo']:.3f}, "
        f"log p(x) {result['log_likelihood']:.3f} nats{bpd} ({_budget(args)}, {seconds:.1f} s)"
    )
    print(report.verdict())
    return 0


def _scored_data(args, config, pair, device) -> tuple:
    # the split's tensors evaluate scores (--limit of them, spread over the split: a split may
    # be ordered by class), on the scoring device
    from .data import spread
    from .runs import scoring_split

    x = scoring_split(config, args.split, pair).tensors
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        x = tuple(t[spread(len(t), args.limit)] for t in x)
    return tuple(t.to(device) for t in x)


def _score(args, pair, x):
    # log p(x) with its diagnostics, the ELBO, and the seconds log p(x) took; per-block seeds:
    # the same numbers from one process or from several (blocks shared out)
    from .evaluation import elbo, log_likelihood_report

    start = time.perf_counter()
    report = log_likelihood_report(
        pair.model, pair.guide, x, num_samples=_samples(args), seed=args.seed,
        batch_size=args.batch_size, progress=not args.no_progress, method=args.method,
        steps=args.steps, leapfrog=args.leapfrog,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    return report, elbo(pair.model, pair.guide, x, seed=args.seed + 1), seconds


def _se(values) -> float | None:
    return float(values.std() / len(values) ** 0.5) if len(values) > 1 else None


def _bits(pair, ll) -> dict:
    # bits/dim for a likelihood with a probability mass on 8-bit values (the built-in VAE's)
    from .likelihoods import bits_per_dim

    vae = pair.vae
    if vae is None or vae.likelihood.levels is None:
        return {}
    bits = bits_per_dim(ll, vae.x_shape)
    return {"bits_per_dim": float(bits.mean()), "bits_per_dim_se": _se(bits)}


def _write_scores(run_dir: Path, args, ident: dict, result: dict, report) -> None:
    # eval.json, log_px.csv (per image, in the order scored: paired comparisons between runs on
    # the same images) and log_px.png, registered as derived from the scored weights
    import numpy as np
    import torch

    from . import plots
    from .rundir import DERIVED, register_derived, write_text

    _rescoring_note(run_dir, ident)
    write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    values = io.StringIO()
    header = f"log p(x) of {WEIGHTS} epoch {ident['epoch']} sha256 {ident['sha256']}"
    columns = torch.stack([report.log_px, report.stderr, report.ess, report.khat], 1)  # (N, 4)
    np.savetxt(values, columns.cpu().double().numpy(), fmt="%.6f", delimiter=",",
               header=f"{header}\nlog_px,stderr,ess,khat")  # fmt: skip
    write_text(run_dir / "log_px.csv", values.getvalue())
    with atomic_path(run_dir / "log_px.png") as tmp:
        plots.plot_log_likelihood_reliability(
            report, tmp, title=f"log p(x) per image, {args.split} split, {_budget(args)}, "
                               f"epoch {ident['epoch']}",
        )  # fmt: skip
    register_derived(run_dir, DERIVED, ident["sha256"])


def _samples(args) -> int:
    # the K of the estimate: importance samples, or AIS chains
    return args.num_samples if args.method == "is" else args.chains


def _budget(args) -> str:
    if args.method == "is":
        return f"K={args.num_samples}"
    return f"AIS {args.chains} chains × {args.steps} steps × {args.leapfrog} leapfrog"


def _reliability(args, report) -> dict:
    # eval.json's account of how far to trust the estimate
    extra = {"method": args.method, "khat_bands": report.bands(),
             "stderr_mean": float(report.stderr.mean()), "ess_mean": float(report.ess.mean()),
             "verdict": report.verdict()}  # fmt: skip
    if args.method == "ais":
        extra.update(chains=args.chains, steps=args.steps, leapfrog=args.leapfrog)
    return extra


def _bdmc(args, pair, x, ident) -> int:
    # BDMC on --limit images simulated from the model: writes bdmc.json, prints the gap
    from .ais import bdmc
    from .rundir import register_derived, write_text

    start = time.perf_counter()
    data = x[0] if len(x) == 1 else x
    r = bdmc(pair.model, pair.guide, data, chains=args.chains, steps=args.steps,
             leapfrog=args.leapfrog, batch_size=args.batch_size, seed=args.seed,
             progress=not args.no_progress)  # fmt: skip
    seconds = time.perf_counter() - start
    n = len(r.gap)
    result = {
        "lower": float(r.lower.mean()), "upper": float(r.upper.mean()),
        "gap": float(r.gap.mean()),
        "gap_se": float(r.gap.std() / n**0.5) if n > 1 else None,
        "n": n, "chains": args.chains, "steps": args.steps, "leapfrog": args.leapfrog,
        "seconds": seconds, "checkpoint": ident,
    }  # fmt: skip
    run_dir = Path(args.run_dir)
    write_text(run_dir / "bdmc.json", json.dumps(result, indent=2))
    register_derived(run_dir, ("bdmc.json",), ident["sha256"])
    print(
        f"BDMC on {n} images simulated from the model: log p(x) between {result['lower']:.3f} "
        f"(forward AIS) and {result['upper']:.3f} (reverse AIS), gap {result['gap']:.3f} nats "
        f"({_budget(args)}, {seconds:.1f} s)"
    )
    return 0


def _sample(args) -> int:
    import pyro

    from . import plots
    from .runs import load_run_pair

    if args.num < 1:
        raise ValueError(f"-n/--num must be >= 1, got {args.num}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    pair, _ = load_run_pair(Path(args.run_dir), "cpu")
    vae = pair.vae
    if vae is None:
        raise ValueError(
            f"{args.run_dir} trained {pair.source['name']} from {pair.source['file']}: "
            "pyrovae sample draws from the built-in VAE; use pyro.infer.Predictive on your model"
        )
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
    from .runs import draw_history, load_run_pair

    pair, config = load_run_pair(run_dir, "cpu", args.data_dir)
    if manifest is not None and manifest["epoch"] == 0:
        raise CheckpointError(f"{run_dir} has no epoch saved yet: nothing to plot")
    epochs = manifest["epoch"] if manifest is not None else None
    if epochs is None:  # a run of an older pyrovae: as many rows as metrics.csv holds
        epochs = sum(1 for _ in (run_dir / METRICS_FILE).open()) - 1
    records = read_metrics(run_dir, epochs)
    if pair.vae is not None:
        draw_plots(run_dir, pair.vae, records, load_split(config, "valid"), config.seed)
    else:
        draw_history(run_dir, records)
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
