"""Seconds per epoch of `pyrovae train` on this CPU: pyrovae's own engine (fit) against the
Lightning engine on one process, and Lightning's DDP on 2 processes (gloo), on the same data
with the same global batch (2 × B/2 per rank against B on one)::

    python benchmarks/lightning.py --data-dir ../shared/data [--rounds 2] [--epochs 4]

Each configuration is its own `pyrovae train` process, interleaved over rounds; a run's
seconds per epoch is the median over its epochs after the first (which holds the capture, and
Lightning's start), as metrics.csv reports them (training only, no validation). Startup is the
wall time of the whole command minus the epochs.
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time

#: name -> (extra `pyrovae train` flags, processes)
CONFIGS = {
    "fit, 1 process, 2 threads": (["--engine", "fit", "--threads", "2"], 1),
    "fit, 1 process, 1 thread": (["--engine", "fit", "--threads", "1"], 1),
    "Lightning, 1 process, 2 threads": (["--engine", "lightning", "--threads", "2"], 1),
    "Lightning DDP, 2 processes × 1 thread": (
        ["--devices", "2", "--accelerator", "cpu", "--threads", "1"],
        2,
    ),
}


def run(base: list[str], flags: list[str], batch: int, processes: int) -> tuple[float, float]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "pyrovae",
            "train",
            "--no-progress",
            "--out",
            os.path.join(out, "run"),
            *base,
            "--batch-size",
            str(batch // processes),
            *flags,
        ]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
        with open(os.path.join(out, "run", "metrics.csv")) as f:
            seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    return statistics.median(seconds[1:]), wall - sum(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="folder with binarized_mnist.npz")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--limit", type=int, default=10000, help="training images")
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    a = p.parse_args()
    base = [
        "--dataset",
        "binarized-mnist",
        "--data-dir",
        a.data_dir,
        "--hidden",
        "400",
        "--z-dim",
        "50",
        "--epochs",
        str(a.epochs),
        "--train-limit",
        str(a.limit),
    ]
    times = {name: [] for name in CONFIGS}
    for _ in range(a.rounds):
        for name, (flags, processes) in CONFIGS.items():
            times[name].append(run(base, flags, a.batch_size, processes))
    steps = -(-a.limit // a.batch_size)
    print(
        f"\nbinarized MNIST, 784-400-50 MLP, {a.limit:,} images, global batch {a.batch_size} "
        f"(~{steps} steps/epoch), {a.epochs} epochs; median of {a.rounds} runs"
    )
    print(f"{'engine':40s} {'s/epoch':>8s} {'ms/step':>8s} {'startup s':>10s}")
    for name, runs in times.items():
        epoch = statistics.median(r[0] for r in runs)
        startup = statistics.median(r[1] for r in runs)
        print(f"{name:40s} {epoch:8.2f} {1000 * epoch / steps:8.1f} {startup:10.1f}")


if __name__ == "__main__":
    main()
