"""The ``pyrovae`` command: ``train``, ``evaluate``, ``sample`` and ``bench``.

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
    from .config import LOSSES, Config
    from .data import BINARIZE, DATASETS
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
    t.add_argument("--net", choices=list(NETS), default=d.net)
    t.add_argument("--hidden", type=int, nargs="+", default=list(d.hidden), help="hidden sizes")
    t.add_argument("--gated", action="store_true", help="GatedDense layers (VampPrior paper)")
    t.add_argument("--activation", choices=list(ACTIVATIONS), default=d.activation)
    t.add_argument("--z-dim", type=int, default=d.z_dim)
    t.add_argument("--prior", choices=list(PRIORS), default=d.prior)
    t.add_argument("--likelihood", choices=list(LIKELIHOODS), default=d.likelihood)
    t.add_argument(
        "--variance", type=float, default=d.variance, help="c of the Gaussian N(f(z), c·I)"
    )
    t.add_argument("--allow-non-binary", action="store_true", help="Bernoulli on grey values")
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--loss", choices=list(LOSSES), default=d.loss)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--device", default=d.device, help="auto (CUDA when there is one), cpu, cuda")
    t.add_argument("--out", default=None, help="run directory (default runs/DATASET-TIMESTAMP)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

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
    b.add_argument("--hidden", type=int, nargs="+", default=[400])
    b.add_argument("--z-dim", type=int, default=50)
    b.add_argument("--gated", action="store_true")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--rounds", type=int, default=3, help="timed epochs per method")
    b.add_argument("--limit", type=int, default=None, help="use the first N training images")
    b.add_argument("--num-samples", type=int, default=5000, help="K for log p(x); 0 skips it")
    b.add_argument("--eval-n", type=int, default=100, help="test images scored")
    b.add_argument("--device", default="cpu")
    b.add_argument("--seed", type=int, default=0)
    return parser


def _resolve_binarize(config) -> str:
    if config.binarize != "auto":
        return config.binarize
    if config.likelihood != "bernoulli" or config.dataset == "binarized-mnist":
        return "none"
    return "threshold" if config.dataset == "digits" else "dynamic"


def _load(config, split: str):
    from .data import load

    return load(
        config.dataset, split, config.data_dir, config.binarize, config.download, config.seed
    )


def _write_metrics(run_dir: Path, records: list[dict]) -> None:
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "train_elbo", "val_elbo", "seconds"])
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
        means, data.labels, run_dir / "latent.png", f"q(z|x) means, {data.split} split"
    )


def _train(args) -> int:
    from .checkpoint import save_run
    from .config import LOSSES, Config, build_vae
    from .errors import NonFiniteLossError
    from .training import fit, resolve_device

    names = {f.name for f in fields(Config)}
    config = Config.from_dict({k: v for k, v in vars(args).items() if k in names})
    config.validate()
    device = resolve_device(config.device)
    config.binarize = _resolve_binarize(config)
    train, valid = _load(config, "train"), _load(config, "valid")
    config.x_shape = train.x_shape
    vae = build_vae(config)
    check = train.images if train.transform is None else train.transform(train.tensors)[0]
    vae.check_data(check)
    run_dir = Path(args.out or f"runs/{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    import pyro.infer

    loss = getattr(pyro.infer, LOSSES[config.loss])()
    records: list[dict] = []

    def checkpoint(record: dict) -> None:
        records.append(record)
        save_run(run_dir, vae, config)
        _write_metrics(run_dir, records)

    print(f"training on {config.dataset} ({len(train)} images, {device}); run directory {run_dir}")
    start = time.perf_counter()
    try:
        fit(
            vae.model,
            vae.guide,
            train,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            loss=loss,
            device=device,
            val_data=valid,
            seed=config.seed,
            callback=checkpoint,
            progress=not args.no_progress,
        )
    except NonFiniteLossError as e:
        kept = (
            f"the checkpoint of epoch {e.epoch - 1} is kept in {run_dir}"
            if records
            else "no checkpoint was written"
        )
        raise ValueError(f"{e}; {kept}") from e
    _plots(run_dir, vae, records, valid, config.seed)
    last = records[-1]
    print(
        f"done in {time.perf_counter() - start:.1f} s: train ELBO {last['train_elbo']:.3f}, "
        f"validation ELBO {last['val_elbo']:.3f} nats per image; wrote {run_dir}"
    )
    return 0


def _evaluate(args) -> int:
    import pyro
    import torch

    from .checkpoint import load_run
    from .evaluation import elbo, log_likelihood
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
        x = x[torch.linspace(0, len(x) - 1, min(args.limit, len(x))).long()]
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
        "elbo": float(el.mean()),
        "num_samples": args.num_samples,
        "split": args.split,
        "n": len(x),
        "dataset": config.dataset,
        "seconds": seconds,
        "device": str(device),
    }
    Path(args.run_dir, "eval.json").write_text(json.dumps(result, indent=2))
    print(
        f"{config.dataset} {args.split} (n={len(x)}): ELBO {result['elbo']:.3f}, "
        f"log p(x) {result['log_likelihood']:.3f} nats (K={args.num_samples}, {seconds:.1f} s)"
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

    for key in ("rounds", "batch_size", "eval_n", "z_dim"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.num_samples < 0:
        raise ValueError(f"--num-samples must be >= 0, got {args.num_samples}")
    args.device = str(resolve_device(args.device))
    return bench_main(args)


COMMANDS = {"train": _train, "evaluate": _evaluate, "sample": _sample, "bench": _bench}


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
