"""Wall time of training runs on this CPU with 1 or all torch threads, OpenMP's default or
passive waiting, on a quiet machine and beside one busy process (a second `python` spinning on
one core), each configuration run as its own `pyrovae train` process, interleaved, medians::

    python benchmarks/threads.py [--rounds 3] [--data-dir DATA]

The rows marked "(torch default)" run the command with torch loaded first (what it did before it
chose OpenMP's waiting itself); the "(pyrovae chooses)" row is the command as it ships.

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

from pyrovae.bench import busy_neighbour

#: ``pyrovae train`` with torch loaded first, so the command cannot choose OpenMP's waiting:
#: torch's own default, what the command did before it set ``OMP_WAIT_POLICY`` itself.
TORCH_FIRST = "import sys, torch; from pyrovae.cli import main; sys.exit(main(sys.argv[1:]))"


#: the ``pyrovae`` command as it ships: no thread or wait settings in the environment, so the
#: command chooses them itself (passive waiting, torch's thread count)
SHIPPED = (0, "(pyrovae chooses)")


def run(args: list[str], threads: int, policy: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if (threads, policy) == SHIPPED:
        entry = ["-m", "pyrovae.cli"]
    else:
        env["OMP_NUM_THREADS"] = str(threads)
        if policy is not None:
            env["OMP_WAIT_POLICY"] = policy
        entry = ["-c", TORCH_FIRST]
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, *entry, "train", "--no-progress", "--device", "cpu",
               "--out", os.path.join(out, "run"), *args]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        return time.perf_counter() - start


def table(name: str, args: list[str], rounds: int) -> None:
    threads = [1, os.cpu_count() or 1]
    configs = [
        (load, *c)
        for load in ("quiet", "loaded")
        for c in [*itertools.product(threads, (None, "PASSIVE")), SHIPPED]
    ]
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    for _ in range(rounds):
        for load in ("quiet", "loaded"):
            with busy_neighbour(load == "loaded"):
                for c in configs:
                    if c[0] == load:
                        times[c].append(run(args, c[1], c[2]))
    print(f"\n{name}: seconds per `pyrovae train` (median of {rounds})")
    print(f"{'machine':8s} {'threads':>7s} {'OMP_WAIT_POLICY':>17s} {'seconds':>8s}")
    for c in configs:
        policy = c[2] or "(torch default)"
        count = str(c[1]) if c[1] else "auto"
        print(f"{c[0]:8s} {count:>7s} {policy:>17s} {statistics.median(times[c]):8.2f}")


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
