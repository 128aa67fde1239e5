"""A pair's plates that subsample the data themselves, and what pyrovae asks instead.

Pyro's minibatch idiom, ``pyro.plate("data", N, subsample_size=B)`` (as in Pyro's AIR example),
lets the model draw its own batch of ``B`` indices from the ``N`` datapoints it is given.
pyrovae hands a pair its batches instead (:func:`pyrovae.fit` shuffles them and covers every
datapoint once per epoch; :func:`pyrovae.log_likelihood`, :func:`~pyrovae.elbo` and
:func:`~pyrovae.iwae` score every datapoint once), so a plate over the batch it is given is what
a pair should write. :class:`Subsamples` notes the plates that subsample while a pair runs, and
:func:`subsample_advice` is the one-line message, with the rewrite, both entry points give.
"""

from __future__ import annotations

from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

__all__ = ["Subsamples", "subsample_advice"]


def subsample_advice(name: str, size, subsample_size, caller: str = "fit") -> str:
    """The message for a pair whose plate ``name`` subsamples ``subsample_size`` of ``size``
    datapoints itself: what pyrovae does instead, and the rewrite.

    :param str name: the plate's name.
    :param size: its full size (or a placeholder such as ``"N"``).
    :param subsample_size: its subsample size (or a placeholder such as ``"B"``).
    :param str caller: ``"fit"`` (training) or ``"score"`` (elbo, iwae, log_likelihood).
    """
    does, to = {
        "fit": ("pyrovae.fit hands the pair shuffled batches and covers every datapoint once "
                "per epoch", "fit"),
        "score": ("pyrovae.elbo, iwae and log_likelihood hand the pair batches and score every "
                  "datapoint once", "them"),
    }[caller]  # fmt: skip
    return (
        f"the pair subsamples its plate {name!r} itself (size {size}, subsample_size "
        f"{subsample_size}); {does}: write pyro.plate({name!r}, x.shape[0]) over the batch the "
        f"model is given, and pass batch_size={subsample_size} to {to}"
    )


class Subsamples(Messenger):
    """Notes every plate that subsamples while a pair runs: :attr:`plates` holds
    ``(name, size, subsample_size)`` of each, in the order they were entered (also when Pyro
    then fails, e.g. with "subsample_size does not match len(subsample)")."""

    def __init__(self):
        super().__init__()
        self.plates: list[tuple[str, int, int]] = []

    def _process_message(self, msg) -> None:
        fn = msg.get("fn")
        if msg["type"] == "sample" and isinstance(fn, _Subsample):
            if fn.subsample_size is not None and 0 < fn.subsample_size != fn.size:
                self.plates.append((msg["name"], fn.size, fn.subsample_size))
