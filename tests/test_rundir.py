"""Run directories under faults: a kill at every write of a run, a full disk, two writers, a
stale lock, corrupt and ill-typed files; each ends in an exact resume or a one-line error."""

import csv
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from hostile import manifest, put_manifest, rehash, snapshot

from pyrovae import cli, rundir
from pyrovae.errors import CheckpointError, WriteError
from pyrovae.rundir import LOCK, MANIFEST, WEIGHTS

FAST = ["--epochs", "2", "--hidden", "16", "--z-dim", "2", "--train-limit", "200",
        "--no-progress"]  # fmt: skip


class Killed(BaseException):
    """A kill -9 at one instant: nothing after it runs (it is no Exception)."""


def _one_line_error(capsys, argv, match, code=1):
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def _kill_at(monkeypatch, instant: int | None) -> list:
    # count the durable steps (writes and renames); at step `instant`, die: a write leaves half
    # its temporary file, a rename does not happen
    steps, write, rename = [], rundir._write, rundir._rename

    def faulty_write(tmp, data):
        steps.append(("write", tmp.name))
        if len(steps) == instant:
            tmp.write_bytes(data[: len(data) // 2])
            raise Killed
        write(tmp, data)

    def faulty_rename(src, dst):
        steps.append(("rename", dst.name))
        if len(steps) == instant:
            raise Killed
        rename(src, dst)

    monkeypatch.setattr(rundir, "_write", faulty_write)
    monkeypatch.setattr(rundir, "_rename", faulty_rename)
    return steps


def _tensors(path):
    # a safetensors file's tensors (bytes) and metadata, without timings (its header's key order
    # varies between writes: safetensors keeps metadata in a hash map)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    if "state" in meta:
        state = json.loads(meta.pop("state"))
        state["extra"].pop("train_seconds")
        meta["state"] = state
    tensors = {k: (v.dtype, v.shape, v.numpy().tobytes()) for k, v in load_file(path).items()}
    return tensors, meta


def _snapshot(run):
    # everything a run's result is: tensors, plots, metrics and summary without timings
    files = {p.name: p.read_bytes() for p in run.glob("*.png")}
    files |= {p.name: _tensors(p) for p in run.glob("*.safetensors")}
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    metrics = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    summary = json.loads((run / "train.json").read_text())
    summary.pop("train_seconds")
    return files, metrics, summary, (run / "config.json").read_bytes()


def _sweep(tmp_path, monkeypatch, instants=None) -> tuple[int, int]:
    # every run is named "run" (in folders of its own): elbo.png carries the run's name
    whole = tmp_path / "whole" / "run"
    steps = _kill_at(monkeypatch, None)
    assert cli.main(["train", "--out", str(whole), *FAST]) == 0
    expected, total = _snapshot(whole), len(steps)
    exact = 0
    for instant in instants(total) if instants else range(1, total + 1):
        run = tmp_path / f"killed{instant}" / "run"
        _kill_at(monkeypatch, instant)
        with pytest.raises(Killed):
            cli.main(["train", "--out", str(run), *FAST])
        _kill_at(monkeypatch, None)
        if (run / MANIFEST).is_file():  # something was committed: resume finishes it
            assert cli.main(["resume", str(run), "--no-progress"]) == 0, instant
        else:  # killed before the run existed: train again, in the same directory
            assert cli.main(["train", "--out", str(run), *FAST]) == 0, instant
        assert _snapshot(run) == expected, (instant, steps[instant - 1])
        assert not [p for p in run.iterdir() if p.name.startswith(".")], instant
        exact += 1
    return exact, total


def test_a_kill_at_sampled_writes_resumes_exactly(tmp_path, monkeypatch):
    # a spread of instants (first, last, in a save, while plotting); the slow test tries all
    exact, total = _sweep(tmp_path, monkeypatch, lambda n: sorted({1, 2, 3, n // 3, n // 2,
                                                                  n - 8, n - 2, n}))  # fmt: skip
    assert exact == 8 and total > 20


@pytest.mark.slow
def test_a_kill_at_every_write_resumes_exactly(tmp_path, monkeypatch, capsys):
    exact, total = _sweep(tmp_path, monkeypatch)
    with capsys.disabled():
        print(f"\nkill instants resumed exactly: {exact} of {total}")
    assert exact == total


def test_full_disk_is_one_line_and_resumable(tmp_path, monkeypatch, capsys):
    run, calls, write = tmp_path / "run", [], rundir._write

    def full(tmp, data):
        calls.append(tmp)
        if len(calls) >= 6 and tmp.name.startswith(".state"):
            raise OSError(errno.ENOSPC, "No space left on device")
        write(tmp, data)

    monkeypatch.setattr(rundir, "_write", full)
    err = _one_line_error(capsys, ["train", "--out", str(run), *FAST], "state.safetensors")
    assert "No space left on device [ENOSPC]; free some space" in err
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary left
    monkeypatch.setattr(rundir, "_write", write)
    assert cli.main(["resume", str(run), "--no-progress"]) == 0
    assert (run / "train.json").is_file()


def test_write_bytes_is_atomic_and_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    rundir.write_bytes(path, b"old")

    def denied(tmp, data):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(rundir, "_write", denied)
    with pytest.raises(WriteError, match=r"cannot write .*f\.bin: Permission denied \[EACCES\]"):
        rundir.write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_second_writer_is_refused_and_train_never_overwrites(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), *FAST]) == 0
    weights = (run / WEIGHTS).read_bytes()
    _one_line_error(capsys, ["train", "--out", str(run), *FAST],
                    f"holds a run already; continue it with `pyrovae resume {run}`")  # fmt: skip
    with rundir.RunLock(run, "pyrovae train"):  # this live process holds it
        for argv in (["resume", str(run), "--epochs", "3"], ["evaluate", str(run)],
                     ["train", "--out", str(run), "--overwrite", *FAST]):  # fmt: skip
            err = _one_line_error(capsys, argv, f"is in use by pid {os.getpid()}")
            assert "pyrovae train" in err
    assert (run / WEIGHTS).read_bytes() == weights
    assert (
        cli.main(["evaluate", str(run), "--num-samples", "5", "--limit", "10", "--no-progress"])
        == 0
    )
    assert cli.main(["train", "--out", str(run), "--overwrite", "--seed", "1", *FAST]) == 0
    assert (run / WEIGHTS).read_bytes() != weights
    assert not (run / "eval.json").exists() and not (run / "log_px.csv").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    _one_line_error(capsys, ["train", "--out", str(tmp_path / "other"), *FAST],
                    "is not empty and holds no pyrovae run")  # fmt: skip


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    # a real `pyrovae train`, killed with SIGKILL once it has saved an epoch
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "pyrovae.cli", "train", "--out", str(run), "--epochs", "200",
            "--hidden", "16", "--z-dim", "2", "--train-limit", "200", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYROVAE_DEVICE": "cpu"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (run / "last.safetensors").is_file():
        time.sleep(0.05)
    _one_line_error(capsys, ["resume", str(run)], f"is in use by pid {proc.pid}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / LOCK).is_file()  # left behind
    assert cli.main(["resume", str(run), "--epochs", "3", "--no-progress"]) in (0, 1)
    assert "took over the lock of pid" in capsys.readouterr().err
    assert not (run / LOCK).exists()


def test_sigterm_says_which_epoch_is_saved(tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "pyrovae.cli", "train", "--out", str(run), "--epochs", "500",
            "--hidden", "16", "--z-dim", "2", "--train-limit", "200", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYROVAE_DEVICE": "cpu"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and not (run / "last.safetensors").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1].strip()
    assert proc.returncode == 130 and len(err.splitlines()) == 1, err
    assert "interrupted; epoch " in err and f"continue with `pyrovae resume {run}`" in err
    epoch = int(err.split("epoch ")[1].split()[0])
    assert json.loads((run / MANIFEST).read_text())["epoch"] == epoch >= 1
    assert not (run / LOCK).exists()


def test_plot_redraws_and_derived_files_follow_the_weights(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), *FAST]) == 0
    pngs = {p.name: p.read_bytes() for p in run.glob("*.png")}
    for name in pngs:
        (run / name).unlink()
    (run / "elbo.png").write_bytes(b"\x89PNG truncated")
    assert cli.main(["plot", str(run)]) == 0
    assert {p.name: p.read_bytes() for p in run.glob("*.png")} == pngs

    assert (
        cli.main(["evaluate", str(run), "--num-samples", "5", "--limit", "10", "--no-progress"])
        == 0
    )
    result = json.loads((run / "eval.json").read_text())
    sha = rundir.sha256((run / WEIGHTS).read_bytes())
    assert result["checkpoint"] == {"file": WEIGHTS, "epoch": 2, "sha256": sha}
    assert f"epoch 2 sha256 {sha}" in (run / "log_px.csv").read_text().splitlines()[0]
    assert (
        cli.main(["evaluate", str(run), "--num-samples", "5", "--limit", "10", "--no-progress"])
        == 0
    )
    assert "re-scoring: replacing" in capsys.readouterr().out
    # training on changes the best weights: the scores of the old ones go
    assert cli.main(["resume", str(run), "--epochs", "4", "--no-progress"]) == 0
    assert json.loads((run / "train.json").read_text())["best_epoch"] > 2
    assert not (run / "eval.json").exists() and not (run / "log_px.png").exists()
    assert (run / "elbo.png").is_file()  # redrawn for the new weights


def test_a_run_killed_in_its_first_epoch_is_started_by_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    steps = _kill_at(monkeypatch, None)
    import pyrovae.checkpoint

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(pyrovae.checkpoint, "save_state", killed)
    with pytest.raises(Killed):
        cli.main(["train", "--out", str(run), "--test-every", "1", "--test-samples", "3",
                  "--test-limit", "5", *FAST])  # fmt: skip
    assert (run / "config.json").is_file() and steps  # the config, without any epoch
    monkeypatch.undo()
    assert cli.main(["resume", str(run), "--no-progress"]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["test_ll"] for r in rows)


def _trained(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), *FAST]) == 0
    return run


@pytest.mark.parametrize("name, content, match", [
    ("metrics.csv", b"", "does not match its hash"),
    ("train.json", b"{}", "does not match its hash"),
    (MANIFEST, b"[]", "manifest.json should hold the run's manifest"),
    (MANIFEST, b'{"epoch": 1.5}', "manifest.json is corrupt: epoch should be an integer"),
    ("config.json", b'{"z_dim": 8.0}', "config.json is corrupt: z_dim must be an integer"),
    ("config.json", b"[]", "config.json is corrupt: a config is a JSON object"),
])  # fmt: skip
def test_corrupt_run_files_are_one_line(tmp_path, capsys, name, content, match):
    run = _trained(tmp_path)
    (run / name).write_bytes(content)
    _one_line_error(capsys, ["resume", str(run), "--epochs", "3"], f"{run / name} ")
    if name == "config.json":  # a reader that takes no lock checks it too, then reads it typed
        out = ["sample", str(run), "--out", str(tmp_path / "s.png")]
        _one_line_error(capsys, out, "config.json does not match its hash in manifest.json")
        rehash(run, name)
        _one_line_error(capsys, out, match)


def test_tensor_bit_flips_and_non_finite_weights_are_refused(tmp_path, capsys):
    run = _trained(tmp_path)
    for name in (WEIGHTS, "last.safetensors", "state.safetensors"):
        data = bytearray((run / name).read_bytes())
        good = bytes(data)
        data[-3] ^= 0x10  # one bit of the last tensor
        (run / name).write_bytes(bytes(data))
        argv = ["resume", str(run), "--epochs", "3"] if name != WEIGHTS else ["evaluate", str(run)]
        _one_line_error(capsys, argv, f"{name} does not match its hash in manifest.json")
        rehash(run, name)  # the file's own checksum still holds
        _one_line_error(capsys, argv, f"{name} is corrupt: its data does not match the checksum")
        (run / name).write_bytes(good)
        rehash(run, name)
    from pyrovae.checkpoint import load_run, save_weights

    vae, _ = load_run(run)
    with torch.no_grad():
        next(vae.parameters())[0].fill_(float("nan"))
    save_weights(vae, run / WEIGHTS)
    rehash(run, WEIGHTS)
    _one_line_error(capsys, ["sample", str(run), "--out", str(tmp_path / "s.png")],
                    f"{run / WEIGHTS} holds non-finite values")  # fmt: skip


def test_ill_typed_state_metadata_is_one_line(tmp_path, capsys):
    from safetensors.torch import load_file

    from pyrovae.checkpoint import _serialize  # with the checksum pyrovae writes

    run = _trained(tmp_path)
    path = run / "state.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["state"])
    tensors = load_file(path)
    cases = [({**meta, "moments": []}, tensors, "ill-typed metadata"),
             ({**meta, "extra": {}}, tensors, "lacks a run's bookkeeping"),
             (meta, {**tensors, "rng": torch.zeros(3)}, "random generator state")]  # fmt: skip
    for bad_meta, bad_tensors, match in cases:
        path.write_bytes(_serialize(bad_tensors, {"state": json.dumps(bad_meta)}))
        rehash(run, path.name)
        _one_line_error(capsys, ["resume", str(run), "--epochs", "3"], match)


def test_bad_device_and_corrupt_data_are_one_line(tmp_path, capsys):
    import numpy as np

    _one_line_error(capsys, ["train", "--out", str(tmp_path / "r"), "--device", "meta", *FAST],
                    "--device meta: pyrovae runs on cpu or cuda")  # fmt: skip
    np.savez(tmp_path / "whole.npz", train=np.zeros((10, 784), np.uint8))
    whole = (tmp_path / "whole.npz").read_bytes()
    for size in (0, len(whole) // 2):
        data = tmp_path / f"data{size}"
        data.mkdir()
        (data / "binarized_mnist.npz").write_bytes(whole[:size])
        argv = ["train", "--dataset", "binarized-mnist", "--data-dir", str(data), "--out",
                str(tmp_path / "r"), *FAST]  # fmt: skip
        _one_line_error(capsys, argv, "binarized_mnist.npz (a corrupt or partial file?)")


# ---------------------------------------------------------------------------------------------
# A run directory someone gave you (issue 25): names confined, links and FIFOs refused, every
# loaded byte verified, no manifest no trust, one line for every failure.


@pytest.fixture(scope="module")
def _given(tmp_path_factory):
    run = tmp_path_factory.mktemp("given") / "run"
    assert cli.main(["train", "--out", str(run), *FAST]) == 0
    return run


@pytest.fixture
def given(_given, tmp_path):
    """(a copy of a finished run, a folder beside it holding a sentinel file)"""
    import shutil

    run, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(_given, run)
    outside.mkdir()
    (outside / "victim.csv").write_text("not the run's\n")
    return run, outside


def _names_outside(run, outside):
    sha = hashlib.sha256(b"not the run's\n").hexdigest()
    return [
        ("files", "metrics.csv", {"sha256": sha, "pending": str(outside / "victim.csv")}),
        ("files", "train.json", {"sha256": sha, "pending": "../outside/victim.csv"}),
        ("files", "notes.txt", {"sha256": sha, "pending": str(outside / "victim.csv")}),
        ("files", "metrics.csv", {"sha256": sha, "pending": ".x.1.ab.tmp.csv"}),  # not its own
        ("files", "../outside/victim.csv", {"sha256": sha}),
        ("files", "..", {"sha256": sha}),
        ("files", "pyrovae.lock", {"sha256": sha}),
        ("derived", "config.json", "00"),
        ("derived", "manifest.json", "00"),
        ("derived", "../outside/victim.csv", "00"),
        ("derived", str(outside / "victim.csv"), "00"),
        ("derived", "a\x00b", "00"),
    ]


def test_manifest_names_outside_the_run_are_refused_before_anything_moves(given):
    run, outside = given
    for where, name, value in _names_outside(run, outside):
        m = manifest(run)
        good = (run / MANIFEST).read_bytes()
        m[where][name] = value
        put_manifest(run, m)
        before = snapshot(run.parent)
        with pytest.raises(CheckpointError, match=f"manifest.json is corrupt: its {where}"):
            rundir.recover(run)
        assert snapshot(run.parent) == before, (where, name)  # nothing moved, written, deleted
        (run / MANIFEST).write_bytes(good)
    assert (outside / "victim.csv").read_text() == "not the run's\n"


def test_evaluate_of_a_hostile_manifest_is_one_line_and_touches_nothing(given, capsys):
    run, outside = given
    m = manifest(run)
    m["files"]["metrics.csv"]["pending"] = str(outside / "victim.csv")
    put_manifest(run, m)
    before = snapshot(run.parent)
    _one_line_error(capsys, ["evaluate", str(run), "--num-samples", "2", "--limit", "4"],
                    "pending entry")  # fmt: skip
    assert snapshot(run.parent) == before


def _fifo_guard():
    # a test that would hang on a FIFO fails instead
    def alarm(signum, frame):
        raise TimeoutError("blocked on a FIFO")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)


def test_links_and_fifos_in_a_run_are_refused_never_waited_on(given, capsys):
    from pyrovae.checkpoint import load_run

    run, outside = given
    _fifo_guard()
    try:
        os.mkfifo(outside / "fifo")
        (run / LOCK).symlink_to(outside / "fifo")  # evaluate waited on it forever
        _one_line_error(capsys, ["evaluate", str(run)], "pyrovae.lock is not a lock pyrovae")
        (run / LOCK).unlink()
        os.mkfifo(run / LOCK)
        _one_line_error(capsys, ["evaluate", str(run)], "pyrovae.lock is not a lock pyrovae")
        (run / LOCK).unlink()
        good = (run / MANIFEST).read_bytes()
        (run / MANIFEST).unlink()
        (run / MANIFEST).symlink_to(outside / "fifo")  # was taken for an older run's absence
        _one_line_error(capsys, ["evaluate", str(run)], "manifest.json is a symbolic link")
        (run / MANIFEST).unlink()
        (run / MANIFEST).write_bytes(good)
        (outside / "config.json").write_bytes((run / "config.json").read_bytes())
        (run / "config.json").unlink()
        (run / "config.json").symlink_to(outside / "config.json")  # was followed and used
        with pytest.raises(CheckpointError, match="config.json is a symbolic link"):
            load_run(run)
    finally:
        signal.alarm(0)


def test_a_run_without_manifest_is_refused_until_adopted(given, capsys):
    run, _ = given
    (run / MANIFEST).unlink()
    metrics = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text(metrics.replace(",-4", ",-9", 1))  # was accepted silently
    before = snapshot(run)
    sample = ["sample", str(run), "--out", str(run.parent / "s.png")]
    for argv in (["resume", str(run), "--epochs", "3"], ["evaluate", str(run)], sample,
                 ["plot", str(run)]):  # fmt: skip
        _one_line_error(capsys, argv, f"check them and adopt the run with `pyrovae verify {run} "
                        "--adopt`")  # fmt: skip
        assert snapshot(run) == before, argv  # no manifest written over the files
    _one_line_error(capsys, ["verify", str(run)], "has no manifest.json")
    assert cli.main(["verify", str(run), "--adopt"]) == 0
    assert "adopted" in capsys.readouterr().out
    assert cli.main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert "metrics.csv" in out and "CHANGED" not in out
    assert cli.main(["sample", str(run), "--out", str(run.parent / "s.png"), "-n", "4"]) == 0
    _one_line_error(capsys, ["verify", str(run), "--adopt"], "has a manifest already")


def test_adopt_checks_every_file_first(given, capsys):
    run, _ = given
    (run / MANIFEST).unlink()
    state = (run / "state.safetensors").read_bytes()
    (run / "state.safetensors").write_bytes(state[:-3] + bytes([state[-3] ^ 1]) + state[-2:])
    _one_line_error(capsys, ["verify", str(run), "--adopt"],
                    "state.safetensors is corrupt: its data does not match")  # fmt: skip
    assert not (run / MANIFEST).exists()


def test_verify_says_which_files_are_intact(given, capsys):
    run, _ = given
    (run / "train.json").unlink()
    (run / "metrics.csv").write_text("epoch\n1\n")
    assert cli.main(["verify", str(run)]) == 1
    captured = capsys.readouterr()
    lines = dict(line.split(None, 1) for line in captured.out.splitlines())
    assert lines["model.safetensors"] == "intact" and lines["config.json"] == "intact"
    assert lines["metrics.csv"].startswith("CHANGED") and lines["train.json"] == "MISSING"
    assert "2 file(s)" in captured.err


@pytest.mark.parametrize("content, match", [
    (b"[1, 2]", "should hold a table of settings .config.json.s keys., not a list"),
    (b"[" * 100000 + b"]" * 100000, "not readable|nests too deeply"),
    (b'{"epochs": "\xff\xfe"}', "not UTF-8 text"),
    (b'{"epochs": ' + b"9" * 5000 + b"}", "not readable .Exceeds the limit"),
])  # fmt: skip
def test_bad_config_files_are_one_line_naming_the_file(tmp_path, capsys, content, match):
    path = tmp_path / "c.json"
    path.write_bytes(content)
    err = _one_line_error(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "r")],
                          f"--config {path}: ")  # fmt: skip
    assert re.search(match, err), err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, match", [
    (b"[" * 100000 + b"]" * 100000, "manifest.json is not readable JSON .it nests too deeply"),
    (None, "manifest.json is not readable JSON .Exceeds the limit"),  # a 5000-digit epoch
])  # fmt: skip
def test_hostile_manifest_json_is_one_line_naming_the_file(given, capsys, content, match):
    run, _ = given
    if content is None:
        text = (run / MANIFEST).read_text()
        content = re.sub(r'"epoch": \d+', '"epoch": ' + "9" * 5000, text, count=1).encode()
    (run / MANIFEST).write_bytes(content)
    err = _one_line_error(capsys, ["evaluate", str(run)], str(run / MANIFEST))
    assert re.search(match, err), err


def test_sizes_that_cannot_fit_are_refused_with_their_estimate(tmp_path, capsys, given):
    from pyrovae.footprint import memory_bytes

    err = _one_line_error(capsys, ["train", "--hidden", "1048576", "1048576", "--out",
                                   str(tmp_path / "r")], "--hidden: hidden sizes 1048576 1048576 "
                          "need at least 32.0 TiB to train")  # fmt: skip
    assert "more than this machine's" in err and memory_bytes() < 32 * 2**40
    run, _ = given  # the same sizes in a run's config.json
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "hidden": [1048576, 1048576]}))
    rehash(run, "config.json")
    _one_line_error(capsys, ["sample", str(run), "--out", str(tmp_path / "s.png")],
                    f"{run / 'config.json'}: hidden sizes 1048576 1048576 need")  # fmt: skip


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise TypeError("an internal bug")

    monkeypatch.setitem(cli.COMMANDS, "completion", broken)
    expected = "internal error: TypeError: an internal bug; run again with --debug"
    err = _one_line_error(capsys, ["completion", "bash"], expected, code=cli.EXIT_INTERNAL)
    assert err.startswith("pyrovae completion: ")
    assert cli.main(["completion", "bash", "--debug"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise TypeError("an internal' in err
    monkeypatch.setenv("PYROVAE_DEBUG", "1")
    assert cli.main(["completion", "bash"]) == cli.EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err


def test_sample_out_is_written_atomically(given, monkeypatch, capsys):
    from pyrovae import plots

    run, outside = given
    out = outside / "s.png"
    out.write_bytes(b"the old image")

    def cut_short(images, path, title):
        path.write_bytes(b"half a p")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "plot_images", cut_short)
    _one_line_error(capsys, ["sample", str(run), "--out", str(out)], f"cannot write {out}")
    assert out.read_bytes() == b"the old image" and sorted(outside.iterdir()) == sorted(
        [out, outside / "victim.csv"]
    )


def test_a_dead_rank_is_one_line_naming_it_and_the_resume_command():
    import threading

    from pyrovae.launch import rank_failure

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.kill()
    child.wait()
    done = threading.Event()  # Lightning's observer, as its launcher leaves it running
    observer = threading.Thread(name="child-process-observer", target=done.wait)
    observer._child_processes = [subprocess.Popen([sys.executable, "-c", "pass"]), child]
    observer._child_processes[0].wait()
    observer.start()
    try:
        error = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
                             "closed by peer [127.0.0.1]:5678")  # fmt: skip
        line = rank_failure(error, "runs/x")
    finally:
        done.set()
        observer.join()
    assert line.startswith(f"rank 2 (pid {child.pid}, killed by SIGKILL) ended")
    assert "continue with `pyrovae resume runs/x`" in line and "\n" not in line
    assert rank_failure(ValueError("a bad option"), "runs/x") is None


@pytest.mark.slow
def test_a_killed_lightning_rank_ends_the_run_with_one_line(tmp_path):
    # was a 114-line gloo traceback from rank 0
    cmd = [sys.executable, "-m", "pyrovae", "train", "--out", "run", "--epochs", "400",
           "--devices", "2", "--accelerator", "cpu", "--no-progress", "--hidden", "16",
           "--z-dim", "2", "--train-limit", "400"]  # fmt: skip
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline, child = time.time() + 120, None
    while time.time() < deadline and child is None:
        time.sleep(0.5)
        kids = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "pyrovae"], capture_output=True,
                              text=True)  # fmt: skip
        saved = (tmp_path / "run" / MANIFEST).is_file() and rundir.read_manifest(
            tmp_path / "run")["epoch"] >= 1  # fmt: skip
        child = int(kids.stdout.split()[0]) if kids.stdout.split() and saved else None
    assert child is not None, "rank 1 never started an epoch"
    os.kill(child, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    ours = [line for line in err.splitlines() if line.startswith("pyrovae train:")]
    assert "Traceback" not in err and len(ours) == 1, err
    assert ours[0].startswith(f"pyrovae train: error: rank 1 (pid {child}, killed by SIGKILL)")
    assert "continue with `pyrovae resume run` and the same launch options" in ours[0]
