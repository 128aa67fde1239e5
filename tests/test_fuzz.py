"""Property-based tests (Hypothesis) over the files a run directory hands to pyrovae: manifest.json,
config.json and ``--config`` files, the safetensors headers, metrics.csv.

Whatever the mutation, reading the run as the commands do (recover, load the model, the training
state, the metrics) either refuses it with a pyrovae error (:class:`~pyrovae.CheckpointError`)
or loads exactly what was saved; it never raises another exception, never touches a file outside
the run (a sentinel folder beside it), and never loads changed bytes the manifest does not vouch
for. A mutation re-signed in the manifest (as whoever hands the run over could) reaches the
parsers behind the hash, which must hold as well.

The default run is bounded to seconds (``FAST``: derandomized, few examples); ``-m slow`` runs
many more (``LONG``).
"""

import json
import shutil
import tempfile
from pathlib import Path

import pyro
import pytest
import torch
from hostile import rehash, safetensors_bytes, safetensors_parts, snapshot
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyrovae import cli, rundir
from pyrovae.checkpoint import load_run, load_state
from pyrovae.config import build_vae
from pyrovae.errors import CheckpointError

FAST = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))  # fmt: skip
LONG = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))  # fmt: skip

TRAIN = ["--epochs", "1", "--hidden", "8", "--z-dim", "2", "--train-limit", "100",
         "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run = tmp_path_factory.mktemp("fuzz") / "run"
    assert cli.main(["train", "--out", str(run), *TRAIN]) == 0
    return run, _load(run)


def _load(run: Path):
    # what the commands read of a run: (weights, training state's epoch and moments, metrics)
    pyro.clear_param_store()
    manifest = rundir.recover(run)  # evaluate, resume and plot start so, holding the lock
    vae, config = load_run(run)
    state, extra = load_state(run, build_vae(config))
    records = rundir.read_metrics(run, manifest["epoch"])
    weights = {k: v.clone() for k, v in vae.state_dict().items()}
    moments = {(i, k): v for i, m in state.optimizer["state"].items() for k, v in m.items()}
    return weights, state.epoch, moments, records, config.to_json()


def _same(a, b) -> bool:
    wa, ea, ma, ra, ca = a
    wb, eb, mb, rb, cb = b
    return (
        wa.keys() == wb.keys()
        and all(torch.equal(wa[k], wb[k]) for k in wa)
        and ea == eb
        and ma.keys() == mb.keys()
        and all(torch.equal(ma[k], mb[k]) for k in ma)
        and ra == rb
        and ca == cb
    )


def _check(saved, damage, signed_changes_allowed=False):
    """Copy the saved run beside a sentinel folder, apply ``damage(run)``, read the run: a
    CheckpointError, or exactly what was saved (or, for a re-signed file, anything the parsers
    accept); nothing outside the run changes. ``damage`` returns True when it changed a file's
    bytes without re-signing it: that must be refused, whatever the change."""
    run0, expected = saved
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run, outside = tmp / "run", tmp / "outside"
        shutil.copytree(run0, run)
        outside.mkdir()
        (outside / "victim.csv").write_text("not the run's\n")
        unsigned = damage(run)
        before = snapshot(outside)
        try:
            got = _load(run)
        except CheckpointError:
            got = None
        assert snapshot(outside) == before  # nothing outside moved, written or deleted
        assert sorted(p.name for p in tmp.iterdir()) == ["outside", "run"]
        if unsigned:
            assert got is None, (
                "a changed file was loaded though the manifest does not vouch for it"
            )
        if got is not None and not signed_changes_allowed:
            assert _same(got, expected), "changed bytes were loaded"
        return got


def _mutations(max_size=40):
    # edits of a byte string: (kind, position fraction, bytes)
    kinds = st.sampled_from(["flip", "replace", "insert", "delete", "truncate"])
    return st.lists(
        st.tuples(kinds, st.floats(0, 1), st.binary(min_size=1, max_size=max_size)),
        min_size=1,
        max_size=3,
    )


def _apply(data: bytes, edits) -> bytes:
    for kind, where, blob in edits:
        i = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "flip" and data:
            data = data[:i] + bytes([data[i] ^ (blob[0] or 1)]) + data[i + 1 :]
        elif kind == "replace":
            data = data[:i] + blob + data[i + len(blob) :]
        elif kind == "insert":
            data = data[:i] + blob + data[i:]
        elif kind == "delete":
            data = data[:i] + data[i + len(blob) :]
        else:
            data = data[:i]
    return data


def _mutate_file(name: str, edits, sign: bool):
    def damage(run: Path):
        path = run / name
        old = path.read_bytes()
        path.write_bytes(_apply(old, edits))
        if sign:
            rehash(run, name)
        return not sign and name != rundir.MANIFEST and path.read_bytes() != old

    return damage


#: values a hostile manifest or header may hold where a name, number or hash is expected
HOSTILE = st.one_of(
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "../outside/victim.csv",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "a\x00b",
            "config.json",
            "manifest.json",
            "pyrovae.lock",
            ".x.1.ab.tmp",
            "9" * 5000,
            "nan",
            "F32",
            "I32",
            "F64",
            "U8",
        ]
    ),  # fmt: skip
    st.integers(),
    st.floats(),
    st.none(),
    st.booleans(),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(value, prefix=()):
    # every path to a value in nested dicts and lists
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _set(root, path, value, key_instead: bool):
    # root with the value at path replaced (or, key_instead, the key at path renamed to value)
    if not path:
        return value
    parent = root
    for k in path[:-1]:
        parent = parent[k]
    if key_instead and isinstance(parent, dict) and isinstance(value, str):
        parent[value] = parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return root


# ---------------------------------------------------------------------------------------------
# manifest.json


def _manifest_bytes(edits):
    return _mutate_file(rundir.MANIFEST, edits, sign=False)


def _manifest_fields(choice, value, key_instead):
    def damage(run: Path):
        m = json.loads((run / rundir.MANIFEST).read_text())
        paths = list(_paths(m))
        m = _set(m, paths[choice % len(paths)], value, key_instead)
        (run / rundir.MANIFEST).write_text(json.dumps(m))
        return False

    return damage


NAMES = st.sampled_from(["../outside/victim.csv", "OUTSIDE/victim.csv", "..", ".", "", "a/b",
                         "config.json", "manifest.json", "model.safetensors", "pyrovae.lock",
                         ".x.1.ab.tmp", ".metrics.1.ab.tmp.csv", "new.txt", "a\x00b"])  # fmt: skip
WHERE = st.sampled_from(["pending", "file", "derived"])


def _manifest_names(where, entry, name, use_victim_hash):
    # a name in the manifest where the run takes one: a file's pending name, a new file, a
    # derived file (OUTSIDE: the sentinel folder's absolute path)
    def damage(run: Path):
        import hashlib

        m = json.loads((run / rundir.MANIFEST).read_text())
        name_ = name.replace("OUTSIDE", str(run.parent / "outside"))
        victim = (run.parent / "outside" / "victim.csv").read_bytes()
        sha = hashlib.sha256(victim).hexdigest() if use_victim_hash else "0" * 64
        files = sorted(m["files"])
        if where == "pending":
            m["files"][files[entry % len(files)]]["pending"] = name_
        elif where == "file":
            m["files"][name_] = {"sha256": sha, "pending": name_}
        else:
            m["derived"][name_] = sha
        (run / rundir.MANIFEST).write_text(json.dumps(m))

    return damage


@FAST
@given(where=WHERE, entry=st.integers(0, 20), name=NAMES, victim=st.booleans())
def test_manifest_names(saved, where, entry, name, victim):
    _check(saved, _manifest_names(where, entry, name, victim))


@FAST
@given(edits=_mutations())
def test_manifest_bytes(saved, edits):
    _check(saved, _manifest_bytes(edits))


@FAST
@given(choice=st.integers(0, 10**6), value=HOSTILE, key_instead=st.booleans())
def test_manifest_fields(saved, choice, value, key_instead):
    _check(saved, _manifest_fields(choice, value, key_instead))


@pytest.mark.slow
@LONG
@given(edits=_mutations(), choice=st.integers(0, 10**6), value=HOSTILE, key=st.booleans(),
       where=WHERE, name=NAMES, victim=st.booleans())  # fmt: skip
def test_manifest_long(saved, edits, choice, value, key, where, name, victim):
    _check(saved, _manifest_bytes(edits))
    _check(saved, _manifest_fields(choice, value, key))
    _check(saved, _manifest_names(where, choice, name, victim))


# ---------------------------------------------------------------------------------------------
# config.json and --config files


@FAST
@given(edits=_mutations(), sign=st.booleans())
def test_config_json(saved, edits, sign):
    _check(saved, _mutate_file(rundir.CONFIG, edits, sign), signed_changes_allowed=sign)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip
KEYS = st.sampled_from(["hidden", "z_dim", "epochs", "prior", "lr", "batch_size", "x_shape",
                        "components", "widths", "seed", "beta", "gated", "dataset"])  # fmt: skip


def _config_file(data: bytes):
    # the train command's reading of --config: a ValueError naming the file, or arguments
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.json"
        path.write_bytes(data)
        parser = cli.build_parser()
        argv = ["train", "--config", str(path), "--out", str(Path(tmp) / "r")]
        try:
            args = cli._with_config_file(parser, str(path), argv)
        except ValueError as e:
            assert f"--config {path}: " in str(e) and "\n" not in str(e)
            return
        from dataclasses import fields

        from pyrovae.config import Config

        names = {f.name for f in fields(Config)}
        try:
            config = Config.from_dict({k: v for k, v in vars(args).items() if k in names})
            config.validate()
        except ValueError:
            return


@FAST
@given(value=st.dictionaries(KEYS, JSON, max_size=4) | JSON)
@example(value={"\n": None})  # found by the long run: a key that breaks the one line
def test_config_file_values(value):
    _config_file(json.dumps(value).encode())


@FAST
@given(
    data=st.binary(max_size=200)
    | st.builds(
        lambda v, e: _apply(json.dumps(v).encode(), e), st.dictionaries(KEYS, JSON), _mutations()
    )
)
def test_config_file_bytes(data):
    _config_file(data)


@pytest.mark.slow
@LONG
@given(value=st.dictionaries(KEYS, JSON, max_size=6) | JSON, data=st.binary(max_size=2000))
def test_config_long(value, data):
    _config_file(json.dumps(value).encode())
    _config_file(data)


# ---------------------------------------------------------------------------------------------
# safetensors headers


def _header_bytes(name, edits, sign):
    def damage(run: Path):
        raw = (run / name).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        head = _apply(raw[8 : 8 + n], edits)
        (run / name).write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n :])
        if sign:
            rehash(run, name)
        return not sign and head != raw[8 : 8 + n]

    return damage


def _header_fields(name, choice, value, key_instead):
    def damage(run: Path):
        header, data = safetensors_parts(run / name)
        paths = list(_paths(header))
        header = _set(header, paths[choice % len(paths)], value, key_instead)
        (run / name).write_bytes(safetensors_bytes(header, data))
        rehash(run, name)
        return False

    return damage


FILES = st.sampled_from([rundir.WEIGHTS, rundir.LAST, rundir.STATE])


@FAST
@given(name=FILES, edits=_mutations(), sign=st.booleans())
def test_safetensors_header_bytes(saved, name, edits, sign):
    got = _check(saved, _header_bytes(name, edits, sign), signed_changes_allowed=sign)
    if sign and got is not None:  # the parsers took it: the tensors must be the saved ones
        assert _same(got, saved[1]) or name == rundir.STATE


@FAST
@given(name=FILES, choice=st.integers(0, 10**6), value=HOSTILE, key_instead=st.booleans())
def test_safetensors_header_fields(saved, name, choice, value, key_instead):
    _check(saved, _header_fields(name, choice, value, key_instead), signed_changes_allowed=True)


@pytest.mark.slow
@LONG
@given(name=FILES, edits=_mutations(), choice=st.integers(0, 10**6), value=HOSTILE,
       key=st.booleans())  # fmt: skip
def test_safetensors_long(saved, name, edits, choice, value, key):
    _check(saved, _header_bytes(name, edits, True), signed_changes_allowed=True)
    _check(saved, _header_bytes(name, edits, False))
    _check(saved, _header_fields(name, choice, value, key), signed_changes_allowed=True)


# ---------------------------------------------------------------------------------------------
# metrics.csv


@FAST
@given(edits=_mutations(), sign=st.booleans())
def test_metrics_csv(saved, edits, sign):
    _check(saved, _mutate_file(rundir.METRICS, edits, sign), signed_changes_allowed=sign)


@pytest.mark.slow
@LONG
@given(edits=_mutations(max_size=200), sign=st.booleans())
def test_metrics_long(saved, edits, sign):
    _check(saved, _mutate_file(rundir.METRICS, edits, sign), signed_changes_allowed=sign)
