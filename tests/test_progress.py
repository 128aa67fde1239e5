import os

import pytest

import pyrovae
from pyrovae import progress
from pyrovae.progress import TrainingBar, bar_width


@pytest.fixture
def terminal(monkeypatch):
    # stderr as a terminal (under pytest it is not), where the bar redraws itself
    monkeypatch.setattr(progress, "is_terminal", lambda stream=None: True)


def test_fit_bar_shows_epochs_running_train_validation_and_best(capsys, terminal):
    train = pyrovae.data.load("digits", "train", binarize="threshold")
    valid = pyrovae.data.load("digits", "valid", binarize="threshold")
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=train.x_shape, hidden=(16,), z_dim=2))
    pyrovae.fit(vae.model, vae.guide, train, val_data=valid, epochs=2, batch_size=128)
    err = capsys.readouterr().err
    assert "epoch 1/2 (first step: tracing, capturing)" in err  # the capture is its own phase
    assert "epoch 2/2" in err and "val=" in err and "best=" in err and "train=" in err


def test_bar_shows_a_validation_elbo_the_callback_records(capsys, terminal):
    # the CLI's early stopping scores validation in fit's callback: the bar must show that score
    train = pyrovae.data.load("digits", "train", binarize="threshold")
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=train.x_shape, hidden=(16,), z_dim=2))
    scores = iter([-40.25, -39.5])

    def callback(record):
        record["val_elbo"] = next(scores)

    pyrovae.fit(vae.model, vae.guide, train, epochs=2, batch_size=256, callback=callback)
    err = capsys.readouterr().err
    assert "val=-40.25" in err and "val=-39.50" in err and "best=-39.50" in err


def test_bar_reads_the_running_elbo_within_an_epoch_and_times_after_the_first_step(
    capsys, terminal
):
    values = iter([-50.0, -40.0, float("nan"), -30.0])
    bar = TrainingBar(1, 3, steps=4, running=lambda: next(values), refresh=0.0)
    bar.start_epoch(1)
    assert bar.bar.n == 0 and not bar.captured
    bar.update()  # the first step (traced and captured) is not timed: the bar restarts
    assert bar.captured and bar.bar.n == 1 and bar.stats["train"] == "-50.00"
    bar.update(2)
    bar.update()  # a non-finite running value leaves the last one shown
    assert bar.stats["train"] == "-40.00"
    bar.end_epoch({"train_elbo": -35.0, "val_elbo": -36.5}, best=-36.5)
    bar.start_epoch(2)
    bar.close()
    err = capsys.readouterr().err
    assert "epoch 2/3" in err and "val=-36.50" in err and "best=-36.50" in err


@pytest.mark.parametrize(
    "size, options",
    [
        ((0, 0), {"ncols": 100, "nrows": 20}),  # `stty cols 0 rows 0`: tqdm would draw nothing
        ((120, 0), {"ncols": 120, "nrows": 20}),
        ((80, 24), {"dynamic_ncols": True}),
    ],
)
def test_bar_width_for_terminals_that_report_no_size(monkeypatch, terminal, size, options):
    monkeypatch.setattr(progress.os, "get_terminal_size", lambda fd: os.terminal_size(size))
    assert bar_width() == options


def test_a_log_gets_a_line_per_epoch_not_carriage_returns(tmp_path):
    # stderr redirected to a file (SLURM, nohup): one line per epoch, no in-place redraws
    log = tmp_path / "train.log"
    with log.open("w") as stream:
        assert not progress.is_terminal(stream)
        bar = TrainingBar(1, 3, steps=5, running=lambda: -1.0, refresh=0.0, stream=stream)
        for epoch in (1, 2, 3):
            bar.start_epoch(epoch)
            bar.update(5)
            bar.end_epoch({"epoch": epoch, "train_elbo": -40.0 + epoch, "val_elbo": -41.0,
                           "seconds": 0.5}, best=-41.0)  # fmt: skip
        bar.close()
    text = log.read_text()
    assert "\r" not in text
    assert text.splitlines() == [
        f"epoch {e}/3: ELBO train {-40 + e:.2f}, val -41.00, best -41.00 (0.5 s)" for e in (1, 2, 3)
    ]


def test_fit_writes_lines_to_a_non_terminal_stderr(capsys):
    train = pyrovae.data.load("digits", "train", binarize="threshold")
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=train.x_shape, hidden=(16,), z_dim=2))
    pyrovae.fit(vae.model, vae.guide, train, epochs=2, batch_size=256)
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 2, err
    assert err.startswith("epoch 1/2: ELBO train ")


def test_scoring_bar_updates_rarely_in_a_log():
    assert bar_width() == {"ncols": 100, "mininterval": progress.LOG_INTERVAL}
