"""Pyro's own DMM and AIR, imported unchanged from a checkout of pyro-ppl/pyro, trained by
pyrovae.fit and scored by pyrovae.log_likelihood: the client code issue 28 names.

    OMP_NUM_THREADS=1 python benchmarks/pyro_examples.py --pyro ../pyro

``examples/dmm.py``'s ``DMM`` trains on generated piano rolls (this repository's
``examples/dmm.py`` generator) as ``pyrovae.Sequences`` with the example's KL annealing as a
step schedule; ``examples/air/air.py``'s ``AIR`` trains on generated 50×50 canvases with its own
``TraceGraph_ELBO`` and baselines, its ``batch_size`` argument passed as a step keyword (and bound
with ``functools.partial`` for scoring). Prints one row per example: the path fit took, the
train ELBO of the last epoch, seconds per epoch, and log p(x) of held-out data.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from pyro.infer import TraceGraph_ELBO

import pyrovae
from pyrovae.schedules import Ramp

HERE = Path(__file__).resolve().parent.parent


class _Said(logging.Handler):
    # the pyrovae log's lines, to report which path fit took
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def path(self) -> str:
        eager = [m for m in self.lines if "trains eagerly" in m]
        if eager:
            return "eager (" + eager[-1].split("replayed: ")[-1].split(",")[0] + ")"
        return "captured" if any("replaying" in m for m in self.lines) else "?"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed_fit(model, guide, data, epochs: int, **kwargs):
    said, log = _Said(), logging.getLogger("pyrovae")
    level, log.level = log.level, logging.INFO
    log.addHandler(said)
    start = time.perf_counter()
    try:
        history = pyrovae.fit(model, guide, data, epochs=epochs, progress=False, seed=0, **kwargs)
    finally:
        log.removeHandler(said)
        log.setLevel(level)
    return history, (time.perf_counter() - start) / epochs, said.path()


def dmm_row(pyro_dir: Path, epochs: int, k: int) -> dict:
    """Pyro's DMM (examples/dmm.py), unchanged."""
    sys.path.insert(0, str(pyro_dir / "examples"))
    pyro_dmm = _load(pyro_dir / "examples" / "dmm.py", "pyro_dmm")
    ours = _load(HERE / "examples" / "dmm.py", "our_dmm")
    train, test = ours.polyphonic(200, seed=0), ours.polyphonic(60, seed=1)
    torch.manual_seed(0)
    dmm = pyro_dmm.DMM(input_dim=88, z_dim=16, emission_dim=32, transition_dim=32, rnn_dim=64)
    schedule = {"annealing_factor": Ramp(0.2, 1.0, epochs=max(1, epochs // 2))}
    history, seconds, path = _timed_fit(dmm.model, dmm.guide, train, epochs, batch_size=20,
                                        lr=3e-3, step_kwargs=schedule)  # fmt: skip
    log_px = pyrovae.log_likelihood(dmm.model, dmm.guide, test, num_samples=k, seed=0)
    return {"example": "examples/dmm.py DMM", "path": path, "s/epoch": seconds,
            "train": history.train_elbo[-1] / (train.steps / len(train)),
            "log p(x)": float(log_px.sum()) / test.steps, "unit": "nats per timestep"}  # fmt: skip


def air_row(pyro_dir: Path, epochs: int, k: int) -> dict:
    """Pyro's AIR (examples/air/air.py), unchanged, with the example's settings shrunk."""
    sys.path.insert(0, str(pyro_dir / "examples" / "air"))
    pyro_air = _load(pyro_dir / "examples" / "air" / "air.py", "pyro_air")
    ours = _load(HERE / "examples" / "air.py", "our_air")
    x, _ = ours.make_canvases(1024, seed=0)
    x_test, _ = ours.make_canvases(128, seed=1)
    data, test = x.view(-1, 50, 50), x_test.view(-1, 50, 50)
    torch.manual_seed(0)
    air = pyro_air.AIR(num_steps=3, x_size=50, window_size=28, z_what_size=50,
                       rnn_hidden_size=256, encoder_net=[200], decoder_net=[200],
                       predict_net=[200], bl_predict_net=[200], decoder_output_bias=-2,
                       decoder_output_use_sigmoid=True)  # fmt: skip
    history, seconds, path = _timed_fit(air.model, air.guide, data, epochs, batch_size=64,
                                        lr=1e-4, loss=TraceGraph_ELBO(),
                                        step_kwargs={"batch_size": 64})  # fmt: skip
    model, guide = partial(air.model, batch_size=64), partial(air.guide, batch_size=64)
    log_px = pyrovae.log_likelihood(model, guide, test, num_samples=k, seed=0)
    return {"example": "examples/air/air.py AIR", "path": path, "s/epoch": seconds,
            "train": history.train_elbo[-1], "log p(x)": float(log_px.mean()),
            "unit": "nats per canvas"}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pyro", type=Path, required=True, help="a checkout of pyro-ppl/pyro")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-samples", type=int, default=100, help="K for log p(x)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # Pyro's AIR: affine_grid defaults
    rows = [dmm_row(args.pyro, args.epochs, args.num_samples),
            air_row(args.pyro, args.epochs, args.num_samples)]  # fmt: skip
    print(f"Pyro's examples unchanged, {args.epochs} epochs, log p(x) with K={args.num_samples}")
    print(f"{'example':26}{'s/epoch':>9}{'train ELBO':>12}{'log p(x)':>11}  unit, path")
    for r in rows:
        print(f"{r['example']:26}{r['s/epoch']:9.2f}{r['train']:12.3f}{r['log p(x)']:11.3f}"
              f"  {r['unit']}, {r['path']}")  # fmt: skip


if __name__ == "__main__":
    main()
