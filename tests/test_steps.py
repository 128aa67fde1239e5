"""The step engines (pyrovae.steps) and the non-finite guard (pyrovae.nonfinite).

The CUDA graph engine's bookkeeping (warm-up queue, steps numbered like the epoch's, the graph's
sums and first bad step joining the epoch's, a last partial batch stepped off the graph) is
tested on the CPU here: :class:`_CpuGraph` runs :class:`~pyrovae.graphs.CudaGraphStep`'s own
step body at every replay instead of recording it. The recording itself is tested by the CUDA
tests in test_training.py.
"""

import contextlib

import pyro
import pytest
import torch

import pyrovae
from pyrovae import steps
from pyrovae.errors import NonFiniteLossError
from pyrovae.graphs import CudaGraphStep
from pyrovae.nonfinite import NonFiniteGuard


class _CpuGraph(CudaGraphStep):
    # The graph's step body, run eagerly on the CPU at each "replay".
    def _run(self, idx) -> None:
        self.index.copy_(idx)
        self.optimizer.zero_grad(set_to_none=True)  # a recorded step writes fresh gradients
        self._body()

    def warm_up(self, indices, record=True) -> None:
        for idx in indices:
            self._run(idx)
        if record:
            self._graph = "recorded"

    def __call__(self, idx) -> None:
        self._run(idx)


@contextlib.contextmanager
def _cpu_graph(monkeypatch):
    # Inside: fit's engine is steps.CudaGraph over a _CpuGraph. Yields the engines built.
    real, built = steps.build, []

    def build(terms, batches, modules, free, **kwargs):
        engine = real(terms, batches, modules, free, **kwargs)
        assert type(engine) is steps.Captured
        t = terms[0]
        graph = _CpuGraph(t.step_loss, engine.optimizer, t.tensors, t.batch_size, t.transform)
        built.append(steps.CudaGraph(terms, engine.optimizer, engine.guard, graph))
        return built[-1]

    with monkeypatch.context() as m:
        m.setattr(steps, "build", build)
        yield built


def _train(epochs=3, batch_transform=None):
    # 300 digits, batch 64: four full batches and one of 44 per epoch.
    pyro.clear_param_store()
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(32,), z_dim=4, seed=0))
    data = pyrovae.data.load("digits", "train", binarize="threshold").images[:300]
    history = pyrovae.fit(vae.model, vae.guide, data, epochs=epochs, batch_size=64, seed=1,
                          progress=False, batch_transform=batch_transform)  # fmt: skip
    return vae, history


def test_cuda_graph_engine_trains_as_the_captured_one(monkeypatch):
    # Epoch 1: the first step eager, three queued and run by the warm-up, the partial batch
    # captured; later epochs: four steps on the graph, the partial one captured. The weights
    # are the captured engine's bit for bit; the ELBO agrees to the graph's float32 sums.
    with _cpu_graph(monkeypatch) as built:
        graphed, g_hist = _train()
    (engine,) = built
    assert engine.name == "cuda-graph" and engine.graph.ready and not engine.queued
    assert int(engine.graph.step) == 5  # the last epoch's steps, on the graph or not
    plain, p_hist = _train()
    for a, b in zip(graphed.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    assert g_hist.train_elbo == pytest.approx(p_hist.train_elbo, rel=1e-6)


def test_cuda_graph_engine_epoch_too_short_to_record(monkeypatch):
    # One epoch of two full batches and a partial one: the queue never reaches three, so the
    # queued step runs eagerly at the epoch's end and counts; no graph is recorded.
    with _cpu_graph(monkeypatch) as built:
        pyro.clear_param_store()
        vae = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(32,), z_dim=4))
        data = pyrovae.data.load("digits", "train", binarize="threshold").images[:150]
        history = pyrovae.fit(vae.model, vae.guide, data, epochs=1, batch_size=64,
                              progress=False)  # fmt: skip
    (engine,) = built
    assert not engine.graph.ready and not engine.queued
    assert torch.isfinite(torch.tensor(history.train_elbo)).all()


def test_cuda_graph_engine_names_the_first_bad_step(monkeypatch):
    # A NaN on the graph (epoch 2, its third step): the graph goes on, as on CUDA, and the
    # epoch's end names that step and restores the end of epoch 1.
    calls = {"n": 0}

    def poison(batch):  # counts the full batches: 4 in epoch 1, then epoch 2's
        calls["n"] += len(batch[0]) == 64
        return (batch[0] * float("nan"),) if calls["n"] == 4 + 3 else batch

    with _cpu_graph(monkeypatch), pytest.raises(NonFiniteLossError) as info:
        _train(batch_transform=poison)
    assert (info.value.epoch, info.value.step) == (2, 3)
    assert [r["epoch"] for r in info.value.history.records()] == [1]


def test_guard_keeps_the_first_bad_step_and_restores():
    p = torch.nn.Parameter(torch.ones(3))
    guard = NonFiniteGuard(torch.device("cpu"))
    guard.keep([p])
    assert guard.finite(0, torch.tensor(1.0))
    guard.end_epoch(1, -1.0, 0)  # a good epoch: its values are the good ones now
    with torch.no_grad():
        p.fill_(2.0)
    guard.end_epoch(2, -1.0, 0)
    guard.start_epoch()
    assert not guard.finite(4, torch.tensor(float("inf"))) and guard.stopped
    guard.merge(torch.tensor(6))  # a later bad step of the graph's does not replace it
    guard.merge(torch.tensor(-1))
    with torch.no_grad():
        p.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="epoch 3, step 5; .* end of epoch 2"):
        guard.end_epoch(3, float("nan"), 9)
    assert torch.equal(p.detach(), torch.full((3,), 2.0))


def test_guard_blames_an_overflowed_sum_on_the_last_step():
    guard = NonFiniteGuard(torch.device("cpu"))
    guard.keep([torch.nn.Parameter(torch.zeros(1))])
    guard.merge(torch.tensor(-1))
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 7; .* initial values"):
        guard.end_epoch(1, float("-inf"), 6)
