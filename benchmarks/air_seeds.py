"""examples/air.py's default run over several seeds, with and without baselines: how often AIR
learns to count, and how well (one seed is one draw of canvases, weights, data order and noise).

    OMP_NUM_THREADS=1 nice python benchmarks/air_seeds.py --seeds 0 1 2 3 --workers 2

Each run is ``examples/air.py --seed S [--no-baselines]`` with its defaults, in a process of its
own (``--workers`` at a time, one thread each). Prints the count accuracy on the held-out
canvases after the last epoch (the last point of the example's curve, one draw of q) per seed,
and a summary: the runs that count (accuracy ≥ 0.9) and the median accuracy.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "air.py"


def run(seed: int, baselines: bool, out: str) -> tuple[int, bool, float]:
    """The count accuracy after the example's last epoch for one seed (the last point of its
    curve; its printout swallowed)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("example_air", EXAMPLE)
    air = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(air)
    flags = ["--seed", str(seed), "--out", f"{out}/{seed}-{baselines}", "--no-progress"]
    args = air.build_parser().parse_args(flags + ([] if baselines else ["--no-baselines"]))
    with redirect_stdout(io.StringIO()):
        result = air.main(args)
    return seed, baselines, result["accuracy"][-1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--out", default="air-seeds", help="folder for the runs' figures")
    args = p.parse_args(argv)
    jobs = [(s, b) for s in args.seeds for b in (True, False)]
    with ProcessPoolExecutor(args.workers) as pool:
        done = list(pool.map(run, *zip(*jobs, strict=True), [args.out] * len(jobs)))
    acc = {(s, b): a for s, b, a in done}
    print("count accuracy after examples/air.py's default run (50 epochs), held-out canvases")
    print(f"{'seed':>4}  {'TraceGraph_ELBO, baselines':>27}  {'Trace_ELBO, none':>17}")
    for s in args.seeds:
        print(f"{s:4d}  {acc[s, True]:27.3f}  {acc[s, False]:17.3f}")
    for b, name in ((True, "baselines"), (False, "no baselines")):
        values = [acc[s, b] for s in args.seeds]
        counting = sum(v >= 0.9 for v in values)
        print(f"{name}: {counting} of {len(values)} runs count (>= 0.9); median "
              f"{statistics.median(values):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
