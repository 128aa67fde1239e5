"""Checkpoints: weights in safetensors (a flat tensor format: loading it runs no code), the run's
config in JSON.

A run directory holds ``config.json`` and ``model.safetensors``; :func:`load_run` rebuilds the
exact model from them. A run that can be continued also holds the state of its last epoch:
``last.safetensors`` (the weights) and ``state.safetensors`` (the optimizer's moments and the
random generators as tensors, the epoch and the caller's bookkeeping as JSON metadata), written
by :func:`save_state` and read by :func:`load_state`. Every safetensors file carries the SHA-256
of its tensor data in its header, checked on load. Files are written atomically, and the files
of an epoch are committed together through the run's manifest (:mod:`pyrovae.rundir`), so a
kill at any instant leaves the old epoch or the new one, never a mix. A pickle (``torch.save``)
file offered as a checkpoint is refused, never unpickled.

What is loaded from a run directory is verified first: every file against the SHA-256 of the
whole file in the run's manifest (header and data, :func:`pyrovae.rundir.read_committed`), then
each tensor's name, dtype and shape against the model built from the config, and the weights
and optimizer moments for non-finite values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import _remove_duplicate_names
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from . import rundir
from .config import Config, build_vae
from .errors import CheckpointError
from .footprint import check_fits
from .rundir import CONFIG, LAST, STATE, WEIGHTS
from .state import TrainState
from .vae import VAE

__all__ = [
    "save_weights",
    "load_weights",
    "weights_bytes",
    "weights_id",
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


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    # safetensors bytes whose header carries the SHA-256 of the tensor data (the bytes after the
    # header, which do not depend on the header)
    raw = save_bytes(tensors, metadata=metadata)
    digest = rundir.sha256(raw[8 + int.from_bytes(raw[:8], "little") :])
    return save_bytes(tensors, metadata={**metadata, "sha256": digest})


def weights_bytes(module: nn.Module, metadata: dict | None = None) -> bytes:
    """A module's parameters and buffers as the bytes of a safetensors file (shared tensors
    once), with its checksum.

    :param dict metadata: extra string entries for the file's header.
    """
    state = module.state_dict()
    meta = {"format": "pt", "writer": "pyrovae", **(metadata or {})}
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            meta.setdefault(name, kept)
            del state[name]
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return _serialize(tensors, meta)


def save_weights(module: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Save a module's parameters and buffers to ``path`` (safetensors), atomically.

    :param dict metadata: extra string entries for the file's header.
    :raises WriteError: naming ``path`` if it cannot be written; the old file is kept.
    """
    rundir.write_bytes(path, weights_bytes(module, metadata))


#: How pickles of protocols 2 to 5 begin (torch.save's zip files begin with PK).
_PICKLE_STARTS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _refuse_pickle(path: Path, head: bytes, size: int) -> None:
    # safetensors: an 8-byte little-endian header length, then the JSON header. Its first byte
    # can be 0x80 like a pickle's (a header of 128 + 256 n bytes), so that layout is checked first
    header = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{":
        if 8 + header > size:
            raise CheckpointError(
                f"{path} is truncated: its header alone should take {header} bytes, the file "
                f"has {size}; restore it"
            )
        return
    if head[:4] == b"PK\x03\x04" or head[:2] in (
        b"\x80\x02",
        b"\x80\x03",
        b"\x80\x04",
        b"\x80\x05",
    ):
        raise CheckpointError(
            f"{path} is a pickle (torch.save) file, not a safetensors checkpoint; pyrovae never "
            "unpickles checkpoints, since unpickling can run arbitrary code. Refused."
        )


def _read_file(path: Path) -> bytes:
    # a weights file named by the caller (not a run's): a regular file, a link followed
    try:
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path} (no such regular file)")
        return rundir.read_regular(path.resolve())
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _read(path: Path, what: str = "safetensors checkpoint", raw: bytes | None = None,
          checksum: bool = False):  # fmt: skip
    # (tensors on the CPU, metadata) of a safetensors file (raw: its bytes, read already), its
    # checksum verified (checksum: required, as in every file of a run pyrovae writes)
    raw = _read_file(path) if raw is None else raw
    _refuse_pickle(path, raw[:9], len(raw))
    try:
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("its __metadata__ is not a map of strings")
        tensors = load_bytes(raw)
    except (SafetensorError, ValueError, AttributeError, UnicodeDecodeError, RecursionError) as e:
        problem = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"{path} is not a readable {what}: {problem}") from None
    digest = meta.get("sha256")
    if digest is None and checksum:
        raise CheckpointError(
            f"{path} carries no checksum of its data in its header, which pyrovae writes into "
            "every file of a run: it was rewritten by something else; restore it"
        )
    if digest is not None and digest != rundir.sha256(raw[8 + n :]):
        raise CheckpointError(
            f"{path} is corrupt: its data does not match the checksum in its header (changed "
            "after it was written); restore it or train again"
        )
    return tensors, meta


def _check_finite(tensors: dict, path: Path) -> None:
    for name, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(
                f"{path} holds non-finite values (NaN or inf) in {name}; these weights cannot "
                "be used: use an earlier checkpoint or train again"
            )


def _check_dtypes(module: nn.Module, tensors: dict, path: Path) -> None:
    # load_state_dict casts silently (an I32 file into F32 weights): refuse another dtype
    own = module.state_dict()
    for name, value in tensors.items():
        if name in own and value.dtype != own[name].dtype:
            raise CheckpointError(
                f"{path} does not fit this model: {name} is {value.dtype}, the model's is "
                f"{own[name].dtype} (the file was changed, or is of another model)"
            )


def _load_into(module: nn.Module, tensors: dict, path: Path) -> None:
    # strict load_state_dict that allows shared tensors saved once (as safetensors' load_model)
    _check_dtypes(module, tensors, path)
    removed = _remove_duplicate_names(module.state_dict(), preferred_names=tensors.keys())
    try:
        missing, unexpected = module.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # a shape mismatch
        problem = " ".join(str(e).split())
        raise CheckpointError(f"{path} does not fit this model: {problem}") from None
    missing = set(missing) - {name for group in removed.values() for name in group}
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]} (another architecture or config)"
        )


def load_weights(module: nn.Module, path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Load weights saved by :func:`save_weights` into ``module`` (strict: names and shapes
    must match), after checking the file's checksum.

    :raises CheckpointError: if the file is missing, a pickle, corrupt, or does not fit.
    """
    path = Path(path)
    tensors, _ = _read(path)
    _load_into(module, {k: v.to(device) for k, v in tensors.items()}, path)
    return module


def weights_id(path: str | os.PathLike) -> dict:
    """What identifies a weights file: ``{"file", "epoch", "sha256"}`` (the epoch it was saved
    at, if recorded, and the SHA-256 of the whole file), for files derived from it."""
    path = Path(path)
    raw = _read_file(path)
    n = int.from_bytes(raw[:8], "little")
    try:
        epoch = (json.loads(raw[8 : 8 + n]).get("__metadata__") or {}).get("epoch")
    except (ValueError, AttributeError, RecursionError):
        epoch = None
    epoch = int(epoch) if isinstance(epoch, str) and epoch.isdigit() else None
    return {"file": path.name, "epoch": epoch, "sha256": rundir.sha256(raw)}


def save_run(
    run_dir: str | os.PathLike, vae: VAE, config: Config, epoch: int | None = None
) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``run_dir``, committed together
    through the run's manifest (a new one, of a finished run, in a directory without one).

    :param epoch: the epoch these weights are from, recorded in the file.
    :raises WriteError: naming the file that could not be written.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {} if epoch is None else {"epoch": str(int(epoch))}
    files = {CONFIG: config.to_json().encode(), WEIGHTS: weights_bytes(vae, meta)}
    fields = {} if rundir.read_manifest(run_dir) is not None else {"stage": "done"}
    rundir.commit(run_dir, files, **fields)


def load_config(run_dir: str | os.PathLike) -> Config:
    """Read a run directory's config, every value type- and range-checked.

    :raises CheckpointError: naming the file and key if the directory or config is missing,
        corrupt or invalid.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    manifest = rundir.read_manifest(run_dir)
    if manifest is None and not os.path.lexists(run_dir / CONFIG):
        raise CheckpointError(f"{run_dir} is not a pyrovae run: it has no {CONFIG}")
    return config_from_bytes(rundir.read_committed(run_dir, CONFIG, manifest), run_dir / CONFIG)


def config_from_bytes(data: bytes, path: Path) -> Config:
    """A run's config from the bytes of its ``config.json`` (at ``path``, for messages), every
    value type- and range-checked.

    :raises CheckpointError: naming the file and the key.
    """
    try:
        values = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        problem = "it nests too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise CheckpointError(f"{path} is not readable JSON ({problem}); restore it") from None
    try:
        config = Config.from_dict(values)
        config.validate()
    except (ValueError, TypeError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    try:
        check_fits(config, str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return config


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[VAE, Config]:
    """Rebuild the model of a run directory from its config and weights.

    :returns: ``(vae, config)``, the model in eval mode on ``device``.
    :raises CheckpointError: if anything is missing, corrupt, non-finite or unsafe.
    """
    config = load_config(run_dir)
    if config.x_shape is None:
        raise CheckpointError(f"{Path(run_dir) / CONFIG} has no x_shape: it is not a saved run")
    vae = build_vae(config)
    path = Path(run_dir) / WEIGHTS
    tensors, _ = _read(path, raw=rundir.read_committed(run_dir, WEIGHTS), checksum=True)
    _check_finite(tensors, path)
    _load_into(vae, tensors, path)
    return vae.to(device).eval(), config


def _state_bytes(module: nn.Module, state: TrainState, extra: dict | None) -> bytes:
    # the optimizer's moments and the generators as tensors, the rest as JSON metadata
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
    return _serialize(tensors, {"writer": "pyrovae", "state": json.dumps(meta)})


def save_state(
    run_dir: str | os.PathLike,
    module: nn.Module,
    state: TrainState,
    extra: dict | None = None,
    files: dict[str, bytes] | None = None,
) -> None:
    """Save what it takes to continue training: ``module``'s weights now (``last.safetensors``)
    and ``state`` (``state.safetensors``), both tagged with ``state.epoch``, committed together
    with ``files`` as the run's epoch ``state.epoch``.

    Call it at the end of an epoch, e.g. last thing in :func:`pyrovae.fit`'s callback, which
    runs after fit has updated ``state``. The random generators are saved as they are at the
    call (and set so in ``state``), after whatever the callback drew for validation: that is
    where the next epoch's draws start, so a continued run repeats the uninterrupted one.

    :param extra: JSON-serializable bookkeeping of the caller (e.g. an
        :class:`~pyrovae.EarlyStopping`'s ``state_dict()``), returned by :func:`load_state`.
    :param files: other files of the run that belong to this epoch (name -> bytes), e.g. the
        metrics and the best checkpoint.
    :raises ValueError: if ``state`` holds no optimizer state yet.
    :raises WriteError: naming the file that could not be written; the run keeps its last epoch.
    """
    if state.optimizer is None:
        raise ValueError("the training state has no optimizer state yet: save it after an epoch")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    epoch = {"epoch": str(int(state.epoch))}
    new = {STATE: _state_bytes(module, state, extra), LAST: weights_bytes(module, epoch)}
    rundir.commit(run_dir, {**new, **(files or {})}, epoch=int(state.epoch), stage="training")


def _state_meta(path: Path, raw: bytes, checksum: bool) -> tuple[dict, dict, int]:
    # (tensors, metadata, epoch) of a state file, the metadata's types checked
    tensors, header = _read(path, "training state", raw, checksum)
    try:
        meta = json.loads(header["state"])
        epoch, moments, extra = meta["epoch"], meta["moments"], meta["extra"]
        groups = meta["param_groups"]
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not a readable training state: no {e}") from None
    ok = (
        type(epoch) is int
        and epoch >= 1
        and isinstance(extra, dict)
        and isinstance(moments, dict)
        and all(
            isinstance(k, list) and all(isinstance(n, str) for n in k) for k in moments.values()
        )
        and isinstance(groups, list)
        and all(isinstance(g, dict) for g in groups)
    )
    if not ok:
        raise CheckpointError(f"{path} is not a readable training state: ill-typed metadata")
    return tensors, meta, epoch


def _check_rng(tensors: dict, path: Path) -> None:
    rng = tensors.get("rng")
    if rng is not None and (rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape):
        raise CheckpointError(
            f"{path} is corrupt: its random generator state has dtype {rng.dtype} and shape "
            f"{tuple(rng.shape)}, not a CPU generator's"
        )
    cuda = tensors.get("cuda_rng")
    if cuda is not None and (cuda.dtype != torch.uint8 or cuda.dim() != 1):
        raise CheckpointError(f"{path} is corrupt: its CUDA generator state is not one")


def _optimizer(tensors: dict, meta: dict, path: Path) -> dict:
    try:
        state = {
            int(i): {k: tensors[f"optimizer.{i}.{k}"] for k in keys}
            for i, keys in meta["moments"].items()
        }
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt: no optimizer tensor {e}") from None
    if meta["param_groups"] and not state:
        raise CheckpointError(f"{path} is corrupt: it holds no optimizer moments")
    for i, entry in state.items():
        for key, value in entry.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise CheckpointError(
                    f"{path} holds non-finite optimizer moments (optimizer.{i}.{key} has NaN or "
                    "inf): the run cannot be continued from it; restore the file, or train "
                    "again from the best weights"
                )
    return {"state": state, "param_groups": meta["param_groups"]}


def _last_epoch(path: Path, tensors_meta: tuple[dict, dict]) -> int:
    epoch = tensors_meta[1].get("epoch", "")
    if not (epoch.isdigit() and len(epoch) < 10):
        raise CheckpointError(f"{path} does not record its epoch: it is not a training checkpoint")
    return int(epoch)


def load_state(
    run_dir: str | os.PathLike, module: nn.Module, device: str | torch.device = "cpu"
) -> tuple[TrainState, dict]:
    """Load the weights of a run's last epoch into ``module`` and return its training state.

    :returns: ``(state, extra)``: the :class:`~pyrovae.state.TrainState` to pass to
        :func:`pyrovae.fit`, and the ``extra`` bookkeeping given to :func:`save_state`.
    :raises CheckpointError: if the files are missing, unsafe, corrupt, from different epochs,
        or do not fit ``module``.
    """
    run_dir = Path(run_dir)
    manifest = rundir.read_manifest(run_dir)
    if manifest is not None and not {STATE, LAST} <= set(manifest["files"]):
        raise CheckpointError(
            f"{run_dir} holds no training state ({STATE} and {LAST}): it cannot be continued"
        )
    raw = {name: rundir.read_committed(run_dir, name, manifest) for name in (STATE, LAST)}
    state, extra = state_from_bytes(run_dir, raw[STATE], raw[LAST], module, device)
    if manifest["epoch"] != state.epoch:
        raise CheckpointError(
            f"{run_dir}: {rundir.MANIFEST} commits epoch {manifest['epoch']} but {STATE} is from "
            f"epoch {state.epoch}; restore the run's files"
        )
    return state, extra


def state_from_bytes(
    run_dir: Path,
    state_raw: bytes,
    last_raw: bytes,
    module: nn.Module,
    device="cpu",
    checksum: bool = True,
) -> tuple[TrainState, dict]:
    """:func:`load_state` from the bytes of a run's ``state.safetensors`` and
    ``last.safetensors``: every tensor and metadata entry checked, the weights loaded into
    ``module``.

    :param checksum: require the checksum of the data in each file's header (every run with a
        manifest has them; runs of older versions may not).
    :raises CheckpointError: naming the file and what is wrong with it.
    """
    tensors, meta, epoch = _state_meta(run_dir / STATE, state_raw, checksum)
    _check_rng(tensors, run_dir / STATE)
    optimizer = _optimizer(tensors, meta, run_dir / STATE)
    weights = _read(run_dir / LAST, raw=last_raw, checksum=checksum)
    last_epoch = _last_epoch(run_dir / LAST, weights)
    if last_epoch != epoch:
        raise CheckpointError(
            f"{run_dir}: {LAST} is from epoch {last_epoch} but {STATE} from epoch {epoch} (a "
            "save was interrupted); the run cannot be continued exactly"
        )
    _check_finite(weights[0], run_dir / LAST)
    _load_into(module, {k: v.to(device) for k, v in weights[0].items()}, run_dir / LAST)
    state = TrainState(epoch, optimizer, tensors.get("rng"), tensors.get("cuda_rng"))
    return state, meta["extra"]
