"""The training progress bar of :func:`pyrovae.fit`: ``epoch i/N``, the running train ELBO of
the epoch (refreshed within it), the last validation ELBO and the best so far, and the first
step's tracing and capture shown as a phase of its own, so that the time left is estimated from
the steps that follow it.

Where stderr is not a terminal (a log file, a SLURM job's output), the bar's in-place updates
would pile up as ``\r``-separated lines: the training bar prints one line per epoch instead, and
other bars (scoring's) update at most every :data:`LOG_INTERVAL` seconds.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

__all__ = ["TrainingBar", "bar_width", "is_terminal", "LOG_INTERVAL"]

#: Seconds between a bar's updates where stderr is not a terminal.
LOG_INTERVAL = 60.0


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``) is a terminal, where a bar can redraw itself."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed, or not a file
        return False


def bar_width() -> dict:
    """tqdm's size options: the terminal's width as it changes, or 100 columns and 20 lines
    where the terminal reports a size of 0 (``stty cols 0 rows 0``, some containers), on which
    tqdm would draw nothing but a blank line; where stderr is not a terminal, 100 columns and
    an update at most every :data:`LOG_INTERVAL` seconds."""
    if not is_terminal():  # a log: few updates, each a line of its own width
        return {"ncols": 100, "mininterval": LOG_INTERVAL}
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return {"dynamic_ncols": True}  # tqdm's own default
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": size.columns or 100, "nrows": size.lines or 20}


class TrainingBar:
    """A tqdm bar over the steps of epochs ``first..last``.

    :param int first: the first epoch trained by this call (1-based).
    :param int last: the last epoch.
    :param steps: steps per epoch (``None`` for a stream of unknown length).
    :param running: returns the running train ELBO per datapoint of the epoch so far (reads the
        device: called at most every ``refresh`` seconds).
    :param bool enabled: ``False`` draws nothing.
    :param float refresh: seconds between reads of the running ELBO.
    :param stream: where to draw (default ``sys.stderr``); not a terminal: a line per epoch.
    """

    def __init__(self, first: int, last: int, steps: int | None,
                 running: Callable[[], float | None], enabled: bool = True,
                 refresh: float = 0.5, stream=None):  # fmt: skip
        from tqdm.auto import tqdm

        self.first, self.last, self.running, self.refresh = first, last, running, refresh
        self.stream = sys.stderr if stream is None else stream
        self.lines = enabled and not is_terminal(self.stream)  # a line per epoch, no bar
        self.total = None if steps is None else max(last - first + 1, 0) * steps
        self.bar = tqdm(total=self.total, disable=not enabled or self.lines, unit="step",
                        file=self.stream, **bar_width(),
                        desc=f"epoch {first}/{last} (first step: tracing, capturing)")  # fmt: skip
        self.captured = False
        self.epoch, self.last_read = first, 0.0
        self.stats: dict[str, str] = {}

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.captured:
            self.bar.set_description(f"epoch {epoch}/{self.last}", refresh=False)

    def update(self, n: int = 1) -> None:
        """``n`` steps done."""
        if not self.captured:  # the first step ran: time the rest from here
            self.captured = True
            self.bar.reset(total=self.total)
            self.bar.set_description(f"epoch {self.epoch}/{self.last}", refresh=False)
        self.bar.update(n)
        now = time.perf_counter()
        if not self.bar.disable and now - self.last_read > self.refresh:
            self.last_read = now
            value = self.running()
            if value is not None and math.isfinite(value):
                self.stats["train"] = f"{value:.2f}"
                self.bar.set_postfix(self.stats, refresh=False)

    def end_epoch(self, record: dict, best: float | None) -> None:
        """Show the epoch's train ELBO, its validation ELBO and the best validation so far."""
        self.stats["train"] = f"{record['train_elbo']:.2f}"
        if record.get("val_elbo") is not None:
            self.stats["val"] = f"{record['val_elbo']:.2f}"
            self.stats["best"] = f"{best:.2f}"
        self.bar.set_postfix(self.stats)
        if self.lines:
            self._line(record)

    def _line(self, record: dict) -> None:
        # the epoch as one line, for logs
        stats = ", ".join(f"{k} {v}" for k, v in self.stats.items())
        took = f" ({record['seconds']:.1f} s)" if record.get("seconds") is not None else ""
        print(f"epoch {record.get('epoch', self.epoch)}/{self.last}: ELBO {stats}{took}",
              file=self.stream, flush=True)  # fmt: skip

    def close(self) -> None:
        self.bar.close()
