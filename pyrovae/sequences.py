"""Variable-length sequences as data: padded tensors with their lengths, checked up front, and
the per-batch preparation a sequence model reads, which training and scoring apply alike.

A set of sequences of different lengths is one padded tensor ``(N, T, ...)`` (sequence ``i``
in its first ``lengths[i]`` steps, anything after) and the lengths ``(N,)``: tensors of
datapoints that :func:`pyrovae.fit` batches by index and the scoring functions chunk, rows
in the order given. What a pair needs beyond that is built per batch: Pyro's Deep Markov
Model [1] reads each batch as :func:`dmm_mini_batch` makes it (the batch cut to its longest
sequence, a time-reversed copy packed for its RNN, a 0/1 mask, the lengths).

:class:`Sequences` holds both. Its ``batch_preparation`` is part of how the pair reads the
data, so :func:`pyrovae.fit` (through the dataset's ``batch_transform``) and
:func:`pyrovae.elbo`, :func:`pyrovae.iwae` and :func:`pyrovae.log_likelihood` (by default)
apply it to every batch: a pair is scored as it is trained. The rule that keeps this apart
from augmentation: a dataset's ``batch_transform`` alone is for training (dynamic
binarization draws fresh pixels for training only); a ``batch_preparation`` is applied by
training and scoring alike.

The preparation keeps the batch's order (packing with ``enforce_sorted=False`` sorts inside
the ``PackedSequence`` and unsorts on the way out), so every score comes back in the order of
the data given; one that reorders its batch is refused by the scoring functions
(:func:`pyrovae.evaluation.check_order`). A batch holding a ``PackedSequence`` trains eagerly
(the fast path replays tensors only), said once in the ``pyrovae`` log.

References:
  [1] R. G. Krishnan, U. Shalit, D. Sontag, "Structured Inference Networks for Nonlinear State
      Space Models", AAAI 2017; Pyro's ``examples/dmm.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

__all__ = ["Sequences", "dmm_mini_batch", "lengths_mask", "check_lengths"]


def _polyphonic():
    # Pyro's DMM helpers (reverse_sequences, get_mini_batch_mask), loaded on first use: the
    # module imports torchvision through pyro.contrib.examples, which import pyrovae must not.
    import pyro.contrib.examples.polyphonic_data_loader as poly

    return poly


def lengths_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """The mask of padded sequences: ``True`` at step ``t`` of sequence ``i`` when
    ``t < lengths[i]``.

    :param lengths: ``(N,)`` integer lengths.
    :param int steps: T, the padded time axis.
    :returns: a bool tensor ``(N, T)`` on the lengths' device.
    """
    steps_ = torch.arange(int(steps), device=lengths.device)  # (T,)
    return steps_ < lengths.unsqueeze(-1)  # (N, T)


def check_lengths(lengths, rows: int, steps: int, what: str = "lengths") -> torch.Tensor:
    """``lengths`` as a ``(N,)`` int64 tensor, checked: one per sequence, whole numbers from 1
    to the padded time axis ``steps``.

    :param lengths: a tensor or sequence of whole numbers.
    :param int rows: N, the number of sequences.
    :param int steps: T, the length of the padded time axis.
    :param str what: the argument's name in messages.
    :raises ValueError: one line naming the first bad sequence and what to do.
    """
    lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"{what} must be whole numbers (an integer tensor), got dtype "
                         f"{lengths.dtype}; pass {what}.long() if they are whole")  # fmt: skip
    if lengths.dim() != 1 or len(lengths) != rows:
        raise ValueError(f"{what} must have one entry per sequence ({rows} padded): shape "
                         f"({rows},), got {tuple(lengths.shape)}")  # fmt: skip
    lengths = lengths.long()
    short = (lengths < 1).nonzero().flatten()
    if len(short):
        i = int(short[0])
        raise ValueError(f"{what}: sequence {i} has length {int(lengths[i])} ({len(short)} of "
                         f"{rows} have length < 1); every sequence needs at least one step: drop "
                         "the empty ones")  # fmt: skip
    long = (lengths > steps).nonzero().flatten()
    if len(long):
        i = int(long[0])
        raise ValueError(f"{what}: sequence {i} has length {int(lengths[i])}, longer than the "
                         f"padded time axis (T={steps}; {len(long)} of {rows} are longer); pad "
                         "the sequences to the longest length")  # fmt: skip
    return lengths


def _as_mask(mask, shape: tuple[int, int]) -> torch.Tensor:
    # A mask as a tensor of the padded sequences' (N, T), holding 0/1 or bools.
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have the shape (N, T) = {shape} of the padded sequences, "
                         f"got {tuple(mask.shape)}")  # fmt: skip
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold 0/1 (or True/False) values")
    return mask.bool()


def _check_mask(mask: torch.Tensor, lengths: torch.Tensor) -> None:
    # A mask must be the lengths' (1 on the first lengths[i] steps of row i, 0 after).
    wrong = (mask != lengths_mask(lengths.to(mask.device), mask.shape[1])).any(-1)  # (N,)
    if bool(wrong.any()):
        i = int(wrong.nonzero()[0])
        raise ValueError(f"the mask disagrees with the lengths at sequence {i} (its mask has "
                         f"{int(mask[i].sum())} steps set, its length is {int(lengths[i])}; "
                         f"{int(wrong.sum())} of {len(mask)} rows disagree): a mask is 1 on a "
                         "sequence's first `length` steps, 0 after")  # fmt: skip


def dmm_mini_batch(batch) -> tuple[torch.Tensor, PackedSequence, torch.Tensor, torch.Tensor]:
    """A batch of padded sequences as Pyro's Deep Markov Model reads it: Pyro's
    ``polyphonic_data_loader.get_mini_batch`` without its sort, so rows stay in the batch's
    order (Pyro's own ``reverse_sequences`` and ``get_mini_batch_mask`` build the parts).

    :param batch: ``(padded, lengths, ...)``: sequences ``(B, T, F)`` and their lengths
        ``(B,)``; items after the lengths are ignored.
    :returns: ``(mini_batch, mini_batch_reversed, mini_batch_mask, lengths)``: the sequences
        cut to the batch's longest ``(B, T_max, F)``; each reversed in time within its length
        and packed (``enforce_sorted=False``: the RNN's outputs come back in the batch's order
        through ``pad_packed_sequence``, as Pyro's ``pad_and_reverse`` calls it); the float
        0/1 mask ``(B, T_max)``; the lengths ``(B,)``. All on the sequences' device.
    :raises ValueError: for lengths that do not fit the batch (:func:`check_lengths`; a
        :class:`Sequences` checks them all up front).
    """
    poly = _polyphonic()
    padded = batch[0]  # (B, T, F)
    lengths = check_lengths(batch[1], len(padded), padded.shape[1], "a batch's lengths")  # (B,)
    t_max = int(lengths.max())
    mini_batch = padded[:, :t_max]  # (B, T_max, F)
    reversed_ = poly.reverse_sequences(mini_batch, lengths)  # (B, T_max, F)
    mask = poly.get_mini_batch_mask(mini_batch, lengths).to(padded.device)  # (B, T_max)
    packed = pack_padded_sequence(reversed_, lengths.cpu(), batch_first=True,
                                  enforce_sorted=False)  # fmt: skip
    return mini_batch, packed, mask, lengths


class Sequences(torch.utils.data.Dataset):
    """Variable-length sequences, padded, with their lengths: checked up front, batched by
    index, and read by the pair through ``batch_preparation`` in training and scoring alike.

    Give ``lengths``, or a ``mask`` to take them from, or both (they must agree)::

        data = pyrovae.sequences.Sequences(padded, lengths)  # prepared by dmm_mini_batch
        pyrovae.fit(dmm.model, dmm.guide, data, epochs=5)
        log_px = pyrovae.log_likelihood(dmm.model, dmm.guide, data)  # (N,), in data's order

    :param padded: ``(N, T, ...)`` sequences, sequence ``i`` in its first ``lengths[i]`` steps.
    :param lengths: ``(N,)`` whole numbers from 1 to T (default: from ``mask``).
    :param mask: ``(N, T)`` 0/1 or bool, 1 on each sequence's steps (checked against the
        lengths; the preparation rebuilds it per batch).
    :param prepare: the per-batch preparation, called with ``(padded, lengths)`` of a batch
        (default :func:`dmm_mini_batch`; ``None``: the pair takes ``(padded, lengths)`` as
        they are).
    :raises ValueError: one line for a shape, length or mask that does not fit.
    """

    def __init__(self, padded: torch.Tensor, lengths=None, *, mask=None,
                 prepare: Callable | None = dmm_mini_batch):  # fmt: skip
        if not isinstance(padded, torch.Tensor) or padded.dim() < 2:
            shape = tuple(padded.shape) if isinstance(padded, torch.Tensor) else type(padded)
            raise ValueError(f"padded sequences must be a tensor (N, T, ...) with a time axis, "
                             f"got {shape}")  # fmt: skip
        rows, steps = padded.shape[:2]
        if lengths is None and mask is None:
            raise ValueError("give the sequences' lengths (N,) or their mask (N, T)")
        mask = _as_mask(mask, (rows, steps)) if mask is not None else None  # (N, T)
        what = "lengths" if lengths is not None else "the mask's lengths"
        if lengths is None:
            lengths = mask.sum(-1)  # (N,): the steps set in each row
        self.padded = padded  # (N, T, ...)
        self.lengths = check_lengths(lengths, rows, steps, what).to(padded.device)  # (N,)
        if mask is not None:
            _check_mask(mask, self.lengths)
        self.batch_preparation = prepare

    @property
    def batch_transform(self) -> Callable | None:
        """What :func:`pyrovae.fit` applies to each training batch: the preparation."""
        return self.batch_preparation

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors of datapoints: ``(padded (N, T, ...), lengths (N,))``."""
        return self.padded, self.lengths

    @property
    def steps(self) -> int:
        """Σ lengths: the number of real (unpadded) time steps, for scores per step."""
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        return self.padded[i], self.lengths[i]

    def __repr__(self) -> str:
        return (f"Sequences(n={len(self)}, T={self.padded.shape[1]}, "
                f"features={tuple(self.padded.shape[2:])}, steps={self.steps})")  # fmt: skip
