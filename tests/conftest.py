import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _device(request, monkeypatch):
    # Tests that are not marked gpu run on the CPU even where CUDA exists ("auto" would pick
    # it); the gpu-marked ones exercise the CUDA paths.
    if not request.node.get_closest_marker("gpu"):
        monkeypatch.setenv("PYROVAE_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _pyro_state():
    # Every test starts from an empty param store, with validation on and a fixed seed.
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.fixture
def digits_vae():
    """A small untrained VAE and 40 binarized digits it can score."""
    import pyrovae

    data = pyrovae.data.load("digits", "test", binarize="threshold")
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=data.x_shape, hidden=(32,), z_dim=4))
    return vae, data.images[:40]
