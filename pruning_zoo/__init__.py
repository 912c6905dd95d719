"""pruning-zoo: visual-token pruning strategies for vision-language models, compared on equal terms.

Importing this package patches nothing and loads no plugin; plugins load on first use of the registries. The
strategy interface is imported on first use too (it needs torch, which takes seconds to import), so that
`pruning-zoo --help` and the modules that need no tensors start at once.
"""

import importlib

from pruning_zoo.errors import InvalidParameterError, PluginError, PruningZooError, UnknownNameError
from pruning_zoo.plugins.hookspecs import INTERFACE_VERSION, hookimpl
from pruning_zoo.strategy.budget import Budget, BudgetMeaning

#: Names this package exports from pruning_zoo.strategy, imported when first read.
STRATEGY_INTERFACE = ("PruningStrategy", "ScoreContext", "Selection", "Stage", "StrategyParams", "params_dataclass",
                      "top_k_in_order")
#: Names imported from elsewhere when first read: the engine's `prune`, the registry's `get_strategy`, and the
#: type a model-family plugin registers.
LAZY = {"prune": "pruning_zoo.engine", "get_strategy": "pruning_zoo.plugins",
        "ModelFamily": "pruning_zoo.plugins.families"}

__all__ = [
    "Budget",
    "BudgetMeaning",
    "INTERFACE_VERSION",
    "InvalidParameterError",
    "PluginError",
    "PruningZooError",
    "UnknownNameError",
    "ModelFamily",
    "get_strategy",
    "hookimpl",
    "prune",
    *STRATEGY_INTERFACE,
]


def __getattr__(name: str):
    if name in STRATEGY_INTERFACE:
        return getattr(importlib.import_module("pruning_zoo.strategy"), name)
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'pruning_zoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

