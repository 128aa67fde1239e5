"""A run directory's files, crash-consistent: atomic writes, one writer at a time, and a manifest
that commits the files of an epoch together.

Every file is written to a temporary name unique to the process (``.NAME.PID.RANDOM.tmp``),
flushed to disk, and renamed over its final name, so a reader sees the old file or the new one,
never part of one. The files that must agree (the weights and state of the last epoch, the
metrics, the best checkpoint) are committed together by :func:`commit`: all are written under
temporary names first, then ``manifest.json`` (itself written atomically) names the epoch and
the SHA-256 of every file, and only then are they renamed into place. A kill before the manifest
leaves the old epoch; a kill after it is rolled forward by :func:`recover`, which renames what
the manifest names. Readers that take no lock find a committed file with :func:`committed`.

A run directory has one writer: :class:`RunLock` holds ``pyrovae.lock`` (with the holder's pid,
host and command); a lock whose process is dead is taken over.

Files derived from the best weights (``eval.json``, ``log_px.*``, the plots) are registered in
the manifest with the hash of those weights; :func:`recover` and :func:`commit` remove the ones
that no longer match them.

A run directory may come from someone else, so nothing read from it is trusted: every name in
the manifest (a file, its pending temporary name, a derived file) must be a plain file name of
the run directory, or the manifest is refused before any file is moved or deleted; run files
are opened without following symlinks and read only if they are regular files (a FIFO never
blocks a reader); and :func:`read_committed` checks a committed file against the manifest's
whole-file SHA-256 before anyone uses it. A run without a manifest (an older pyrovae's) is
refused until it is adopted deliberately (``pyrovae verify RUN --adopt``, :mod:`pyrovae.verify`).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError, RunInUseError, UnverifiedRunError, WriteError

__all__ = [
    "CONFIG",
    "WEIGHTS",
    "LAST",
    "STATE",
    "METRICS",
    "SUMMARY",
    "MANIFEST",
    "LOCK",
    "DERIVED",
    "PLOTS",
    "STAGES",
    "write_bytes",
    "write_text",
    "atomic_path",
    "sha256",
    "read_json",
    "read_regular",
    "read_manifest",
    "require_manifest",
    "read_committed",
    "check_name",
    "commit",
    "update_manifest",
    "recover",
    "committed",
    "register_derived",
    "RunLock",
    "staging_dir",
    "clear_for_new_run",
    "metrics_bytes",
    "read_metrics",
    "parse_metrics",
    "parse_json",
    "LAYOUT",
]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"  # the best weights
LAST = "last.safetensors"
STATE = "state.safetensors"
METRICS = "metrics.csv"
SUMMARY = "train.json"
MANIFEST = "manifest.json"
LOCK = "pyrovae.lock"
#: Files written by ``pyrovae evaluate`` from the best weights.
DERIVED = ("eval.json", "log_px.csv", "log_px.png")
#: The plots drawn from the best weights when a run finishes.
PLOTS = (
    "elbo.png",
    "reconstructions.png",
    "samples.png",
    "latent.png",
    "traversals.png",
    "manifold.png",
)
#: Stages of a run in its manifest: training (epochs committed), finishing (summary written,
#: plots being drawn), done.
STAGES = ("training", "finishing", "done")
#: The files a run commits, which no derived file may name.
LAYOUT = (CONFIG, WEIGHTS, LAST, STATE, METRICS, SUMMARY)
#: The largest JSON file of a run read (the manifest, the config, the lock): 16 MiB.
MAX_JSON_BYTES = 16 * 2**20
_FORMAT = 1
_HEX = frozenset("0123456789abcdef")


def _tmp_name(path: Path) -> Path:
    # hidden, unique to this process and call, and keeping the suffix (matplotlib reads it)
    return path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")


def _is_tmp(name: str) -> bool:
    # a temporary file of a write (not of a lock being taken: see RunLock)
    return name.startswith(".") and ".tmp" in name and not name.startswith(".pyrovae.")


def _write(tmp: Path, data: bytes) -> None:
    # the primitive write (tests replace it to inject faults): the bytes, on disk
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rename(src: Path, dst: Path) -> None:
    # the primitive rename (tests replace it to inject faults)
    os.replace(src, dst)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, e: OSError) -> WriteError:
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    reason = f"{e.strerror or e} [{code}]" if code else str(e.strerror or e)
    hint = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the directory"
    return WriteError(f"cannot write {path}: {reason}; {hint} and try again (it was not changed)")


def _stage(path: Path, data: bytes) -> Path:
    # data under a temporary name beside path, on disk; nothing left behind on failure
    tmp = _tmp_name(path)
    try:
        _write(tmp, data)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from None
    return tmp


def _install(tmp: Path, path: Path) -> None:
    try:
        _rename(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file, fsync, rename, fsync of the
    directory.

    :raises WriteError: naming ``path`` (disk full, no permission); ``path`` is unchanged.
    """
    path = Path(path)
    _install(_stage(path, data), path)
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path (same suffix) for a writer that takes a file name, e.g. a plot; on a
    clean exit it is synced and renamed over ``path``, otherwise removed.

    :raises WriteError: naming ``path`` if it cannot be written.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _install(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def staging_dir(run_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder in ``run_dir`` for writers that make several files (the plots); on a
    clean exit each file is synced and renamed into ``run_dir``, then the folder is removed.

    :raises WriteError: naming the file that could not be written.
    """
    run_dir = Path(run_dir)
    tmp = run_dir / f".staging.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir()
        yield tmp
        for path in sorted(tmp.iterdir()):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            _install(path, run_dir / path.name)
        _fsync_dir(run_dir)
    except OSError as e:
        raise _write_error(run_dir, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256(data: bytes) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_regular(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes of ``path`` if it is a regular file, opened without following a symlink and
    without blocking (a FIFO or device is refused, never waited on).

    :param limit: the most bytes the file may hold.
    :raises FileNotFoundError: if there is no such file.
    :raises CheckpointError: naming the file if it is a symlink, not a regular file, larger than
        ``limit`` or unreadable.
    """
    path = Path(path)
    try:
        fd = os.open(
            path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        )
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(
                f"{path} is a symbolic link; a run's files must be regular files in the run "
                "directory: replace the link by the file it points to, if you trust it"
            ) from None
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(
                f"{path} is not a regular file (a FIFO, socket or device); a run's files must "
                "be regular files: remove it"
            )
        if limit is not None and info.st_size > limit:
            raise CheckpointError(
                f"{path} holds {info.st_size} bytes, more than the {limit} a pyrovae run writes "
                "there: it is not a file of a run; restore it"
            )
        try:
            return f.read()
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def parse_json(data: bytes, path: Path, what: str = "a JSON object") -> dict:
    """``data`` (the bytes of ``path``) as a JSON object.

    :raises CheckpointError: naming the file if it is not UTF-8 JSON, nests too deeply, holds a
        number too long to convert, or is not an object.
    """
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        problem = "it nests too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise CheckpointError(f"{path} is not readable JSON ({problem}); restore it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} should hold {what}, not {type(value).__name__}")
    return value


def read_json(path: str | os.PathLike, what: str = "a JSON object") -> dict:
    """Read a JSON object from ``path`` (a regular file, not a link).

    :raises CheckpointError: naming the file if it is missing, unreadable, not JSON or not an
        object.
    """
    path = Path(path)
    try:
        data = read_regular(path, MAX_JSON_BYTES)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; restore it") from None
    return parse_json(data, path, what)


def check_name(name, path: Path, entry: str) -> str:
    """``name``, read from the file ``path``, if it is a plain file name of the run directory
    (no folder, no ``..``, no NUL).

    :param entry: what ``name`` is in the file, for the message (e.g. ``"files"``).
    :raises CheckpointError: naming the file and the entry.
    """
    plain = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and len(name.encode("utf-8", "surrogatepass")) <= 255
    )
    if not plain:
        raise _bad_manifest(
            path, f"its {entry} entry {str(name)[:80]!r} is not a file name in the run directory"
        )
    return name


def _bad_manifest(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path} is corrupt: {problem}; restore it or start the run again")


def _is_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _check_file_entry(name: str, entry, path: Path) -> None:
    check_name(name, path, "files")
    if name in (MANIFEST, LOCK) or _is_tmp(name):
        raise _bad_manifest(path, f"its files entry {name!r} is not a file a run commits")
    if not isinstance(entry, dict) or not _is_digest(entry.get("sha256")):
        raise _bad_manifest(path, f"its files entry {name!r} has no SHA-256")
    pending = entry.get("pending")
    if pending is not None:
        # a temporary name this file's commit made (see _tmp_name), nothing else
        check_name(pending, path, f"files.{name}.pending")
        stem = f".{Path(name).stem}."
        if not (
            _is_tmp(pending) and pending.startswith(stem) and pending.endswith(Path(name).suffix)
        ):
            raise _bad_manifest(
                path,
                f"its files entry {name!r} names {pending!r} as pending, not a temporary "
                f"file of {name}",
            )


def _check_manifest(m: dict, path: Path) -> None:
    if m.get("format") != _FORMAT:
        raise _bad_manifest(path, f"format should be {_FORMAT}, got {str(m.get('format'))[:40]}")
    epoch = m.get("epoch")
    if type(epoch) is not int or not 0 <= epoch < 2**31:
        raise _bad_manifest(path, f"epoch should be an integer >= 0, got {str(epoch)[:40]}")
    if m.get("stage") not in STAGES:
        raise _bad_manifest(path, f"stage should be one of {', '.join(STAGES)}")
    files, derived = m.get("files"), m.get("derived")
    if not isinstance(files, dict) or not isinstance(derived, dict):
        raise _bad_manifest(path, "files and derived should be objects")
    for name, entry in files.items():
        _check_file_entry(name, entry, path)
    for name, digest in derived.items():
        check_name(name, path, "derived")
        if name in (*LAYOUT, MANIFEST, LOCK, *files) or _is_tmp(name):
            raise _bad_manifest(path, f"its derived entry {name!r} names a file of the run itself")
        if not isinstance(digest, str):
            raise _bad_manifest(path, f"its derived entry {name!r} has no hash")


def read_manifest(run_dir: str | os.PathLike) -> dict | None:
    """The run's manifest, or ``None`` for a directory without one (a run of an older pyrovae,
    or weights saved by :func:`pyrovae.save_run` alone).

    :raises CheckpointError: naming the file if it is corrupt.
    """
    path = Path(run_dir) / MANIFEST
    try:
        data = read_regular(path, MAX_JSON_BYTES)
    except FileNotFoundError:
        return None
    manifest = parse_json(data, path, "the run's manifest")
    _check_manifest(manifest, path)
    return manifest


def require_manifest(run_dir: str | os.PathLike) -> dict:
    """The run's manifest, which it must have.

    :raises UnverifiedRunError: for a run without one, saying how to adopt it.
    :raises CheckpointError: naming the file if it is corrupt.
    """
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise _no_manifest(Path(run_dir))
    return manifest


def _no_manifest(run_dir: Path) -> UnverifiedRunError:
    return UnverifiedRunError(
        f"{run_dir} has no {MANIFEST} (a run of an older pyrovae, or copied without it), so its "
        f"files cannot be verified; check them and adopt the run with `pyrovae verify {run_dir} "
        "--adopt` if you trust where it came from"
    )


def read_committed(run_dir: str | os.PathLike, name: str, manifest: dict | None = None) -> bytes:
    """The bytes of the committed version of file ``name`` of a run (its own name, or between a
    commit and its renames the temporary file the manifest names), checked against the
    manifest's SHA-256 of the whole file: for readers, which take no lock and change nothing.

    :param manifest: the run's manifest, if read already.
    :raises UnverifiedRunError: for a run without a manifest.
    :raises CheckpointError: naming the file if the manifest does not list it, or it is missing,
        not a regular file, or does not match its hash.
    """
    return _find_committed(Path(run_dir), name, manifest)[1]


def _find_committed(run_dir: Path, name: str, manifest: dict | None) -> tuple[Path, bytes]:
    # (where the committed version of `name` is, its verified bytes)
    manifest = manifest or require_manifest(run_dir)
    entry = manifest["files"].get(name)
    if entry is None:
        raise CheckpointError(
            f"{run_dir / name} is not committed in {MANIFEST} (epoch {manifest['epoch']}): "
            "the run has not saved it"
        )
    pending = entry.get("pending")
    if pending and _is_regular(run_dir / pending):  # a commit not yet renamed into place
        data = read_regular(run_dir / pending)
        if sha256(data) == entry["sha256"]:
            return run_dir / pending, data
    try:
        data = read_regular(run_dir / name)
    except FileNotFoundError:
        raise _missing(run_dir / name, manifest["epoch"]) from None
    if sha256(data) != entry["sha256"]:
        raise _changed(run_dir / name, manifest["epoch"])
    return run_dir / name, data


def _new_manifest() -> dict:
    return {"format": _FORMAT, "epoch": 0, "stage": "training", "files": {}, "derived": {}}


def _write_manifest(run_dir: Path, manifest: dict) -> None:
    write_text(run_dir / MANIFEST, json.dumps(manifest, indent=1))


def commit(run_dir: str | os.PathLike, files: dict[str, bytes], **fields) -> dict:
    """Replace several files of a run directory together: after a kill at any instant, the run
    holds either all the old files or all the new ones (once :func:`recover` has run).

    :param files: file name -> new contents.
    :param fields: manifest entries to set, e.g. ``epoch=3, stage="training"``.
    :returns: the new manifest.
    :raises WriteError: naming the file that could not be written; nothing is changed.
    """
    run_dir = Path(run_dir)
    old = read_manifest(run_dir) or _new_manifest()
    entries = {name: {"sha256": e["sha256"]} for name, e in old["files"].items()}
    staged = []
    try:
        for name, data in files.items():
            staged.append(_stage(run_dir / name, data))
            entries[name] = {"sha256": sha256(data), "pending": staged[-1].name}
        manifest = {**old, **fields, "format": _FORMAT, "files": entries}
        _write_manifest(run_dir, manifest)  # the commit point
    except WriteError:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
        raise
    _settle(run_dir, manifest)
    return manifest


def update_manifest(run_dir: str | os.PathLike, **fields) -> dict:
    """Set manifest entries (e.g. ``stage="done"``) without changing any file."""
    return commit(run_dir, {}, **fields)


def _settle(run_dir: Path, manifest: dict) -> None:
    # rename the committed files into place, then forget derived files of other weights
    moved = False
    for name, entry in manifest["files"].items():
        tmp = run_dir / entry.get("pending", "")
        if entry.get("pending") and _is_regular(tmp):
            _install(tmp, run_dir / name)
            moved = True
    if moved:
        _fsync_dir(run_dir)
    _drop_stale(run_dir, manifest)


def _drop_stale(run_dir: Path, manifest: dict) -> None:
    weights = manifest["files"].get(WEIGHTS, {}).get("sha256")
    derived = manifest["derived"]
    keep = {name: sha for name, sha in derived.items() if sha == weights}
    if keep != derived:
        manifest["derived"] = keep
        _write_manifest(run_dir, manifest)
    for name in {*DERIVED, *PLOTS, *derived} - set(keep):
        (run_dir / name).unlink(missing_ok=True)


def register_derived(run_dir: str | os.PathLike, names, weights_sha: str) -> None:
    """Record that files ``names`` of the run were made from the weights with hash
    ``weights_sha``; they are removed when the best weights change."""
    manifest = read_manifest(run_dir)
    if manifest is not None:
        derived = {**manifest["derived"], **dict.fromkeys(names, weights_sha)}
        update_manifest(run_dir, derived=derived)


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def committed(run_dir: str | os.PathLike, name: str) -> Path:
    """Where the committed version of file ``name`` of a run is now: its own name, or, between a
    commit and its renames, the temporary file the manifest names (for readers, which take no
    lock and change nothing). The file is checked as :func:`read_committed` does first.

    :raises CheckpointError: as :func:`read_committed`.
    """
    return _find_committed(Path(run_dir), name, None)[0]


def recover(run_dir: str | os.PathLike) -> dict | None:
    """Finish what a writer killed at any instant left: roll a committed epoch forward, remove
    temporary files and derived files of other weights, and check every committed file against
    its hash (the safetensors files are checked by :func:`read_committed` when they are
    loaded, so that a large file is read once). Call it holding the run's :class:`RunLock`.

    :returns: the manifest (``None`` for a run without one).
    :raises CheckpointError: naming a file that is missing or does not match the manifest.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is not None:
        _settle(run_dir, manifest)
        for name, entry in manifest["files"].items():
            if not name.endswith(".safetensors"):  # checked when loaded (read_committed)
                _verify(run_dir, name, entry["sha256"], manifest["epoch"])
    _remove_tmp(run_dir)
    return manifest


def _remove_tmp(run_dir: Path) -> None:
    for tmp in run_dir.iterdir() if run_dir.is_dir() else ():
        if _is_tmp(tmp.name) and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif _is_tmp(tmp.name):
            tmp.unlink(missing_ok=True)


def _missing(path: Path, epoch: int) -> CheckpointError:
    return CheckpointError(
        f"{path} is missing, though {MANIFEST} names it (epoch {epoch}); restore it"
    )


def _changed(path: Path, epoch: int) -> CheckpointError:
    return CheckpointError(
        f"{path} does not match its hash in {MANIFEST} (epoch {epoch}): it was changed or "
        "corrupted after it was saved; restore it"
    )


def _verify(run_dir: Path, name: str, digest: str, epoch: int) -> None:
    path = run_dir / name
    try:
        data = read_regular(path)
    except FileNotFoundError:
        raise _missing(path, epoch) from None
    if sha256(data) != digest:
        raise _changed(path, epoch)


def _start_time(pid: int) -> str | None:
    # the process's start time in clock ticks since boot (Linux), to tell a reused pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell: assume it is
    pid = holder.get("pid")
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = holder.get("started_ticks")
    return started is None or _start_time(pid) in (None, started)


class RunLock:
    """The one-writer lock of a run directory (a context manager): ``pyrovae.lock`` holds the
    pid, host and command of its holder. A lock left by a dead process on this host is taken
    over; a live holder's is refused.

    :param run_dir: the run directory (created if missing).
    :param command: what the holder does, for the message a second writer gets.
    :raises RunInUseError: naming the holder, if another live process holds the lock.
    """

    def __init__(self, run_dir: str | os.PathLike, command: str):
        self.path = Path(run_dir) / LOCK
        self.command = command
        self.took_over: dict | None = None  # the dead holder whose lock was taken over

    def _info(self) -> bytes:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "started_ticks": _start_time(os.getpid()),
        }
        return json.dumps(info).encode()

    def _holder(self) -> dict:
        # the lock's holder ({} for none or garbage); a lock that is no regular file is refused
        try:
            holder = json.loads(read_regular(self.path, MAX_JSON_BYTES))
        except FileNotFoundError:
            return {}
        except CheckpointError:  # a link, FIFO or device: never followed, never waited on
            raise CheckpointError(
                f"{self.path} is not a lock pyrovae wrote (it is a link, FIFO or device, not a "
                f"regular file); delete it if no pyrovae process uses {self.path.parent}"
            ) from None
        except (OSError, ValueError, RecursionError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _write_error(self.path.parent, e) from None
        # the lock appears with its contents at once: written aside, then hard-linked
        tmp = self.path.with_name(f".pyrovae.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            tmp.write_bytes(self._info())
            for _ in range(5):
                try:
                    os.link(tmp, self.path)
                    return self
                except FileExistsError:
                    self._take_over_if_stale()
            raise RunInUseError(f"{self.path.parent} is in use: could not take {self.path}")
        except OSError as e:
            raise _write_error(self.path, e) from None
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        holder = self._holder()
        if holder and _alive(holder):
            raise RunInUseError(
                f"{self.path.parent} is in use by pid {holder.get('pid')} on "
                f"{holder.get('host')} ({holder.get('command')}, since {holder.get('since')}); "
                f"wait for it to end, or delete {self.path} if that process is gone"
            )
        aside = self.path.with_name(f".pyrovae.stale.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.rename(self.path, aside)  # one of several takers wins this
        except FileNotFoundError:
            return
        try:
            moved = json.loads(read_regular(aside, MAX_JSON_BYTES))
        except (OSError, ValueError, RecursionError):  # CheckpointError is a ValueError
            moved = {}
        if moved and moved != holder:  # another taker's fresh lock: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        self.took_over = holder

    def release(self) -> None:
        """Give the lock up (if this process still holds it)."""
        if self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clear_for_new_run(run_dir: str | os.PathLike, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a new run: refuse one that holds a run (unless ``overwrite``:
    then its files are removed) or other files. Call it holding the run's lock.

    :raises CheckpointError: pointing to ``pyrovae resume`` or ``--overwrite``.
    """
    run_dir = Path(run_dir)
    _remove_tmp(run_dir)  # left by a writer killed before it committed anything
    names = {p.name for p in run_dir.iterdir()} - {LOCK}
    if not names:
        return
    is_run = bool({CONFIG, MANIFEST} & names)
    if not is_run:
        raise CheckpointError(
            f"{run_dir} is not empty and holds no pyrovae run; choose another --out"
        )
    if not overwrite:
        raise CheckpointError(
            f"{run_dir} holds a run already; continue it with `pyrovae resume {run_dir}`, or "
            "pass --overwrite to replace it"
        )
    layout = (CONFIG, MANIFEST, WEIGHTS, LAST, STATE, METRICS, SUMMARY, *DERIVED, *PLOTS)
    for name in sorted(names, key=lambda n: n not in (CONFIG, MANIFEST)):
        if name in layout:
            (run_dir / name).unlink(missing_ok=True)


def metrics_bytes(records: list[dict], columns: list[str]) -> bytes:
    """``metrics.csv``'s contents: one row per record, ``columns`` in order."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue().encode()


def _metric(path: Path, line: int, key: str, value: str | None) -> float | None:
    if value in ("", None):
        return None
    try:
        return float(value)
    except ValueError:
        raise CheckpointError(
            f"{path}, line {line}: {key} is {value[:40]!r}, not a number; restore the file"
        ) from None


def read_metrics(run_dir: str | os.PathLike, last_epoch: int) -> list[dict]:
    """``metrics.csv`` back into records, epochs 1 to ``last_epoch`` (a later row, left by a
    run of an older pyrovae cut off in a save, is dropped), checked against the manifest first.

    :raises CheckpointError: naming the file if it is unverified, unreadable or does not hold
        every epoch.
    """
    return parse_metrics(read_committed(run_dir, METRICS), Path(run_dir) / METRICS, last_epoch)


def parse_metrics(data: bytes, path: Path, last_epoch: int) -> list[dict]:
    """The records of ``metrics.csv``'s bytes (the file at ``path``), as :func:`read_metrics`.

    :raises CheckpointError: naming the file and line.
    """
    try:
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error) as e:
        raise CheckpointError(f"cannot read {path}: {e}; restore it") from None
    if rows and "epoch" not in rows[0]:
        raise CheckpointError(f"{path} has no epoch column; restore it")
    records = []
    for line, row in enumerate(rows, 2):
        record = {k: _metric(path, line, k, v) for k, v in row.items() if isinstance(k, str)}
        epoch = record.get("epoch")
        if epoch is None or not epoch.is_integer() or not 0 < epoch < 2**31:
            raise CheckpointError(f"{path}, line {line}: the epoch is not a whole number >= 1")
        record["epoch"] = int(epoch)
        units = record.get("active_units")
        if units is not None:  # a count: written back as it was read
            if not units.is_integer():
                raise CheckpointError(f"{path}, line {line}: active_units is not a count")
            record["active_units"] = int(units)
        if record["epoch"] <= last_epoch:
            records.append(record)
    if [r["epoch"] for r in records] != list(range(1, last_epoch + 1)):
        raise CheckpointError(
            f"{path} holds {len(records)} rows for the {last_epoch} epochs saved: the history "
            "was lost or changed; restore the file"
        )
    return records
