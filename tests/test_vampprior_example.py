"""examples/vampprior.py end to end on a tiny budget (the bundled digits, two rows), run from an
unrelated folder: it trains through the CLI, evaluates, and writes the table, JSON and plot."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vampprior.py"


def _module():
    spec = importlib.util.spec_from_file_location("vampprior_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_budget_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any folder
    example = _module()
    argv = ["--dataset", "digits", "--runs", "standard", "vampprior", "hvae-vampprior",
            "--epochs", "3",
            "--warmup", "2", "--patience", "2", "--hidden", "32", "32", "--z-dim", "4",
            "--components", "16", "--num-samples", "30", "--test-limit", "60", "--out", "vp",
            "--curve-every", "1", "--curve-samples", "5", "--curve-limit", "30"]  # fmt: skip
    assert example.main(argv) == 0
    out = tmp_path / "vp"
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["standard", "vampprior", "hvae-vampprior"]
    standard = np.loadtxt(out / "standard" / "log_px.csv", delimiter=",", usecols=0)  # per image
    for r in rows:
        assert 0 < r["test_nll"] < 64 * 0.7 and r["num_samples"] == 30 and r["n_test"] == 60
        assert 0 < r["test_nll_se"] < r["test_nll"]
        if r["name"] != "standard":  # paired: image by image against the standard prior
            d = standard - np.loadtxt(out / r["name"] / "log_px.csv", delimiter=",", usecols=0)
            assert r["vs_baseline"] == pytest.approx(d.mean())
            assert r["vs_baseline_se"] == pytest.approx(d.std(ddof=1) / 60**0.5)
        assert [e for e, _ in r["curve"]] == [1, 2, 3] and r["epochs_run"] == 3
        assert r["train_seconds"] > 0 and r["reference"] == {}  # no paper values for digits
    table = (out / "results.md").read_text()
    assert "| VAE + VampPrior |" in table and "| HVAE (L=2) + VampPrior |" in table
    vamp = next(r for r in rows if r["name"] == "vampprior")
    assert (
        f"| {vamp['test_nll']:.2f} ± {vamp['test_nll_se']:.2f} | {vamp['vs_baseline']:+.2f} ±"
        in table
    )
    assert (out / "nll_curves.png").read_bytes()[:4] == b"\x89PNG"
    # --resume finishes what a stopped call left: a trained row is only scored, a scored row is
    # reused
    (out / "hvae-vampprior" / "eval.json").unlink()
    scored = (out / "standard" / "eval.json").stat().st_mtime_ns
    assert example.main([*argv, "--resume"]) == 0
    again = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    assert (out / "standard" / "eval.json").stat().st_mtime_ns == scored
    assert again["standard"] == rows[0] and again["vampprior"] == rows[1]
    assert again["hvae-vampprior"]["epochs_run"] == 3 and (out / "hvae-vampprior" / "eval.json")
    # ... and with more --epochs, a row interrupted after its last saved epoch continues from
    # it, and rows that ran out of epochs continue to the new budget and are scored again
    # (a run cut off after its last epoch's commit, before its summary: stage "finishing")
    from pyrovae import rundir

    manifest = rundir.read_manifest(out / "vampprior")
    del manifest["files"]["train.json"]
    manifest["stage"] = "finishing"
    rundir.write_text(out / "vampprior" / "manifest.json", json.dumps(manifest))
    (out / "vampprior" / "train.json").unlink()
    assert example.main([*argv, "--resume", "--epochs", "4"]) == 0
    again = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    assert (out / "standard" / "eval.json").stat().st_mtime_ns != scored
    for before in rows:
        r = again[before["name"]]
        assert r["epochs_run"] == 4 and [e for e, _ in r["curve"]] == [1, 2, 3, 4]
        assert r["curve"][:3] == before["curve"]
    config = json.loads((out / "vampprior" / "config.json").read_text())
    assert config["gated"] and config["warmup"] == 2 and config["prior"] == "vampprior"
    # the argument lists are the CLI's: the paper recipe by default
    args = example.build_parser().parse_args(["--data-dir", "/data"])
    argv = example.train_argv(args, "hvae-vampprior", Path("r"))
    for flag, value in [("--lr", "0.0005"), ("--batch-size", "100"), ("--warmup", "100"),
                        ("--patience", "50"), ("--epochs", "2000"), ("--components", "500"),
                        ("--z-dim", "40"), ("--model", "hvae")]:  # fmt: skip
        assert argv[argv.index(flag) + 1] == value
    assert argv[argv.index("--hidden") + 1 : argv.index("--hidden") + 3] == ["300", "300"]
    assert example.evaluate_argv(args, Path("r"))[3] == "5000"


def test_a_run_shorter_than_curve_every_still_scores_its_last_epoch(tmp_path):
    # the smoke command's 3 epochs with the default --curve-every 10 drew an empty curve
    vp = _module()
    args = vp.build_parser().parse_args(["--epochs", "3"])
    argv = vp.train_argv(args, "standard", tmp_path / "run")
    assert argv[argv.index("--test-every") + 1] == "3"
    args = vp.build_parser().parse_args([])
    argv = vp.train_argv(args, "standard", tmp_path / "run")
    assert argv[argv.index("--test-every") + 1] == str(args.curve_every)
