import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian
from pyro.infer import TraceMeanField_ELBO
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

import pyrovae
from pyrovae import DataError, NonFiniteLossError


def _digits(split="train", n=None):
    data = pyrovae.data.load("digits", split, binarize="threshold")
    return data if n is None else data.images[:n]


def _vae(**kw):
    cfg = pyrovae.Config(x_shape=(1, 8, 8), hidden=(64,), z_dim=4, **kw)
    return pyrovae.build_vae(cfg)


def test_fit_vae_on_dataset_returns_history():
    vae = _vae()
    history = pyrovae.fit(
        vae.model, vae.guide, _digits(), epochs=3, batch_size=128, val_data=_digits("valid"),
        seed=0, progress=False, device="cpu",
    )  # fmt: skip
    assert history.epoch == [1, 2, 3]
    assert all(math.isfinite(v) for v in history.train_elbo + history.val_elbo)
    assert history.train_elbo[-1] > history.train_elbo[0]
    assert set(history.records()[0]) == {"epoch", "train_elbo", "val_elbo", "seconds"}


def test_fit_with_plain_functions_and_pyro_params():
    # A user's pair written from scratch: pyro.param sites, a "data" plate, no modules.
    lg = LinearGaussian()
    x = lg.data(500)

    def guide(x):
        w = pyro.param("w", torch.zeros(4, 2, dtype=x.dtype))
        c = pyro.param("c", torch.zeros(2, dtype=x.dtype))
        s = pyro.param("s", torch.ones(2, dtype=x.dtype), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ w + c, s).to_event(1))

    before = pyrovae.elbo(lg.model, guide, x, num_particles=50).mean()
    history = pyrovae.fit(lg.model, guide, x, epochs=30, batch_size=100, lr=0.05, progress=False)
    after = pyrovae.elbo(lg.model, guide, x, num_particles=50).mean()
    assert after > before + 1.0
    # the learned amortized guide nearly closes the gap to the exact log p(x)
    assert lg.log_px(x).mean() - after < 0.5
    assert pyro.param("s").min() > 0 and len(history) == 30


def test_fit_pyro_module_model_and_meanfield_loss():
    # A PyroModule pair with a learned prior scale, trained with the closed-form KL.
    class Model(PyroModule):
        def __init__(self):
            super().__init__()
            self.scale = PyroParam(torch.tensor(2.0), constraint=constraints.positive)

        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(0.0, self.scale))
                pyro.sample("x", dist.Normal(z, 0.1), obs=x)

    class Guide(PyroModule):
        def __init__(self):
            super().__init__()
            self.loc = torch.nn.Linear(1, 1)

        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(self.loc(x[:, None]).squeeze(-1), 0.1))

    x = 0.5 * torch.randn(400)
    model, guide = Model(), Guide()
    pyrovae.fit(model, guide, x, epochs=40, batch_size=100, lr=0.05, loss=TraceMeanField_ELBO(),
                progress=False)  # fmt: skip
    assert abs(model.scale.item() - 0.5) < 0.15  # the prior scale moved to the data's


def test_fit_accepts_tuples_and_tensor_datasets():
    # Extra tensors reach model and guide as extra arguments (labels, context…).
    seen = []

    def model(x, y):
        seen.append(y.shape)
        loc = pyro.param("loc", torch.zeros(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x, y):
        pass

    x, y = torch.randn(10), torch.arange(10)
    pyrovae.fit(model, guide, (x, y), epochs=1, batch_size=4, progress=False, fast=False)
    pyrovae.fit(model, guide, torch.utils.data.TensorDataset(x, y), epochs=1, batch_size=4,
                progress=False, fast=False)  # fmt: skip
    assert seen[:3] == [torch.Size([4]), torch.Size([4]), torch.Size([2])]


def test_fit_applies_the_datasets_transform():
    data = pyrovae.data.ImageDataset(torch.full((20, 1, 8, 8), 0.5))
    calls = []

    def transform(batch):
        calls.append(batch[0].unique().tolist())
        return (torch.bernoulli(batch[0]),)

    vae = _vae()
    data.batch_transform = transform
    pyrovae.fit(vae.model, vae.guide, data, epochs=1, batch_size=10, progress=False)
    assert calls == [[0.5]] * 3  # once for the upfront data check, then once per batch


def test_callback_can_stop_early():
    vae = _vae()
    history = pyrovae.fit(vae.model, vae.guide, _digits(n=100), epochs=10, progress=False,
                          callback=lambda record: record["epoch"] == 2)  # fmt: skip
    assert history.epoch == [1, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"device": "cuda:7"}, "CUDA is not available|cuda"),
    ],
)
def test_bad_arguments(kwargs, match):
    if "device" in kwargs and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    vae = _vae()
    with pytest.raises(ValueError, match=match):
        pyrovae.fit(vae.model, vae.guide, _digits(n=10), progress=False, **kwargs)


def test_nan_in_data_is_refused_before_training():
    vae = _vae()
    x = _digits(n=20).clone()
    x[7, 0, 3, 3] = float("nan")
    before = [p.clone() for p in vae.parameters()]
    with pytest.raises(DataError, match="NaN or Inf values in 1 of 20 items.*item 7"):
        pyrovae.fit(vae.model, vae.guide, x, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, vae.parameters(), strict=True))


def test_inf_in_validation_data_is_refused():
    vae = _vae()
    val = _digits(n=5).clone()
    val[0] = float("inf")
    with pytest.raises(DataError, match="validation data has NaN or Inf"):
        pyrovae.fit(vae.model, vae.guide, _digits(n=20), val_data=val, progress=False)


def test_empty_data_is_refused():
    vae = _vae()
    with pytest.raises(DataError, match="empty"):
        pyrovae.fit(vae.model, vae.guide, torch.empty(0, 1, 8, 8), progress=False)
    with pytest.raises(DataError, match="empty"):
        pyrovae.fit(vae.model, vae.guide, torch.utils.data.TensorDataset(torch.empty(0, 1, 8, 8)),
                    progress=False)  # fmt: skip


def test_wrong_shape_is_refused():
    vae = _vae()
    with pytest.raises(ValueError, match=r"expected data of shape \(N, 1, 8, 8\), got \(20, 64\)"):
        pyrovae.fit(vae.model, vae.guide, _digits(n=20).reshape(20, 64), progress=False)


def test_grey_values_need_opt_in_for_bernoulli():
    grey = pyrovae.data.load("digits", "train").images[:50]
    vae = _vae()
    with pytest.raises(ValueError, match="binary pixels"):
        pyrovae.fit(vae.model, vae.guide, grey, progress=False)
    opted = _vae(allow_non_binary=True)
    history = pyrovae.fit(opted.model, opted.guide, grey, epochs=1, progress=False)
    assert math.isfinite(history.train_elbo[0])


def test_non_finite_loss_stops_and_restores_last_good_epoch_eager():
    # A decoder weight turns NaN in the 7th call (epoch 2, step 2 with 5 steps per epoch), as
    # a diverging run would. On the CPU the loss is checked every step (on CUDA once an epoch).
    vae = _vae()
    calls = {"n": 0}

    def model(x):
        calls["n"] += 1
        if calls["n"] == 7:
            with torch.no_grad():
                vae.decoder.out.bias[0] = float("nan")
        vae.model(x)

    snapshots = []

    def remember(record):
        snapshots.append({k: v.clone() for k, v in vae.state_dict().items()})

    with pytest.warns(UserWarning, match="NaN"):  # Pyro's validation warns about the NaN first
        with pytest.raises(NonFiniteLossError, match="epoch 2, step 2") as info:
            pyrovae.fit(model, vae.guide, _digits(n=50), epochs=5, batch_size=10,
                        callback=remember, progress=False, fast=False, device="cpu")  # fmt: skip
    assert info.value.epoch == 2 and info.value.step == 2
    assert info.value.history.epoch == [1]
    state = vae.state_dict()
    assert all(torch.equal(state[k], snapshots[-1][k]) for k in state)
    assert torch.isfinite(vae.decoder.out.bias).all()


def test_non_finite_loss_on_the_fast_path():
    # The replayed loss is checked too: a decoder that diverges after epoch 1 stops training
    # at epoch 2, step 1, and the parameters are those of the end of epoch 1.
    vae = _vae()
    snapshots = []

    def diverge(record):
        snapshots.append({k: v.clone() for k, v in vae.state_dict().items()})
        with torch.no_grad():
            vae.decoder.out.bias.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="epoch 2, step 1") as info:
        pyrovae.fit(vae.model, vae.guide, _digits(n=50), epochs=5, batch_size=10,
                    callback=diverge, progress=False)  # fmt: skip
    assert info.value.history.epoch == [1]
    state = vae.state_dict()
    assert all(torch.equal(state[k], snapshots[0][k]) for k in state)


def test_fast_and_eager_paths_agree():
    # Same seed, same data: the replayed loss trains like the eager one. Replay draws the same
    # random numbers as eager Pyro, so the histories match closely.
    histories = {}
    for fast in (True, False):
        vae = _vae()
        vae.load_state_dict(_vae().state_dict())  # fresh, but both start from the same weights
        pyro.set_rng_seed(1)
        vae = _vae()
        histories[fast] = pyrovae.fit(vae.model, vae.guide, _digits(), epochs=8, batch_size=64,
                                      val_data=_digits("valid"), seed=0, progress=False,
                                      fast=fast)  # fmt: skip
    fast, eager = histories[True], histories[False]
    assert abs(fast.val_elbo[-1] - eager.val_elbo[-1]) < 0.5
    assert abs(fast.train_elbo[-1] - eager.train_elbo[-1]) < 0.5


def test_plain_pyro_params_take_the_fast_path(caplog):
    # Plain pyro.param sites (Pyro's tutorial idiom) become graph inputs: replayed, and trained
    # as eagerly, with constraints.
    lg = LinearGaussian()
    x = lg.data(400)

    def guide(x):
        w = pyro.param("w", torch.zeros(4, 2, dtype=x.dtype))
        s = pyro.param("s", torch.ones(2, dtype=x.dtype), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ w, s).to_event(1))

    results = {}
    for fast in (True, False):
        pyro.clear_param_store()
        with caplog.at_level("INFO", logger="pyrovae"):
            history = pyrovae.fit(lg.model, guide, x, epochs=20, batch_size=100, lr=0.05,
                                  progress=False, fast=fast, seed=1)  # fmt: skip
        results[fast] = history.train_elbo[-1], pyro.param("w").detach().clone()
    assert any("replaying the captured loss" in r.getMessage() for r in caplog.records)
    assert not any("eagerly" in r.getMessage() for r in caplog.records)
    assert abs(results[True][0] - results[False][0]) < 0.05
    assert torch.allclose(results[True][1], results[False][1], atol=1e-3)
    assert pyro.param("s").min() > 0


def test_fast_path_falls_back_for_data_dependent_control_flow(caplog):
    # A model that branches on a tensor value cannot be replayed: fit trains it eagerly.
    vae = _vae()

    def model(x):
        if x.mean() > 0.5:  # reads a value: data-dependent
            pyro.factor("unused", torch.zeros(()))
        vae.model(x)

    with caplog.at_level("WARNING", logger="pyrovae"):
        history = pyrovae.fit(model, vae.guide, _digits(n=60), epochs=2, batch_size=20,
                              progress=False)  # fmt: skip
    (message,) = [r.getMessage() for r in caplog.records if "trains eagerly" in r.getMessage()]
    assert "reads a tensor's value in Python" in message
    assert "in your code" in message and "x.mean() > 0.5" in message
    assert math.isfinite(history.train_elbo[-1])


@pytest.mark.statistical
def test_statistical_training_improves_held_out_log_likelihood():
    # Seeded: a small VAE trained 30 epochs on digits improves held-out log p(x) (K=500) from
    # about −44.4 nats (64 coin flips) to better than −23 nats: a margin of at least 18 nats.
    train, valid, test = _digits(), _digits("valid"), _digits("test", n=200)
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(256,), z_dim=8))
    before = pyrovae.log_likelihood(vae.model, vae.guide, test, num_samples=500).mean()
    pyrovae.fit(vae.model, vae.guide, train, epochs=30, batch_size=64, val_data=valid, seed=0,
                progress=False)  # fmt: skip
    after = pyrovae.log_likelihood(vae.model, vae.guide, test, num_samples=500).mean()
    assert before < -40
    assert after > -23
    assert after - before > 18


@pytest.mark.gpu
def test_fit_and_score_on_cuda():
    # Data and model on the GPU; the loop flags a bad step on the device and syncs per epoch.
    vae = _vae()
    train = _digits()
    with pyro.validation_enabled(False):  # Pyro's own checks would sync every step
        history = pyrovae.fit(vae.model, vae.guide, train, epochs=3, batch_size=128,
                              device="cuda", val_data=_digits("valid"), progress=False)  # fmt: skip
    assert next(vae.parameters()).device.type == "cuda"
    assert history.train_elbo[-1] > history.train_elbo[0]
    x = _digits("test", n=50).cuda()
    ll = pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=500)
    assert ll.device.type == "cuda" and torch.isfinite(ll).all()
    assert (ll >= pyrovae.elbo(vae.model, vae.guide, x, num_particles=50) - 0.5).all()


@pytest.mark.gpu
def test_cuda_graph_step_trains_like_eager(caplog):
    # On CUDA the fast path records the whole step as a CUDA graph; it must train like eager.
    histories = {}
    for fast in (True, False):
        vae = _vae()
        with caplog.at_level("INFO", logger="pyrovae"):
            histories[fast] = pyrovae.fit(vae.model, vae.guide, _digits(), epochs=6,
                                          batch_size=64, val_data=_digits("valid"), seed=0,
                                          device="cuda", progress=False, fast=fast)  # fmt: skip
    assert any("replaying the captured loss" in r.getMessage() for r in caplog.records)
    assert abs(histories[True].val_elbo[-1] - histories[False].val_elbo[-1]) < 0.5


@pytest.mark.gpu
def test_cuda_graph_step_detects_non_finite_loss():
    vae = _vae()

    def diverge(record):
        with torch.no_grad():
            vae.decoder.out.bias.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="epoch 2, step 1"):
        pyrovae.fit(vae.model, vae.guide, _digits(), epochs=3, batch_size=64, device="cuda",
                    callback=diverge, progress=False)  # fmt: skip


@pytest.mark.gpu
def test_cuda_graph_recording_that_fails_falls_back_to_replay(caplog):
    # A batch transform that reads a value back cannot be recorded in a CUDA graph: fit says so
    # and trains on with the replayed loss, the random generator left usable.
    def transform(batch):
        float(batch[0].sum())  # a host sync: illegal while a graph is being recorded
        return batch

    vae = _vae()
    with caplog.at_level("WARNING", logger="pyrovae"):
        history = pyrovae.fit(vae.model, vae.guide, _digits(), epochs=3, batch_size=64,
                              device="cuda", batch_transform=transform, progress=False)  # fmt: skip
    assert any("no CUDA graph" in r.getMessage() for r in caplog.records)
    assert all(math.isfinite(v) for v in history.train_elbo)
    assert history.train_elbo[-1] > history.train_elbo[0]
    torch.randn(3, device="cuda")  # the generator still works outside a capture


@pytest.mark.gpu
def test_captured_loss_equals_the_eager_loss_on_cuda():
    from pyrovae.capture import NoSyncTrace_ELBO, capture

    vae = _vae().cuda()
    x = _digits(n=64).cuda()
    loss = NoSyncTrace_ELBO()(vae.model, vae.guide)
    with pyro.validation_enabled(False):
        captured = capture(loss, [vae], (x,))
        torch.manual_seed(3)
        a = captured(x)
        torch.manual_seed(3)
        b = loss(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_second_model_in_a_used_param_store_trains_on_the_fast_path(caplog):
    # Pyro's global param store still holds the first model's same-named tensors; fit trains
    # the second model's own parameters, replayed, and leaves the first model alone.
    first, second = _vae(), _vae()
    pyrovae.fit(first.model, first.guide, _digits(n=200), epochs=1, progress=False)
    frozen = {k: v.clone() for k, v in first.state_dict().items()}
    before = pyrovae.elbo(second.model, second.guide, _digits("valid")).mean()
    with caplog.at_level("WARNING", logger="pyrovae"):
        pyrovae.fit(second.model, second.guide, _digits(), epochs=3, progress=False)
    assert not [r for r in caplog.records if "training eagerly" in r.getMessage()]
    assert pyrovae.elbo(second.model, second.guide, _digits("valid")).mean() > before + 5
    assert all(torch.equal(v, frozen[k]) for k, v in first.state_dict().items())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "eager"])
def test_a_continued_run_repeats_the_uninterrupted_one_bit_for_bit(tmp_path, fast, device):
    # 2 epochs, saved to disk, continued in a fresh model to 4 == 4 epochs in one go: the same
    # weights, Adam moments and random draws (VampPrior, so the prior's parameters count too).
    from pyrovae.checkpoint import load_state, save_state
    from pyrovae.training import TrainState

    def run(epochs, vae, state, save=False):
        callback = (lambda record: save_state(tmp_path, vae, state)) if save else None
        return pyrovae.fit(vae.model, vae.guide, _digits(), epochs=epochs, batch_size=128,
                           seed=0, progress=False, fast=fast, state=state, device=device,
                           callback=callback)  # fmt: skip

    pyro.set_rng_seed(1)
    straight, state = _vae(prior="vampprior", components=8), TrainState()
    run(4, straight, state)
    pyro.set_rng_seed(1)
    first = _vae(prior="vampprior", components=8)
    assert run(2, first, TrainState(), save=True).epoch == [1, 2]
    pyro.clear_param_store()
    resumed = _vae(prior="vampprior", components=8)  # other initial weights, replaced by load
    saved, _ = load_state(tmp_path, resumed)
    assert saved.epoch == 2
    assert run(4, resumed, saved).epoch == [3, 4] and saved.epoch == 4
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    moments = zip(state.optimizer["state"].values(), saved.optimizer["state"].values(), strict=True)
    assert all(torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) for a, b in moments)
    assert run(4, resumed, saved).epoch == []  # nothing left to train


def test_optimizer_state_of_another_pair_is_refused():
    from pyrovae.training import TrainState

    small, state = _vae(), TrainState()
    pyrovae.fit(small.model, small.guide, _digits(), epochs=1, progress=False, state=state)
    pyro.clear_param_store()
    other = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(32,), z_dim=4))
    state.epoch = 0
    with pytest.raises(ValueError, match="saved optimizer state does not fit this pair"):
        pyrovae.fit(other.model, other.guide, _digits(), epochs=1, progress=False, state=state)


def test_the_optimizer_is_configurable_and_bad_settings_are_refused():
    vae = _vae()
    state = pyrovae.TrainState()
    pyrovae.fit(vae.model, vae.guide, _digits(n=64), epochs=2, batch_size=32, progress=False,
                optimizer=torch.optim.SGD, optim_args={"momentum": 0.9}, state=state)  # fmt: skip
    assert state.optimizer["param_groups"][0]["momentum"] == 0.9
    assert all("momentum_buffer" in s for s in state.optimizer["state"].values())
    with pytest.raises(ValueError, match="cannot build the optimizer"):
        pyrovae.fit(vae.model, vae.guide, _digits(n=64), epochs=1, progress=False,
                    optim_args={"no_such_argument": 1})  # fmt: skip


def test_objectives_and_a_pair_are_not_mixed():
    vae = _vae()
    objective = pyrovae.Objective(vae.model, vae.guide, _digits(n=20))
    with pytest.raises(ValueError, match="either objectives, or model, guide and data"):
        pyrovae.fit([objective], vae.guide, progress=False)
    with pytest.raises(ValueError, match="needs a model, a guide and data"):
        pyrovae.fit(vae.model, vae.guide, progress=False)
    with pytest.raises(ValueError, match="weight must be a finite number > 0"):
        pyrovae.fit([pyrovae.Objective(vae.model, vae.guide, _digits(n=20), weight=0.0)],
                    progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "dtype, message",
    [
        (torch.uint8, "expected floating-point images.*torch.uint8"),
        (torch.int64, "expected floating-point images.*torch.int64"),
        (torch.bool, "expected floating-point images.*torch.bool"),
        (torch.float64, r"expected float32 images .* got float64: .*x.to\(torch.float32\)"),
        (torch.float16, r"expected float32 images .* got float16: .*x.to\(torch.float32\)"),
    ],
)
def test_wrong_dtype_images_are_a_value_error(dtype, message):
    # the documented ValueError naming the expected dtype, from fit and from scoring, never
    # torch's RuntimeError from inside a matmul
    vae = _vae()
    x = _digits(n=20).to(dtype)
    with pytest.raises(ValueError, match=message):
        pyrovae.fit(vae.model, vae.guide, x, progress=False)
    with pytest.raises(ValueError, match=message):
        pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=3)


def test_a_model_in_float64_takes_float64_images():
    vae = _vae().to(torch.float64)
    x = _digits(n=20).double()
    history = pyrovae.fit(vae.model, vae.guide, x, epochs=1, batch_size=10, progress=False)
    assert math.isfinite(history.train_elbo[0])
    assert pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=3).dtype == torch.float64


@pytest.mark.parametrize("name, kwargs", [("epochs", {"epochs": 2.5}),
                                          ("batch_size", {"batch_size": 7.5}),
                                          ("epochs", {"epochs": True})])  # fmt: skip
def test_counts_are_whole_numbers_not_truncated(name, kwargs):
    vae = _vae()
    with pytest.raises(ValueError, match=f"{name} must be a whole number"):
        pyrovae.fit(vae.model, vae.guide, _digits(n=20), progress=False, **kwargs)
    with pytest.raises(ValueError, match="samples must be a whole number, got 2.7"):
        pyrovae.log_likelihood(vae.model, vae.guide, _digits(n=4), num_samples=2.7)
    # whole numbers of any type are taken as they are
    history = pyrovae.fit(vae.model, vae.guide, _digits(n=20), epochs=2.0,
                          batch_size=torch.tensor(10), progress=False)  # fmt: skip
    assert len(history.train_elbo) == 2


def test_dynamic_binarization_reaches_the_model():
    # load(binarize="dynamic") hands fit a batch_transform: the model sees fresh binary images.
    data = pyrovae.data.load("digits", "train", binarize="dynamic")
    seen = []
    vae = _vae()

    def model(x):
        seen.append(set(x.unique().tolist()))
        vae.model(x)

    pyrovae.fit(model, vae.guide, data, epochs=1, batch_size=512, progress=False, fast=False)
    assert seen and all(values <= {0.0, 1.0} for values in seen)


def test_a_pair_with_nothing_to_train_is_a_value_error():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pass

    with pytest.raises(ValueError, match="nothing to train"):
        pyrovae.fit(model, lambda x: None, torch.zeros(6, 2), epochs=1, progress=False)


def test_fit_seed_fixes_parameters_created_during_training():
    # a guide whose weights are created lazily (random init) on its first call inside fit
    x = torch.randn(64, 3)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def guide(x):
        w = pyro.param("w", lambda: torch.randn(3, 2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ w, 1.0).to_event(1))

    runs = []
    for seed in (5, 5, 6):
        pyro.clear_param_store()
        torch.manual_seed(100 + len(runs))  # the global state before fit must not matter
        pyrovae.fit(model, guide, x, epochs=2, batch_size=16, seed=seed, device="cpu")
        runs.append(pyro.param("w").detach().clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
