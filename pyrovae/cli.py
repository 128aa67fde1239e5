"""The ``pyrovae`` command: ``train``, ``resume``, ``evaluate``, ``sample`` and ``bench``.

``pyrovae train`` with no options trains a small VAE on scikit-learn's bundled 8×8 digits, offline,
and leaves a run directory with the config, a checkpoint, per-epoch metrics and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    # One line on a usage error, not usage + error.
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .config import LOSSES, MODELS, Config
    from .data import BINARIZE, DATASETS
    from .guides import GUIDES
    from .likelihoods import LIKELIHOODS
    from .nets import ACTIVATIONS, NETS
    from .priors import PRIORS

    d = Config()
    parser = _Parser(prog="pyrovae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a VAE and write a run directory")
    t.add_argument("--dataset", choices=list(DATASETS), default=d.dataset)
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
    t.add_argument("--net", choices=list(NETS), default=d.net)
    t.add_argument("--hidden", type=int, nargs="+", default=list(d.hidden), help="hidden sizes")
    t.add_argument("--widths", type=int, nargs="+", default=list(d.widths),
                   help="conv: channels of the residual blocks (one halving each)")  # fmt: skip
    t.add_argument("--gated", action="store_true", help="GatedDense layers (VampPrior paper)")
    t.add_argument("--activation", choices=list(ACTIVATIONS), default=d.activation)
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
    t.add_argument("--likelihood", choices=list(LIKELIHOODS), default=d.likelihood)
    t.add_argument(
        "--variance", type=float, default=d.variance, help="c of the Gaussian N(f(z), c·I)"
    )
    t.add_argument("--allow-non-binary", action="store_true", help="Bernoulli on grey values")
    t.add_argument("--mixtures", type=int, default=d.mixtures,
                   help="logistic components per pixel (discretized-logistic)")  # fmt: skip
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--loss", choices=list(LOSSES), default=d.loss)
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
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--device", default=d.device, help="auto (CUDA when there is one), cpu, cuda")
    t.add_argument("--out", default=None, help="run directory (default runs/DATASET-TIMESTAMP)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    r = sub.add_parser("resume", help="continue an interrupted run where its last epoch ended")
    r.add_argument("run_dir")
    r.add_argument(
        "--epochs", type=int, default=None, help="train up to N epochs in all (default: the run's)"
    )
    r.add_argument("--device", default=None, help="train on another device (default: the run's)")
    r.add_argument("--data-dir", default=None, help="override the run's data root")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("evaluate", help="ELBO and importance-sampled log p(x) of a run")
    e.add_argument("run_dir")
    e.add_argument("--num-samples", type=int, default=5000, help="K importance samples")
    e.add_argument("--split", choices=["train", "valid", "test"], default="test")
    e.add_argument(
        "--limit", type=int, default=None, help="score N datapoints spread over the split"
    )
    e.add_argument("--batch-size", type=int, default=None, help="datapoints per chunk")
    e.add_argument("--data-dir", default=None, help="override the run's data root")
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("sample", help="a grid of images drawn from the prior")
    s.add_argument("run_dir")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("-n", "--num", type=int, default=64, help="number of images")
    s.add_argument("--seed", type=int, default=0)

    b = sub.add_parser("bench", help="images/s of fit and log p(x) against hand-written PyTorch")
    b.add_argument("--dataset", choices=list(DATASETS), default="digits")
    b.add_argument("--data-dir", default=None)
    b.add_argument("--arch", choices=["mlp", "vampprior"], default="mlp",
                   help="mlp: 784-400-50; vampprior: GatedDense(300) x 2, z=40")  # fmt: skip
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[256])
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
    b.add_argument("--device", default="cpu")
    b.add_argument("--seed", type=int, default=0)
    return parser


def _resolve_binarize(config) -> str:
    if config.binarize != "auto":
        return config.binarize
    if config.likelihood != "bernoulli" or config.dataset == "binarized-mnist":
        return "none"
    return "threshold" if config.dataset == "digits" else "dynamic"


#: Config fields passed to pyrovae.data.load as reader options (the folder dataset's).
FOLDER_OPTIONS = ("image_size", "channels", "skip_bad_files", "valid_fraction", "test_fraction")


def _load(config, split: str):
    from .data import load

    options = {key: getattr(config, key) for key in FOLDER_OPTIONS}
    return load(
        config.dataset,
        split,
        config.data_dir,
        config.binarize,
        config.download,
        config.seed,
        **options,
    )


#: Columns of metrics.csv: fit's record, the KL weight β of the epoch, and (with --test-every)
#: the test log-likelihood estimate.
METRICS = ["epoch", "train_elbo", "val_elbo", "seconds", "beta", "test_ll"]


def _write_metrics(run_dir: Path, records: list[dict]) -> None:
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def _plots(run_dir: Path, vae, records, data, seed: int) -> None:
    import pyro
    import torch

    from . import plots

    pyro.set_rng_seed(seed)
    plots.plot_history(records, run_dir / "elbo.png")
    x = data.images[:50].to(next(vae.parameters()).device)
    plots.plot_reconstructions(x.cpu(), vae.reconstruct(x).cpu(), run_dir / "reconstructions.png")
    plots.plot_images(vae.sample(64).cpu(), run_dir / "samples.png", "samples from the prior")
    with torch.no_grad():
        means = torch.cat([vae.encode(b.to(x.device))[0].cpu() for b in data.images.split(1024)])
    plots.plot_latent(
        means,
        data.labels,
        run_dir / "latent.png",
        f"q(z|x) means, {data.split} split",
        classes=getattr(data, "classes", None),
    )
    with torch.no_grad():
        if means.shape[1] == 2:  # the decoded latent plane
            plots.plot_manifold(
                lambda z: vae.decode(z.to(x.device)).cpu(), run_dir / "manifold.png"
            )
        else:  # one row per latent dimension, through the centre of the codes
            plots.plot_traversals(
                lambda z: vae.decode(z.to(x.device)).cpu(),
                means.mean(0),
                run_dir / "traversals.png",
            )


def _check_train_args(args) -> None:
    for key in ("test_samples", "test_limit"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.test_every < 0:
        raise ValueError(f"--test-every must be >= 0, got {args.test_every}")


#: The train options that are not part of the model's Config; a continued run keeps them.
OPTIONS = ("test_every", "test_samples", "test_limit")


def _train(args) -> int:
    from .config import Config

    names = {f.name for f in fields(Config)}
    config = Config.from_dict({k: v for k, v in vars(args).items() if k in names})
    config.validate()
    _check_train_args(args)
    run_dir = Path(args.out or f"runs/{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    options = {key: getattr(args, key) for key in OPTIONS}
    return _run_training(run_dir, config, options, progress=not args.no_progress)


def _resume(args) -> int:
    from .checkpoint import load_config

    run_dir = Path(args.run_dir)
    config = load_config(run_dir)
    finished = run_dir / "train.json"
    if finished.is_file():
        summary = json.loads(finished.read_text())
        if summary.get("stopped_early"):
            raise ValueError(
                f"{run_dir} stopped early at epoch {summary['epochs_run']} (no better validation "
                f"ELBO for {config.patience} epochs); there is nothing to continue"
            )
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        config.epochs = args.epochs
    if args.device is not None:
        config.device = args.device
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    return _run_training(run_dir, config, None, progress=not args.no_progress)


def _read_metrics(run_dir: Path, last_epoch: int) -> list[dict]:
    # metrics.csv back into records, up to the saved epoch (a later row was not saved in full)
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    records = []
    for row in rows:
        record = {k: (None if v in ("", None) else float(v)) for k, v in row.items()}
        record["epoch"] = int(record["epoch"])
        if record["epoch"] <= last_epoch:
            records.append(record)
    return records


def _run_training(run_dir: Path, config, options: dict | None, progress: bool) -> int:
    """Train ``config``'s model in ``run_dir``: a new run when ``options`` are given, else the
    continuation of the run saved there (its weights, optimizer, generators, warm-up, early
    stopping and metrics as at the end of its last epoch)."""
    import pyro

    from .checkpoint import WEIGHTS, load_state, load_weights, save_run, save_state
    from .config import build_vae
    from .data import ImageDataset, spread
    from .errors import NonFiniteLossError
    from .evaluation import log_likelihood
    from .objectives import make_loss
    from .schedules import KLSchedule
    from .selection import EarlyStopping
    from .training import TrainState, fit, resolve_device

    # a fresh model: no parameter of an earlier run in this process may shadow its own (a
    # PyroModule registers its parameters in the global store by name)
    pyro.clear_param_store()
    device = resolve_device(config.device)
    config.binarize = _resolve_binarize(config)
    train, valid = _load(config, "train"), _load(config, "valid")
    if config.train_limit is not None and config.train_limit < len(train):
        n = config.train_limit
        labels = None if train.labels is None else train.labels[:n]
        train = ImageDataset(
            train.images[:n], labels, train.name, train.split, train.batch_transform
        )
    config.x_shape = train.x_shape
    pyro.set_rng_seed(config.seed)  # the seed also fixes the initial weights
    vae = build_vae(config)
    transform = train.batch_transform
    check = train.images if transform is None else transform(train.tensors)[0]
    vae.check_data(check)
    state, records, before = TrainState(), [], 0.0  # before: seconds trained in earlier calls
    last_epoch = config.epochs  # the epoch to train up to
    stopper = EarlyStopping(
        vae,
        valid.images.to(device),
        config.patience,
        config.warmup,
        on_improve=lambda record: save_run(run_dir, vae, config),  # the best checkpoint
    )
    if options is None:  # continue the run saved in run_dir
        state, extra = load_state(run_dir, vae, device)
        summary = run_dir / "train.json"  # may be an earlier call's, if this one was cut off
        summarized = summary.is_file() and json.loads(summary.read_text())["epochs_run"] >= (
            state.epoch
        )
        if state.epoch > config.epochs or (state.epoch == config.epochs and summarized):
            raise ValueError(
                f"{run_dir} has trained {state.epoch} epochs already; give --epochs N with "
                f"N > {state.epoch} to train longer"
            )
        options, before = extra["options"], float(extra["train_seconds"])
        best = load_weights(build_vae(config), run_dir / WEIGHTS)
        stopper.load_state_dict(
            extra["stopper"], {k: v.to(device) for k, v in best.state_dict().items()}
        )
        records = _read_metrics(run_dir, state.epoch)
        if stopper.stopped_epoch is not None:  # stopped early, then cut off before the summary
            last_epoch = state.epoch  # nothing to train: only finish the run
    # the plain ELBO is fit's default objective (which fit knows how to run fastest)
    default = (config.loss, config.particles) == ("elbo", 1)
    loss = None if default else make_loss(config.loss, config.particles)
    test_x = None
    if options["test_every"]:
        test = _load(config, "test")
        test_x = test.images[spread(len(test), options["test_limit"])].to(device)
    run_dir.mkdir(parents=True, exist_ok=True)
    vae.to(device)
    schedule = KLSchedule(vae, config.warmup, config.beta)
    schedule.set_epoch(state.epoch + 1)
    start = time.perf_counter()

    def callback(record: dict) -> bool:
        schedule(record)  # records the epoch's β, sets the next one
        stop = stopper(record)  # records the validation ELBO, keeps the best weights
        if test_x is not None and record["epoch"] % options["test_every"] == 0:
            ll = log_likelihood(vae.model, vae.guide, test_x, num_samples=options["test_samples"])
            record["test_ll"] = float(ll.mean())
        records.append(record)
        _write_metrics(run_dir, records)
        seconds = before + time.perf_counter() - start
        extra = {"stopper": stopper.state_dict(), "options": options, "train_seconds": seconds}
        save_state(run_dir, vae, state, extra)  # what `pyrovae resume` continues from
        return stop

    what = "training" if state.epoch == 0 else f"continuing from epoch {state.epoch}"
    skipped = len(train.skipped) + len(valid.skipped)
    note = f", {skipped} unreadable files skipped" if skipped else ""
    print(
        f"{what} on {config.dataset} ({len(train)} images{note}, {device}); run directory {run_dir}"
    )
    try:
        fit(
            vae.model,
            vae.guide,
            train,
            epochs=last_epoch,
            batch_size=config.batch_size,
            lr=config.lr,
            loss=loss,
            device=device,
            seed=config.seed,
            callback=callback,
            progress=progress,
            state=state,
        )
    except NonFiniteLossError as e:
        kept = (
            f"the checkpoint of epoch {stopper.best_epoch} is kept in {run_dir} (the best "
            "validation ELBO so far)"
            if stopper.best_epoch is not None
            else "no checkpoint was written"
        )
        raise ValueError(f"{e}; {kept}") from e
    seconds = before + time.perf_counter() - start
    if stopper.best_epoch is None:
        raise ValueError(f"no epoch had a finite validation ELBO; nothing was saved in {run_dir}")
    stopper.restore()
    vae.beta = config.beta
    save_run(run_dir, vae, config)  # the best weights, and the config with its epochs
    summary = {
        "best_epoch": stopper.best_epoch,
        "best_val_elbo": stopper.best_value,
        "epochs_run": len(records),
        "stopped_early": stopper.stopped_epoch is not None,
        "train_seconds": seconds,
        "device": str(device),
        "skipped_files": len(train.skipped) + len(valid.skipped),
    }
    (run_dir / "train.json").write_text(json.dumps(summary, indent=2))
    _plots(run_dir, vae, records, valid, config.seed)
    stop = f"stopped early at epoch {len(records)}; " if summary["stopped_early"] else ""
    print(
        f"done in {seconds:.1f} s: {stop}best validation ELBO {stopper.best_value:.3f} nats per "
        f"image at epoch {stopper.best_epoch}, kept in {run_dir}"
    )
    return 0


def _evaluate(args) -> int:
    import numpy as np
    import pyro

    from .checkpoint import load_run
    from .data import spread
    from .evaluation import elbo, log_likelihood
    from .likelihoods import bits_per_dim
    from .training import resolve_device

    device = resolve_device(args.device)
    vae, config = load_run(args.run_dir, device)
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    data = _load(config, args.split)
    x = data.images
    if args.limit is not None:  # evenly spread: a split may be ordered by class
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        x = x[spread(len(x), args.limit)]
    x = x.to(device)
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    ll = log_likelihood(
        vae.model, vae.guide, x, num_samples=args.num_samples, batch_size=args.batch_size
    )
    seconds = time.perf_counter() - start
    el = elbo(vae.model, vae.guide, x)
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
    }
    bpd = ""
    if vae.likelihood.levels is not None:  # a probability mass on 8-bit values: bits/dim
        bits = bits_per_dim(ll, vae.x_shape)
        result["bits_per_dim"] = float(bits.mean())
        result["bits_per_dim_se"] = float(bits.std() / len(bits) ** 0.5) if len(bits) > 1 else None
        bpd = f", {result['bits_per_dim']:.4f} bits/dim"
    Path(args.run_dir, "eval.json").write_text(json.dumps(result, indent=2))
    # per-image values, in the order scored: paired comparisons between runs on the same images
    np.savetxt(Path(args.run_dir, "log_px.csv"), ll.cpu().double().numpy(), fmt="%.6f")
    from . import plots

    plots.plot_log_likelihood(
        ll.cpu(),
        Path(args.run_dir, "log_px.png"),
        title=f"log p(x), {args.split} split, K={args.num_samples}",
    )
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
    plots.plot_images(vae.sample(args.num), out, "samples from the prior")
    print(f"wrote {args.num} samples to {out}")
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


COMMANDS = {
    "train": _train,
    "resume": _resume,
    "evaluate": _evaluate,
    "sample": _sample,
    "bench": _bench,
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (errors print one line to stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as e:
        print(f"pyrovae {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pyrovae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
