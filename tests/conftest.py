import inspect
import os

# The default run is two test processes on two cores (pyproject's addopts: -n 2): one OpenMP
# thread each, set before torch loads; the processes tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyro  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

#: what in a test's code starts another process
_SPAWNS = ("subprocess.", "Popen", "sys.executable", "_cli(", "_fresh(")


def pytest_collection_modifyitems(items):
    # The tiers: tests that start processes are marked `subprocess` (deselect them with
    # -m "not subprocess" for a quick run); `slow` and `statistical` are marked by hand.
    for item in items:
        function = getattr(item, "function", None)
        try:
            code = inspect.getsource(function) if function is not None else ""
        except (OSError, TypeError):
            code = ""
        if any(s in code for s in _SPAWNS):
            item.add_marker(pytest.mark.subprocess)


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
