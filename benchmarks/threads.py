"""Wall time of training runs on this CPU with 1 or all torch threads, OpenMP's default or
passive waiting, on a quiet machine and beside one busy process (a second `python` spinning on
one core), each configuration run as its own `pyrovae train` process, interleaved, medians::

    python benchmarks/threads.py [--rounds 3] [--data-dir DATA]

Prints one table per workload: the default main job (8×8 digits, 20 epochs) and, with
--data-dir, the 784-400-50 MLP on 10,000 binarized-MNIST images (3 epochs).
"""

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time

BUSY = "while True: pass"


def run(args: list[str], threads: int, policy: str | None) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "pyrovae.cli", "train", "--no-progress", "--device", "cpu",
               "--out", os.path.join(out, "run"), *args]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        return time.perf_counter() - start


def table(name: str, args: list[str], rounds: int) -> None:
    threads = [1, os.cpu_count() or 1]
    configs = list(itertools.product(("quiet", "loaded"), threads, (None, "PASSIVE")))
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    for _ in range(rounds):
        for load in ("quiet", "loaded"):
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load == "loaded" else None
            try:
                for c in configs:
                    if c[0] == load:
                        times[c].append(run(args, c[1], c[2]))
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    print(f"\n{name}: seconds per `pyrovae train` (median of {rounds})")
    print(f"{'machine':8s} {'threads':>7s} {'OMP_WAIT_POLICY':>16s} {'seconds':>8s}")
    for c in configs:
        print(f"{c[0]:8s} {c[1]:7d} {c[2] or '(default)':>16s} {statistics.median(times[c]):8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-dir", default=None)
    a = p.parse_args()
    table("main job (digits, 20 epochs)", ["--epochs", "20"], a.rounds)
    if a.data_dir:
        mnist = ["--dataset", "binarized-mnist", "--data-dir", a.data_dir, "--hidden", "400",
                 "--z-dim", "50", "--batch-size", "256", "--epochs", "3", "--train-limit",
                 "10000"]  # fmt: skip
        table("binarized MNIST, 784-400-50 MLP, 10,000 images, 3 epochs", mnist, a.rounds)


if __name__ == "__main__":
    main()
