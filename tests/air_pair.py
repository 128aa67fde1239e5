"""A small Attend-Infer-Repeat pair [1], written the way Pyro's ``examples/air`` writes it, for
tests/test_air.py: a canvas of 20×20 pixels holding 0–2 squares, explained in up to two steps.
Each step samples a Bernoulli ``z_pres`` (not reparameterizable: score-function gradients,
with a neural or decaying-average baseline), a ``z_where`` (scale, x, y) and a ``z_what`` that
a decoder turns into a 6×6 window, which a spatial transformer (``F.affine_grid`` and
``F.grid_sample``) places on the canvas. Once a step says "absent" the later steps are masked.

References:
  [1] S. M. A. Eslami et al., "Attend, Infer, Repeat: Fast Scene Understanding with Generative
      Models", NeurIPS 2016.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

S, W, T = 20, 6, 2  # canvas side, window side, steps
SIDE = 5  # a square's side in pixels


def canvases(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` canvases ``(n, S, S)`` with 0, 1 or 2 bright squares each, and their counts
    ``(n,)``; seeded."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 3, (n,), generator=g)  # (n,)
    x = torch.zeros(n, S, S)
    for i, count in enumerate(counts.tolist()):
        for _ in range(count):
            r, c = torch.randint(0, S - SIDE + 1, (2,), generator=g).tolist()
            x[i, r : r + SIDE, c : c + SIDE] = 1.0
    return x.clamp(max=1.0), counts


def _theta(z_where: torch.Tensor) -> torch.Tensor:
    # (n, 3) [s, x, y] -> (n, 2, 3) [[s, 0, x], [0, s, y]], as Pyro's AIR expands it
    s, xy = z_where[:, :1], z_where[:, 1:]  # (n, 1), (n, 2)
    zero = torch.zeros_like(s)
    return torch.stack([torch.cat([s, zero, xy[:, :1]], 1), torch.cat([zero, s, xy[:, 1:]], 1)], 1)


def window_to_image(z_where: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Windows ``(n, W*W)`` placed on canvases ``(n, S, S)`` where ``z_where`` says."""
    n = windows.shape[0]
    grid = F.affine_grid(_theta(z_where), [n, 1, S, S], align_corners=False)  # (n, S, S, 2)
    out = F.grid_sample(windows.view(n, 1, W, W), grid, align_corners=False)  # (n, 1, S, S)
    return out.view(n, S, S)


def image_to_window(z_where: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The windows ``(n, W*W)`` that ``z_where`` points at on canvases ``(n, S, S)``."""
    n = images.shape[0]
    s = z_where[:, :1]  # (n, 1)
    inverse = torch.cat([torch.ones_like(s), -z_where[:, 1:]], 1) / s  # [1/s, -x/s, -y/s]
    grid = F.affine_grid(_theta(inverse), [n, 1, W, W], align_corners=False)  # (n, W, W, 2)
    return F.grid_sample(images.view(n, 1, S, S), grid, align_corners=False).view(n, -1)


class Baseline(nn.Module):
    """A neural baseline for ``z_pres``: one number per canvas from the canvas and the previous
    step's ``z_pres`` (the input's last column), zero once an earlier step said "absent" (as
    Pyro's AIR masks its baseline)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(S * S + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs).squeeze(-1) * inputs[:, -1]  # (n,)


class SmallAIR(nn.Module):
    """The pair: ``model(x)`` and ``guide(x)`` on canvases ``x`` of shape ``(n, S, S)``.

    :param str baseline: ``"neural"`` (``nn_baseline``), ``"decaying"``
        (``use_decaying_avg_baseline``) or ``"none"``.
    :param subsample_size: the guide subsamples its plate itself, as Pyro's AIR example does
        (``pyro.plate("data", N, subsample_size=batch_size)``; the model's plate follows it).
    """

    def __init__(self, baseline: str = "neural", hidden: int = 32, z_what: int = 4,
                 subsample_size: int | None = None):  # fmt: skip
        super().__init__()
        self.kind, self.z_what, self.subsample_size = baseline, z_what, subsample_size
        self.predict = nn.Sequential(nn.Linear(S * S + 4, hidden), nn.ReLU(), nn.Linear(hidden, 7))
        self.encode = nn.Sequential(
            nn.Linear(W * W, hidden), nn.ReLU(), nn.Linear(hidden, 2 * z_what)
        )
        self.decode = nn.Sequential(nn.Linear(z_what, hidden), nn.ReLU(), nn.Linear(hidden, W * W))
        self.baseline = Baseline()
        self.register_buffer("where_loc", torch.tensor([S / SIDE, 0.0, 0.0]))
        self.register_buffer("where_scale", torch.tensor([0.2, 1.0, 1.0]))

    def model(self, x):
        pyro.module("air", self)
        with pyro.plate("data", x.shape[0]) as ix:
            x = x[ix]
            n = x.shape[0]
            canvas, z_pres = x.new_zeros(n, S, S), x.new_ones(n, 1)
            for t in range(T):
                z_pres = pyro.sample(f"z_pres_{t}", dist.Bernoulli(0.5 * z_pres).to_event(1))
                on = z_pres.squeeze(-1).bool()  # (n,): later sites count only while present
                z_where = pyro.sample(f"z_where_{t}", dist.Normal(
                    self.where_loc.expand(n, 3), self.where_scale.expand(n, 3)
                ).to_event(1).mask(on))  # fmt: skip
                z_what = pyro.sample(f"z_what_{t}", dist.Normal(
                    x.new_zeros(n, self.z_what), 1.0).to_event(1).mask(on))  # fmt: skip
                window = torch.sigmoid(self.decode(z_what))  # (n, W*W)
                canvas = canvas + window_to_image(z_where, window) * z_pres.view(n, 1, 1)
            pyro.sample("obs", dist.Normal(canvas.view(n, -1), 0.3).to_event(1),
                        obs=x.view(n, -1))  # fmt: skip

    def guide(self, x):
        pyro.module("air", self)
        with pyro.plate("data", x.shape[0], subsample_size=self.subsample_size) as ix:
            x = x[ix]
            n = x.shape[0]
            flat = x.reshape(n, -1)  # (n, S*S)
            z_pres, z_where = x.new_ones(n, 1), self.where_loc.expand(n, 3)
            for t in range(T):
                out = self.predict(torch.cat([flat, z_where, z_pres], 1))  # (n, 7)
                z_pres = pyro.sample(
                    f"z_pres_{t}",
                    dist.Bernoulli(torch.sigmoid(out[:, :1]) * z_pres).to_event(1),
                    infer={"baseline": self._baseline(flat, z_pres)},
                )
                on = z_pres.squeeze(-1).bool()  # (n,)
                loc = self.where_loc + out[:, 1:4]  # (n, 3)
                scale = F.softplus(out[:, 4:]) * self.where_scale  # (n, 3)
                z_where = pyro.sample(f"z_where_{t}", dist.Normal(loc, scale).to_event(1).mask(on))
                code = self.encode(image_to_window(z_where, x))  # (n, 2*z_what)
                what_scale = F.softplus(code[:, self.z_what :])
                pyro.sample(f"z_what_{t}", dist.Normal(code[:, : self.z_what], what_scale)
                            .to_event(1).mask(on))  # fmt: skip
        return z_pres

    def _baseline(self, flat: torch.Tensor, z_pres: torch.Tensor) -> dict:
        if self.kind == "neural":
            return {"nn_baseline": self.baseline,
                    "nn_baseline_input": torch.cat([flat, z_pres.detach()], 1)}  # fmt: skip
        if self.kind == "decaying":
            return {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}
        return {}

    def count(self, x: torch.Tensor) -> torch.Tensor:
        """The number of objects the guide finds on each canvas, ``(n,)``: the sum of its
        ``z_pres`` draws, as Pyro's AIR example counts them."""
        with torch.no_grad():
            trace = pyro.poutine.trace(self.guide).get_trace(x)
        return sum(trace.nodes[f"z_pres_{t}"]["value"].squeeze(-1) for t in range(T))
