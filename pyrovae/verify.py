"""``pyrovae verify RUN``: which files of a run directory are intact, and, with ``--adopt``, a
manifest for a run that has none (a run of an older pyrovae), written only after every file has
been read and checked as the commands that use it would.

A run's manifest (:mod:`pyrovae.rundir`) records the SHA-256 of every file the run committed;
the commands refuse a file that does not match it, and a run without a manifest. Adopting a run
is the deliberate step that trusts its files as they are: the config is validated, the weights
are loaded into the model it describes (names, dtypes, shapes, finite values), the training state
is checked against the last weights, and the metrics are parsed, before the manifest is
committed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import CheckpointError
from .rundir import (
    CONFIG,
    LAST,
    LAYOUT,
    LOCK,
    MANIFEST,
    METRICS,
    STATE,
    SUMMARY,
    WEIGHTS,
    RunLock,
    commit,
    parse_metrics,
    read_manifest,
    read_regular,
    require_manifest,
    sha256,
)

__all__ = ["INTACT", "check_run", "adopt", "add_parser", "command"]

#: The status of a file that matches its hash in the manifest.
INTACT = "intact"


def _status(run_dir: Path, name: str, entry: dict) -> str:
    # a file's state against its manifest entry
    pending = entry.get("pending")
    for candidate in (pending, name) if pending else (name,):
        try:
            data = read_regular(run_dir / candidate)
        except FileNotFoundError:
            continue
        except CheckpointError:
            return "not a regular file (a link, FIFO or device)"
        if sha256(data) == entry["sha256"]:
            return INTACT if candidate == name else "intact (committed, not yet renamed)"
        if candidate == name:
            return "CHANGED: does not match its hash"
    return "MISSING"


def check_run(run_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Every file of a run and its status: ``"intact"``, changed, missing, not a regular file,
    or not in the manifest. Reads everything, changes nothing.

    :raises CheckpointError: if ``run_dir`` does not exist, or its manifest is corrupt.
    :raises UnverifiedRunError: if it has no manifest.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    manifest = require_manifest(run_dir)
    rows = [(name, _status(run_dir, name, e)) for name, e in sorted(manifest["files"].items())]
    weights = manifest["files"].get(WEIGHTS, {}).get("sha256")
    for name, made_from in sorted(manifest["derived"].items()):
        if os.path.lexists(run_dir / name):
            of = "the best weights" if made_from == weights else "other weights (stale)"
            rows.append((name, f"derived from {of}, not checked"))
    known = {*manifest["files"], *manifest["derived"], MANIFEST, LOCK}
    for path in sorted(run_dir.iterdir()):
        if path.name in known or path.name.startswith("."):
            continue
        rows.append((path.name, "not in the manifest (not used by pyrovae)"))
    return rows


def _read_old(run_dir: Path) -> dict[str, bytes]:
    # the files of a run without a manifest, each a regular file of the directory
    files = {}
    for name in LAYOUT:
        try:
            files[name] = read_regular(run_dir / name)
        except FileNotFoundError:
            continue
    for name in (CONFIG, WEIGHTS):
        if name not in files:
            raise CheckpointError(f"{run_dir} has no {name}: there is no run to adopt")
    return files


def _check_old(run_dir: Path, files: dict[str, bytes]) -> int:
    # every file as the commands would read it; returns the run's last saved epoch
    from .checkpoint import _check_finite, _load_into, _read, config_from_bytes, state_from_bytes
    from .config import build_vae

    config = config_from_bytes(files[CONFIG], run_dir / CONFIG)
    if config.x_shape is None:
        raise CheckpointError(f"{run_dir / CONFIG} has no x_shape: it is not a saved run")
    tensors, meta = _read(run_dir / WEIGHTS, raw=files[WEIGHTS])
    _check_finite(tensors, run_dir / WEIGHTS)
    _load_into(build_vae(config), tensors, run_dir / WEIGHTS)
    epoch = int(meta["epoch"]) if meta.get("epoch", "").isdigit() and len(meta["epoch"]) < 10 else 0
    if (STATE in files) != (LAST in files):
        raise CheckpointError(f"{run_dir} holds one of {STATE} and {LAST} without the other")
    if STATE in files:
        vae = build_vae(config)  # (older runs' files may carry no checksum of their own)
        state, _ = state_from_bytes(run_dir, files[STATE], files[LAST], vae, checksum=False)
        epoch = state.epoch
    if METRICS in files:
        parse_metrics(files[METRICS], run_dir / METRICS, epoch)
    return epoch


def adopt(run_dir: str | os.PathLike) -> dict:
    """Write a manifest for a run without one, after checking every file (see the module).

    :returns: the new manifest.
    :raises CheckpointError: naming the file that cannot be used, or if the run has a manifest.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    with RunLock(run_dir, "pyrovae verify --adopt"):
        if os.path.lexists(run_dir / MANIFEST):
            read_manifest(run_dir)  # a corrupt one: its own message
            raise CheckpointError(
                f"{run_dir} has a manifest already: `pyrovae verify {run_dir}` checks its files"
            )
        files = _read_old(run_dir)
        epoch = _check_old(run_dir, files)
        stage = "done" if SUMMARY in files else "training"
        return commit(run_dir, files, epoch=epoch, stage=stage)


def add_parser(sub) -> None:
    """Add the ``verify`` subcommand to the CLI's subparsers."""
    v = sub.add_parser("verify", help="check a run's files against its manifest; --adopt an "
                       "older run")  # fmt: skip
    v.add_argument("run_dir", help="a run directory (what train wrote, its --out)")
    v.add_argument("--adopt", action="store_true",
                   help="for a run without a manifest (an older pyrovae's): check every file "
                   "and write one, trusting the files as they are (default: report only)"
                   )  # fmt: skip


def command(args: argparse.Namespace) -> int:
    """``pyrovae verify``: print each file's status; exit 1 if any is not intact."""
    if args.adopt:
        manifest = adopt(args.run_dir)
        print(f"adopted {args.run_dir}: epoch {manifest['epoch']}, stage {manifest['stage']}, "
              f"{len(manifest['files'])} files checked and recorded in {MANIFEST}")  # fmt: skip
        return 0
    rows = check_run(args.run_dir)
    width = max(len(name) for name, _ in rows) if rows else 0
    for name, status in rows:
        print(f"{name:<{width}}  {status}")
    bad = [name for name, status in rows if not status.startswith((INTACT, "not in the manifest",
                                                                    "derived"))]  # fmt: skip
    if bad:
        print(
            f"{len(bad)} file(s) of {args.run_dir} are not as committed: restore them",
            file=sys.stderr,
        )
        return 1
    return 0
