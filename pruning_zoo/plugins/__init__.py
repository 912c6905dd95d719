"""The plugin system: the hooks a plugin implements (`hookspecs`), what a model family registers (`families`), the
registries (`registry`) and loading the installed plugins from entry points (`manager`).

`strategies()` and `model_families()` are the registries every other part reads; they load the plugins on first
use. They are imported from `manager` when first read: the strategy interface they check against needs torch,
and `import pruning_zoo` (which reads `hookspecs`) must start without it.
"""

import importlib

#: The names of `manager` this package exports.
MANAGER_NAMES = ("BUILTIN_FAMILIES", "ENTRY_POINT_GROUP", "PLUGINS_ENV", "check_hook_names", "check_strategy_class",
                 "collect_model_families", "collect_strategies", "get_strategy", "make_plugin_manager",
                 "model_families", "plugin_manager", "reset", "strategies")

__all__ = list(MANAGER_NAMES)


def __getattr__(name: str):
    if name in MANAGER_NAMES:
        return getattr(importlib.import_module("pruning_zoo.plugins.manager"), name)
    raise AttributeError(f"module 'pruning_zoo.plugins' has no attribute {name!r}")
