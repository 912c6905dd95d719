import pytest

from pruning_zoo import plugins


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Reload plugins for this test (after it changes PRUNING_ZOO_PLUGINS), and again after it."""
    plugins.reset()
    yield monkeypatch
    monkeypatch.undo()
    plugins.reset()


@pytest.fixture
def offline_hub(monkeypatch):
    """The hub unreachable at once, as HF_HUB_OFFLINE=1 makes it (the libraries read it at import, so set
    their constants; without it a blocked network takes tens of seconds of retries to fail)."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


import tiny_models  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)


@pytest.fixture(scope="session", params=sorted(tiny_models.FAMILIES))
def family_model(request, tmp_path_factory):
    """(family, model) for every supported family: a tiny random model saved and loaded with from_pretrained."""
    family = tiny_models.FAMILIES[request.param]
    return family, family.build(tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_testbed_model(tmp_path_factory):
    """A tiny random LLaVA with the testbed's processor (576 visual tokens), saved like a hub model."""
    return tiny_models.testbed_like(tmp_path_factory.mktemp("tiny-testbed"))
