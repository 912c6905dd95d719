"""pruning-zoo: visual-token pruning strategies for vision-language models, compared on equal terms.

Importing this package patches nothing and loads no plugin; plugins load on first use of the registries.
"""

from pruning_zoo.budget import Budget, BudgetMeaning
from pruning_zoo.errors import InvalidParameterError, PluginError, PruningZooError, UnknownNameError
from pruning_zoo.hookspecs import hookimpl
from pruning_zoo.strategy import (
    PruningStrategy,
    ScoreContext,
    Selection,
    Stage,
    StrategyParams,
    params_dataclass,
    top_k_in_order,
)

__all__ = [
    "Budget",
    "BudgetMeaning",
    "InvalidParameterError",
    "PluginError",
    "PruningStrategy",
    "PruningZooError",
    "ScoreContext",
    "Selection",
    "Stage",
    "StrategyParams",
    "UnknownNameError",
    "get_strategy",
    "hookimpl",
    "params_dataclass",
    "top_k_in_order",
]


def get_strategy(name: str, **params) -> PruningStrategy:
    """An installed strategy by name, with parameters validated: `get_strategy("fastv", k=3)`."""
    from pruning_zoo import plugins

    return plugins.strategies().get(name)(params)
