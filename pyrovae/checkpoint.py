"""Checkpoints: weights in safetensors (a flat tensor format: loading it runs no code), the run's
config in JSON.

A run directory holds ``config.json`` and ``model.safetensors``; :func:`load_run` rebuilds the
exact model from them. Files are written to a temporary name and renamed, so a crash never leaves
a half-written checkpoint in place of the last good one. A pickle (``torch.save``) file offered
as a checkpoint is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from .config import Config, build_vae
from .errors import CheckpointError
from .vae import VAE

__all__ = [
    "save_weights",
    "load_weights",
    "save_run",
    "load_run",
    "load_config",
    "CONFIG",
    "WEIGHTS",
]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def save_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Save a module's parameters and buffers to ``path`` (safetensors), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_model(module, str(tmp), metadata={"format": "pt", "writer": "pyrovae"})
    os.replace(tmp, path)


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
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
