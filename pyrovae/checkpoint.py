"""Checkpoints: weights in safetensors (a flat tensor format: loading it runs no code), the run's
config in JSON.

A run directory holds ``config.json`` and ``model.safetensors``; :func:`load_run` rebuilds the
exact model from them. A run that can be continued also holds the state of its last epoch:
``last.safetensors`` (the weights) and ``state.safetensors`` (the optimizer's moments and the
random generators as tensors, the epoch and the caller's bookkeeping as JSON metadata), written
by :func:`save_state` and read by :func:`load_state`. Files are written to a temporary name and
renamed, so a crash never leaves a half-written checkpoint in place of the last good one. A pickle
(``torch.save``) file offered as a checkpoint is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .config import Config, build_vae
from .errors import CheckpointError
from .training import TrainState
from .vae import VAE

__all__ = [
    "save_weights",
    "load_weights",
    "save_run",
    "load_run",
    "load_config",
    "save_state",
    "load_state",
    "CONFIG",
    "WEIGHTS",
    "LAST",
    "STATE",
]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
LAST = "last.safetensors"
STATE = "state.safetensors"


def save_weights(module: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Save a module's parameters and buffers to ``path`` (safetensors), atomically.

    :param dict metadata: extra string entries for the file's header.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"format": "pt", "writer": "pyrovae", **(metadata or {})}
    save_model(module, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _refuse_pickle(path: Path) -> None:
    # safetensors: an 8-byte little-endian header length, then the JSON header. Its first byte
    # can be 0x80 like a pickle's (a header of 128 + 256 n bytes), so that layout is checked first
    with open(path, "rb") as f:
        head = f.read(9)
    header = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and 8 + header <= path.stat().st_size:
        return
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{path} is a pickle (torch.save) file, not a safetensors checkpoint; pyrovae never "
            "unpickles checkpoints, since unpickling can run arbitrary code. Refused."
        )


def load_weights(module: nn.Module, path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Load weights saved by :func:`save_weights` into ``module`` (strict: names and shapes
    must match).

    :raises CheckpointError: if the file is missing, a pickle, corrupt, or does not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    _refuse_pickle(path)
    try:
        load_model(module, str(path), strict=True, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {e}") from e
    except RuntimeError as e:  # missing/unexpected keys or shape mismatch
        raise CheckpointError(f"{path} does not fit this model: {e}") from e
    return module


def save_run(run_dir: str | os.PathLike, vae: VAE, config: Config) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (CONFIG + ".tmp")
    tmp.write_text(config.to_json())
    os.replace(tmp, run_dir / CONFIG)
    save_weights(vae, run_dir / WEIGHTS)


def load_config(run_dir: str | os.PathLike) -> Config:
    """Read a run directory's config.

    :raises CheckpointError: if the directory or config is missing or corrupt.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    cfg_path = run_dir / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a pyrovae run: it has no {CONFIG}")
    try:
        config = Config.from_dict(json.loads(cfg_path.read_text()))
        config.validate()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path} is corrupt: {e}") from e
    return config


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[VAE, Config]:
    """Rebuild the model of a run directory from its config and weights.

    :returns: ``(vae, config)``, the model in eval mode on ``device``.
    :raises CheckpointError: if anything is missing, corrupt or unsafe.
    """
    config = load_config(run_dir)
    vae = build_vae(config)
    load_weights(vae, Path(run_dir) / WEIGHTS, device=str(device))
    return vae.to(device).eval(), config


def save_state(
    run_dir: str | os.PathLike, module: nn.Module, state: TrainState, extra: dict | None = None
) -> None:
    """Save what it takes to continue training: ``module``'s weights now (``last.safetensors``)
    and ``state`` (``state.safetensors``), both tagged with ``state.epoch``.

    Call it at the end of an epoch, e.g. last thing in :func:`pyrovae.fit`'s callback, which
    runs after fit has updated ``state``. The random generators are saved as they are at the
    call (and set so in ``state``), after whatever the callback drew for validation: that is
    where the next epoch's draws start, so a continued run repeats the uninterrupted one.

    :param extra: JSON-serializable bookkeeping of the caller (e.g. an
        :class:`~pyrovae.EarlyStopping`'s ``state_dict()``), returned by :func:`load_state`.
    :raises ValueError: if ``state`` holds no optimizer state yet.
    """
    if state.optimizer is None:
        raise ValueError("the training state has no optimizer state yet: save it after an epoch")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors, moments = {}, {}
    for i, entry in state.optimizer["state"].items():
        moments[str(i)] = sorted(entry)
        for key, value in entry.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optimizer.{i}.{key}"] = value.detach().cpu().contiguous()
    state.rng = torch.get_rng_state()
    device = next(iter(module.parameters()), torch.empty(0)).device
    state.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    for key in ("rng", "cuda_rng"):
        if getattr(state, key) is not None:
            tensors[key] = getattr(state, key).cpu().contiguous()
    meta = {
        "epoch": int(state.epoch),
        "moments": moments,
        "param_groups": state.optimizer["param_groups"],
        "extra": extra or {},
    }
    tmp = run_dir / (STATE + ".tmp")
    save_file(tensors, str(tmp), metadata={"writer": "pyrovae", "state": json.dumps(meta)})
    save_weights(module, run_dir / LAST, {"epoch": str(int(state.epoch))})
    os.replace(tmp, run_dir / STATE)


def load_state(
    run_dir: str | os.PathLike, module: nn.Module, device: str | torch.device = "cpu"
) -> tuple[TrainState, dict]:
    """Load the weights of a run's last epoch into ``module`` and return its training state.

    :returns: ``(state, extra)``: the :class:`~pyrovae.training.TrainState` to pass to
        :func:`pyrovae.fit`, and the ``extra`` bookkeeping given to :func:`save_state`.
    :raises CheckpointError: if the files are missing, unsafe, corrupt, from different epochs,
        or do not fit ``module``.
    """
    run_dir = Path(run_dir)
    path = run_dir / STATE
    if not path.is_file() or not (run_dir / LAST).is_file():
        raise CheckpointError(
            f"{run_dir} holds no training state ({STATE} and {LAST}): it cannot be continued"
        )
    _refuse_pickle(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["state"])
        tensors = load_file(str(path))
        with safe_open(str(run_dir / LAST), "pt") as f:
            last_epoch = int((f.metadata() or {}).get("epoch", -1))
        epoch = int(meta["epoch"])
        optimizer = {
            "state": {
                int(i): {k: tensors[f"optimizer.{i}.{k}"] for k in keys}
                for i, keys in meta["moments"].items()
            },
            "param_groups": meta["param_groups"],
        }
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a readable training state: {e}") from e
    if last_epoch != epoch:
        raise CheckpointError(
            f"{run_dir}: {LAST} is from epoch {last_epoch} but {STATE} from epoch {epoch} (a "
            "save was interrupted); the run cannot be continued exactly"
        )
    load_weights(module, run_dir / LAST, device=str(device))
    state = TrainState(epoch, optimizer, tensors.get("rng"), tensors.get("cuda_rng"))
    return state, meta["extra"]
