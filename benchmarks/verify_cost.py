"""What verifying a run's files costs each command: every file a command loads is checked against
the SHA-256 of the whole file in the run's manifest first (:func:`pyrovae.rundir.read_committed`;
``recover`` checks the small files). On a run of about 50 MB of weights per file::

    python benchmarks/verify_cost.py --data-dir ../shared/data [--hidden 2048 2048]

trains a one-epoch run (binarized MNIST shapes, 784 pixels; the weights, the last weights and
the optimizer state each tens of MB), then runs ``verify``, ``sample``, ``evaluate``, ``plot``
and ``resume`` (one more epoch) on it in this process, and reports for each the command's wall
time, the bytes checked, and the seconds spent reading and hashing them (the hashing alone in
brackets): the cost of the checks beside the command. Timings are of one run, torch on one
thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pyrovae import cli, rundir
from pyrovae import verify as verify_module


class _Meter:
    # the time spent in the verifying functions and in sha256 inside them, and the bytes hashed
    def __init__(self):
        self.seconds = self.hashing = 0.0
        self.bytes = 0
        self.inside = 0

    @contextmanager
    def patched(self):
        saved = {k: getattr(rundir, k) for k in ("_find_committed", "_verify", "sha256")}
        saved_verify = {k: getattr(verify_module, k) for k in ("_status", "sha256")}

        def timed(fn):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                self.inside += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.inside -= 1
                    if not self.inside:
                        self.seconds += time.perf_counter() - start

            return wrapper

        def sha(data):
            start = time.perf_counter()
            try:
                return saved["sha256"](data)
            finally:
                if self.inside:
                    self.hashing += time.perf_counter() - start
                    self.bytes += len(data)

        rundir._find_committed = timed(saved["_find_committed"])
        rundir._verify = timed(saved["_verify"])
        rundir.sha256 = verify_module.sha256 = sha
        verify_module._status = timed(saved_verify["_status"])
        try:
            yield self
        finally:
            for k, v in saved.items():
                setattr(rundir, k, v)
            for k, v in saved_verify.items():
                setattr(verify_module, k, v)


def _commands(run: Path, out: Path) -> dict[str, list[str]]:
    return {
        "verify": ["verify", str(run)],
        "sample": ["sample", str(run), "--out", str(out / "s.png"), "-n", "16"],
        "evaluate": [
            "evaluate",
            str(run),
            "--limit",
            "20",
            "--num-samples",
            "10",
            "--no-progress",
        ],  # fmt: skip
        "plot": ["plot", str(run)],
        "resume": ["resume", str(run), "--epochs", "2", "--no-progress"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="holds binarized_mnist.npz")
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 2048])
    parser.add_argument("--train-limit", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run, out = Path(tmp) / "run", Path(tmp)
        train = ["train", "--dataset", "binarized-mnist", "--data-dir", args.data_dir,
                 "--hidden", *map(str, args.hidden), "--epochs", "1", "--train-limit",
                 str(args.train_limit), "--out", str(run), "--no-progress"]  # fmt: skip
        assert cli.main(train) == 0
        sizes = {p.name: p.stat().st_size for p in run.glob("*.safetensors")}
        print("files: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(sizes.items())))
        print("| command | wall s | checked MiB | read + hash s (hash s) | share |")
        print("|---|---|---|---|---|")
        for name, argv in _commands(run, out).items():
            with _Meter().patched() as meter:
                start = time.perf_counter()
                assert cli.main(argv) == 0, name
                wall = time.perf_counter() - start
            print(f"| {name} | {wall:.2f} | {meter.bytes / 2**20:.0f} | {meter.seconds:.3f} "
                  f"({meter.hashing:.3f}) | {100 * meter.seconds / wall:.1f} % |")  # fmt: skip


if __name__ == "__main__":
    main()
