"""What a VAE's ELBO is made of, per datapoint, and how much of its latent space it uses.

The ELBO splits into the two terms of the variational view,

    ELBO(x) = E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)),

reconstruction and rate. :func:`elbo_parts` estimates both from one draw of the guide per
datapoint, with the KL of a latent site in closed form where torch has it (a Gaussian guide
against a standard normal prior) and as log q(z|x) − log p(z) at the draw otherwise (mixture,
VampPrior and flow priors, flow guides). :func:`active_units` counts the latent coordinates the
model uses, by Burda et al.'s criterion [1]: Cov_x(E_q[z_u | x]) > 0.01.

References:

[1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

__all__ = ["elbo_parts", "active_units", "epoch_metrics", "ACTIVE_THRESHOLD", "METRICS_IMAGES"]

#: Burda et al.'s threshold on the variance (over datapoints) of a unit's posterior mean.
ACTIVE_THRESHOLD = 0.01
#: Validation images (spread over the split) that a run's per-epoch metrics look at.
METRICS_IMAGES = 2000


def _per_datapoint(t: torch.Tensor, n: int) -> torch.Tensor:
    # a site's log-density (N, ...) summed over everything but the datapoints: (N,)
    return t.reshape(n, -1).sum(-1) if t.dim() else t.expand(n)


def _traces(model: Callable, guide: Callable, x: torch.Tensor):
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return model_trace, guide_trace


def _site_kl(q_site, p_site, n: int) -> torch.Tensor:
    # KL(q ‖ p) of one latent site per datapoint: closed form if torch has it, else at the draw
    q, p, z = q_site["fn"], p_site["fn"], q_site["value"]
    try:
        kl = kl_divergence(q, p)
    except NotImplementedError:
        kl = q.log_prob(z) - p.log_prob(z)
    return _per_datapoint(kl, n)


@torch.no_grad()
def elbo_parts(model: Callable, guide: Callable, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """E_q[log p(x|z)] and KL(q(z|x) ‖ p(z)) of each datapoint, from one draw of the guide.

    Densities are unscaled: a KL weight β in the model (warm-up) does not change them, so
    ``reconstruction − kl`` is the ELBO of each datapoint whatever β was during training.

    :param model: a Pyro model ``model(x)`` with its datapoints in one plate along the first
        dimension of every site.
    :param guide: the matching guide.
    :param x: a batch ``(N, ...)``.
    :returns: ``{"reconstruction": (N,), "kl": (N,)}`` in nats.
    """
    n = x.shape[0]
    model_trace, guide_trace = _traces(model, guide, x)
    rec = torch.zeros(n, device=x.device)
    kl = torch.zeros(n, device=x.device)
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and site["is_observed"]:
            rec = rec + _per_datapoint(site["fn"].log_prob(site["value"]), n)
        elif _is_latent(site) and name in guide_trace.nodes:
            kl = kl + _site_kl(guide_trace.nodes[name], site, n)
    return {"reconstruction": rec, "kl": kl}


def _posterior_means(guide: Callable, x: torch.Tensor, draws: int) -> torch.Tensor:
    # E_q[z | x] of every latent coordinate: (N, units). One latent site whose distribution has
    # a mean: that mean. Otherwise (flows; an HVAE's lower layer, whose q depends on the draw
    # of the upper one) the average over `draws` guide runs of each site's mean or draw.
    n, total = x.shape[0], None
    for i in range(draws):
        trace = poutine.trace(guide).get_trace(x)
        latents = [s for s in trace.nodes.values() if _is_latent(s)]
        flat = torch.cat([_mean_or_draw(s).reshape(n, -1) for s in latents], -1)  # (N, units)
        if i == 0 and len(latents) == 1 and _has_mean(latents[0]):
            return flat
        total = flat if total is None else total + flat
    return total / draws


def _is_latent(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def _has_mean(site) -> bool:
    try:
        return site["fn"].mean is not None
    except NotImplementedError:
        return False


def _mean_or_draw(site) -> torch.Tensor:
    return site["fn"].mean if _has_mean(site) else site["value"]


@torch.no_grad()
def active_units(guide: Callable, x: torch.Tensor, threshold: float = ACTIVE_THRESHOLD,
                 draws: int = 10) -> int:  # fmt: skip
    """The number of active latent units [1]: coordinates u whose posterior mean E_q[z_u | x]
    varies over the datapoints, Cov_x(E_q[z_u | x]) > ``threshold``. A unit the model ignores
    has q(z_u|x) ≈ p(z_u) for every x, so its mean does not move.

    :param guide: a guide ``guide(x)`` with its datapoints along the first dimension.
    :param x: a batch ``(N, ...)``, N ≥ 2.
    :param float threshold: 0.01 in [1].
    :param int draws: guide draws averaged for sites whose distribution has no mean (flows) or
        that depend on an earlier draw (an HVAE's lower layer).
    """
    if x.shape[0] < 2:
        raise ValueError(f"active_units needs at least 2 datapoints, got {x.shape[0]}")
    means = _posterior_means(guide, x, draws)  # (N, units)
    return int((means.var(dim=0) > threshold).sum())


def epoch_metrics(model: Callable, guide: Callable, x: torch.Tensor) -> dict[str, float]:
    """The per-epoch columns of a run's metrics.csv beside the ELBO: ``val_reconstruction``
    (E_q[log p(x|z)]) and ``val_kl`` (KL(q(z|x) ‖ p(z))), nats per datapoint averaged over
    ``x``, and ``active_units`` (``None`` for a single image: a variance needs two).

    :param x: validation images, e.g. :data:`METRICS_IMAGES` spread over the split.
    """
    parts = elbo_parts(model, guide, x)
    return {
        "val_reconstruction": float(parts["reconstruction"].mean()),
        "val_kl": float(parts["kl"].mean()),
        "active_units": active_units(guide, x) if x.shape[0] >= 2 else None,
    }
