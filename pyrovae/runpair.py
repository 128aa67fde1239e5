"""What a run trains: a model/guide pair, the module whose weights the run saves, and where the
pair came from, so that ``pyrovae resume``, ``evaluate``, ``plot`` and ``sample`` can re-create
it.

- The built-in VAE (:meth:`RunPair.of_vae`) is re-created from the run's ``config.json``.
- A user's pair (``pyrovae train --pair FILE.py:NAME``, :func:`load_pair`): ``NAME()`` returns
  an :class:`~torch.nn.Module` with ``model`` and ``guide`` methods, or a ``(model, guide)``
  pair whose modules it registers (``pyro.module``, :class:`~pyro.nn.PyroModule`) or is bound
  to. ``NAME()`` may also give keyword arguments for every training step (a ``step_kwargs``
  attribute of the module, or a third element of the tuple: ``{"annealing_factor":
  Ramp(0.2, 1.0, epochs=10)}``, :mod:`pyrovae.keywords`). The run records the file's
  absolute path and the SHA-256 of its text in ``pair.json``;
  a run whose file changed or is gone is refused with one line.
- Arrays from a file (``--data FILE.npz``, :func:`load_arrays`): the arrays in the file's order
  are the pair's positional tensors, split into train/valid/test by a seeded permutation.

The weights of a pair that is not one module are :class:`PairWeights`: the modules found on
the first batch (:func:`pyrovae.pair.discover`) and its ``pyro.param`` sites outside them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .data import ImageDataset

__all__ = [
    "RunPair",
    "PairWeights",
    "PAIR_FILE",
    "load_pair",
    "pair_source",
    "check_source",
    "read_source",
    "load_arrays",
    "ArrayData",
]

#: The file of a run that records the pair's source (a user's pair only).
PAIR_FILE = "pair.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class RunPair:
    """A run's pair: ``model`` and ``guide``, ``module`` (its ``state_dict`` is the run's
    weights; ``None`` until :meth:`bind` for a pair of functions), ``source`` (the recorded
    ``pair.json``, ``None`` for the built-in VAE), ``vae`` (the built-in VAE, whose plots,
    warm-up and likelihood a run uses; ``None`` for a user's pair) and ``step_kwargs`` (the
    pair's keyword arguments for every training step, if any)."""

    model: Callable
    guide: Callable
    module: object = None
    source: dict | None = None
    vae: object = None
    step_kwargs: dict | None = None

    def scheduled(self) -> list[str]:
        """The names of the step keywords that follow a schedule (a metrics.csv column each)."""
        from .schedules import Schedule

        return [k for k, v in (self.step_kwargs or {}).items() if isinstance(v, Schedule)]

    @classmethod
    def of_vae(cls, vae) -> RunPair:
        """The built-in VAE (or HVAE) of a :class:`~pyrovae.Config`."""
        return cls(vae.model, vae.guide, vae, None, vae)

    def bind(self, first: tuple, loss=None) -> None:
        """Find the modules and ``pyro.param`` sites that hold the pair's parameters by running
        its loss once on the batch ``first`` (creating lazily made parameters), and hold them
        in :class:`PairWeights` (no-op for a pair that is one module already)."""
        if self.module is not None:
            return
        from .pair import Objective, Term, discover

        found = discover([Term(Objective(self.model, self.guide, first, loss), 0)], [first])
        for p in found.params:
            p.grad = None
        self.module = PairWeights(found.modules, found.free)


class PairWeights(nn.Module):
    """The weights of a pair as one :class:`~torch.nn.Module`: the modules that hold its
    parameters (in the order found, a submodule of an earlier one left out) as ``mods.i``,
    and its ``pyro.param`` sites outside them as ``params.NAME`` (dots as ``__``), sharing
    their storage: loading a state dict into it loads the pair.

    :param modules: the modules found by :func:`pyrovae.pair.discover`.
    :param dict free: its ``pyro.param`` sites outside them, ``{name: (leaf, constraint)}``.
    """

    def __init__(self, modules, free: dict):
        super().__init__()
        tops = [m for i, m in enumerate(modules)
                if not any(m is s for prev in modules[:i] for s in prev.modules())]  # fmt: skip
        self.mods = nn.ModuleList(tops)
        self.params = nn.ParameterDict(
            {name.replace(".", "__"): nn.Parameter(leaf) for name, (leaf, _) in free.items()}
        )


def _spec(spec: str) -> tuple[Path, str]:
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise ValueError(f"--pair {spec}: give FILE.py:NAME, e.g. --pair my_vae.py:make_pair")
    return Path(path).expanduser().resolve(), name


def _import(path: Path, spec: str):
    # the file run as Python runs a script: its folder first on sys.path (Pyro's examples import
    # their utils/ beside them), kept there for the imports its functions make later
    if not path.is_file():
        raise ValueError(f"--pair {spec}: there is no file {path}")
    module_name = f"pyrovae_pair_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    try:
        loader.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(
            f"--pair {spec}: {path} does not parse: {e.msg} (line {e.lineno})"
        ) from None
    except ImportError as e:
        missing = f"{e.name}, which is not installed" if e.name else str(e)
        raise ValueError(f"--pair {spec}: {path.name} imports {missing}: install it, or move "
                         "the import out of the pair's file") from None  # fmt: skip
    return module


def load_pair(spec: str, seed: int = 0) -> RunPair:
    """Import ``FILE.py`` and call ``NAME()`` (after seeding Pyro with ``seed``, so its initial
    weights are the same every time).

    :param str spec: ``FILE.py:NAME``.
    :raises ValueError: one line naming the file or name and what to change.
    """
    import pyro

    path, name = _spec(spec)
    module = _import(path, spec)
    make = getattr(module, name, None)
    if not callable(make):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ValueError(f"--pair {spec}: {path.name} defines no callable {name!r} (it defines "
                         f"{', '.join(names[:8]) or 'none'})")  # fmt: skip
    pyro.set_rng_seed(seed)
    try:
        made = make()
    except Exception as e:  # the user's code: its error, in one line, naming the call
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"--pair {spec}: {name}() raised {type(e).__name__}: {first}") from e
    if (
        isinstance(made, nn.Module)
        and callable(getattr(made, "model", None))
        and callable(getattr(made, "guide", None))
    ):
        pair = RunPair(made.model, made.guide, step_kwargs=getattr(made, "step_kwargs", None))
    elif isinstance(made, tuple) and len(made) in (2, 3) and all(callable(f) for f in made[:2]):
        pair = RunPair(made[0], made[1], step_kwargs=made[2] if len(made) == 3 else None)
    else:
        raise ValueError(
            f"--pair {spec}: {name}() returned {type(made).__name__}; it must return an "
            "nn.Module with model and guide methods, or a (model, guide) tuple"
        )
    if pair.step_kwargs is not None and not isinstance(pair.step_kwargs, dict):
        raise ValueError(f"--pair {spec}: its step_kwargs must be a dict {{name: value}}, got "
                         f"{type(pair.step_kwargs).__name__}")  # fmt: skip
    pair.source = pair_source(path, name)
    return pair


def pair_source(path: Path, name: str, data: Path | None = None) -> dict:
    """The ``pair.json`` of a run: the pair's file (absolute) and name, the SHA-256 of its
    text, and the arrays file with its SHA-256 when the run trains on one."""
    source = {"file": str(path), "name": name, "sha256": _sha256(path)}
    if data is not None:
        source.update(data=str(data), data_sha256=_sha256(data))
    return source


def check_source(source: dict, run_dir: Path) -> None:
    """Refuse, in one line, a run whose pair file (or arrays file) is gone or changed.

    :raises ValueError: naming the file and what to do.
    """
    for key, digest in (("file", "sha256"), ("data", "data_sha256")):
        if key not in source:
            continue
        path = Path(source[key])
        if not path.is_file():
            raise ValueError(f"{run_dir} was trained on {path}, which is gone; put it back "
                             "where it was to continue or score the run")  # fmt: skip
        if _sha256(path) != source[digest]:
            raise ValueError(f"{path} changed since {run_dir} was made (its {PAIR_FILE} records "
                             "another SHA-256): restore the file, or train a new run")  # fmt: skip


def read_source(run_dir: Path) -> dict | None:
    """A run's recorded pair source (``pair.json``, verified against the manifest), or ``None``
    for a built-in VAE's run.

    :raises CheckpointError: for a run without a manifest, or a pair.json that does not match
        its hash; ValueError for one that does not record the file, name and hash.
    """
    from .rundir import parse_json, read_committed, require_manifest

    manifest = require_manifest(run_dir)
    if PAIR_FILE not in manifest["files"]:
        return None
    path = run_dir / PAIR_FILE
    source = parse_json(read_committed(run_dir, PAIR_FILE, manifest), path, "the pair's source")
    if not all(isinstance(source.get(k), str) for k in ("file", "name", "sha256")):
        raise ValueError(f"{path} is corrupt: it does not record the pair's file, name and hash")
    return source


class ArrayData(ImageDataset):
    """Arrays as a run's data: an :class:`~pyrovae.data.ImageDataset` whose ``tensors`` are
    all the pair's positional tensors (``images`` the first of them), items tuples of rows."""

    def __init__(self, tensors: tuple, split: str, name: str):
        super().__init__(tensors[0], None, name, split)
        self._tensors = tuple(tensors)

    @property
    def tensors(self) -> tuple:
        return self._tensors

    def __getitem__(self, i):
        return tuple(t[i] for t in self._tensors)


def load_arrays(path: str | Path, split: str, valid_fraction: float = 0.1,
                test_fraction: float = 0.1, seed: int = 0) -> ArrayData:  # fmt: skip
    """The ``split`` of the arrays in an ``.npz`` file: every array (in the file's order) is one
    of the pair's positional tensors, their first dimensions the datapoints, shared out to
    train/valid/test by a permutation seeded with ``seed``.

    :raises ValueError: naming the file, for no arrays, object arrays, or arrays whose first
        dimensions differ.
    """
    import numpy as np
    import torch

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"--data {path}: not a readable .npz file of arrays ({e})") from None
    if not arrays:
        raise ValueError(f"--data {path}: the file holds no arrays")
    rows = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
    if len(set(rows.values())) != 1 or None in rows.values():
        shown = ", ".join(f"{k} ({n} rows)" for k, n in rows.items())
        raise ValueError(f"--data {path}: every array must have the datapoints as its first "
                         f"dimension, and these differ: {shown}")  # fmt: skip
    n = next(iter(rows.values()))
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_valid = int(round(n * test_fraction)), int(round(n * valid_fraction))
    cut = {"test": perm[:n_test], "valid": perm[n_test : n_test + n_valid],
           "train": perm[n_test + n_valid :]}[split]  # fmt: skip
    tensors = tuple(
        torch.as_tensor(a[cut]) if a.dtype.kind in "iub" else torch.as_tensor(a[cut]).float()
        for a in arrays.values()
    )
    return ArrayData(tensors, split, path.name)
