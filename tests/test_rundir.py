"""Run directories under faults: a kill at every write of a run, a full disk, two writers, a
stale lock, corrupt and ill-typed files; each ends in an exact resume or a one-line error."""

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyrovae import cli, rundir
from pyrovae.errors import WriteError
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
    if name == "config.json":  # a reader that does not check the manifest reads it typed
        _one_line_error(capsys, ["sample", str(run), "--out", str(tmp_path / "s.png")], match)


def test_tensor_bit_flips_and_non_finite_weights_are_refused(tmp_path, capsys):
    run = _trained(tmp_path)
    for name in (WEIGHTS, "last.safetensors", "state.safetensors"):
        data = bytearray((run / name).read_bytes())
        good = bytes(data)
        data[-3] ^= 0x10  # one bit of the last tensor
        (run / name).write_bytes(bytes(data))
        argv = ["resume", str(run), "--epochs", "3"] if name != WEIGHTS else ["evaluate", str(run)]
        _one_line_error(capsys, argv, f"{name} is corrupt: its data does not match the checksum")
        (run / name).write_bytes(good)
    from pyrovae.checkpoint import load_run, save_weights

    vae, _ = load_run(run)
    with torch.no_grad():
        next(vae.parameters())[0].fill_(float("nan"))
    save_weights(vae, run / WEIGHTS)
    _one_line_error(capsys, ["sample", str(run), "--out", str(tmp_path / "s.png")],
                    f"{run / WEIGHTS} holds non-finite values")  # fmt: skip


def test_ill_typed_state_metadata_is_one_line(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

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
        save_file(bad_tensors, path, metadata={"state": json.dumps(bad_meta)})
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
