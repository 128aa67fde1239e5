"""What a model of a config needs in memory to train, estimated from its sizes alone, so that a
config that cannot fit (``--hidden 1048576 1048576``: 4 TB) is refused before anything is
allocated, with its estimate.

The estimate is a lower bound: the dense layers between consecutive hidden sizes, once in the
encoder and once in the decoder (twice as many weights with ``--gated``), plus the first and
last layers when the data's shape is known; four copies of each weight are held in training
(the weight, its gradient, Adam's two moments) at 4 bytes each. Activations, the data and the
convolutional nets' weights come on top.
"""

from __future__ import annotations

import itertools
import math
import os

__all__ = ["training_bytes", "memory_bytes", "check_fits"]

#: copies of each parameter while training with Adam: the weight, its gradient, two moments
_COPIES = 4
_FLOAT_BYTES = 4


def training_bytes(config) -> int:
    """A lower bound on the bytes that training ``config``'s model holds (see the module).

    :param config: a :class:`~pyrovae.config.Config` (its ``hidden``, ``gated``, ``z_dim``
        and, if known, ``x_shape``).
    """
    hidden = [int(h) for h in config.hidden]
    pairs = sum(a * b for a, b in itertools.pairwise(hidden))
    ends = hidden[-1] * int(config.z_dim) * 3  # encoder's loc and scale, decoder's first layer
    if config.x_shape is not None:
        ends += 2 * math.prod(config.x_shape) * hidden[0]  # the input and output layers
    weights = (2 * pairs + ends) * (2 if config.gated else 1)
    return weights * _COPIES * _FLOAT_BYTES


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (``None`` where it cannot be told)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits(config, where: str = "--hidden") -> None:
    """Refuse ``config`` if training its model needs more memory than this machine has.

    :param where: what to name in the message (the option, or the file the config came from).
    :raises ValueError: with the estimate and the memory there is.
    """
    need, have = training_bytes(config), memory_bytes()
    if have is not None and need > have:
        sizes = " ".join(str(h) for h in config.hidden)
        raise ValueError(
            f"{where}: hidden sizes {sizes} need at least {_size(need)} to train (weights, "
            f"gradients and Adam's moments), more than this machine's {_size(have)} of memory; "
            "choose smaller sizes"
        )
