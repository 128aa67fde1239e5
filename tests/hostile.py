"""Tools of the tests that damage run directories on purpose (tests/test_checkpoint.py,
tests/test_rundir.py, tests/test_fuzz.py): re-signing a changed file in the manifest, as someone
who hands over a run could, so that the checks behind the manifest's hash are reached."""

import hashlib
import json
from pathlib import Path

from pyrovae.rundir import MANIFEST


def manifest(run: Path) -> dict:
    return json.loads((run / MANIFEST).read_text())


def put_manifest(run: Path, value) -> None:
    (run / MANIFEST).write_text(json.dumps(value))


def rehash(run: Path, name: str) -> None:
    """Record file ``name``'s current SHA-256 in the run's manifest."""
    m = manifest(run)
    m["files"][name] = {"sha256": hashlib.sha256((run / name).read_bytes()).hexdigest()}
    put_manifest(run, m)


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(the JSON header, the data) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + data


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` -> its bytes (a link: where it points)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p)] = ("link", str(p.readlink()))
        elif p.is_file():
            out[str(p)] = p.read_bytes()
        else:
            out[str(p)] = "dir"
    return out
