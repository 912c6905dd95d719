"""The third-party example under examples/ is installed by the README's test command and works like a built-in."""

from importlib.metadata import PackageNotFoundError, distribution

import pytest
import torch
from typer.testing import CliRunner

import pruning_zoo
from pruning_zoo import plugins
from pruning_zoo.cli import app
from pruning_zoo.strategy import ScoreContext, Stage


@pytest.fixture(autouse=True)
def example_is_installed(fresh_plugins):
    fresh_plugins.delenv(plugins.PLUGINS_ENV, raising=False)
    try:
        distribution("pruning-zoo-example")
    except PackageNotFoundError:
        pytest.fail("install the example plugin first: pip install -e examples/pruning-zoo-example (README)")


def test_list_shows_the_example_with_its_distribution():
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "feature-norm" in line)
    assert "pruning-zoo-example 0.1.0" in row


def test_the_example_strategy_can_be_built_and_called():
    strategy = pruning_zoo.get_strategy("feature-norm", order="smallest")
    tokens = torch.tensor([[3.0, 4.0], [0.1, 0.0], [1.0, 0.0], [0.0, 2.0]])
    ctx = ScoreContext(stage=Stage(after_layer=None, keep=2), tokens=tokens, num_layers=4)
    (stage,) = strategy.plan(2, 4, 4)
    selection = strategy.select(strategy.score(ctx), stage.keep, ctx)
    assert selection.keep.tolist() == [1, 2]


def test_the_example_validates_its_parameters():
    with pytest.raises(pruning_zoo.InvalidParameterError, match="feature-norm.order.*'largest', 'smallest'"):
        pruning_zoo.get_strategy("feature-norm", order="middle")
