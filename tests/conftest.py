import pytest

from pruning_zoo import plugins


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Reload plugins for this test (after it changes PRUNING_ZOO_PLUGINS), and again after it."""
    plugins.reset()
    yield monkeypatch
    monkeypatch.undo()
    plugins.reset()
