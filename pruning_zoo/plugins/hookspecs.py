"""The plugin hooks. Each hook hands the plugin a `register` callback: the host owns names and collisions.

A plugin is any module or object with functions marked `@pruning_zoo.hookimpl` whose names match these;
an installed distribution exposes it through the `pruning_zoo` entry-point group. docs/plugins.md documents
every hook with its exact signature (a test checks it).
"""

import pluggy

#: The version of the plugin interface (docs/plugins.md): the hooks, the strategy class's members, ScoreContext,
#: Selection, Stage and the observation names. A minor step only adds; a major step changes or removes, after a
#: release that warns. Plugins may rely on everything documented for the major version they were written for.
INTERFACE_VERSION = "1.0"

hookspec = pluggy.HookspecMarker("pruning_zoo")
hookimpl = pluggy.HookimplMarker("pruning_zoo")


@hookspec
def register_strategies(register):
    """Register pruning strategies: call `register(strategy_class)` once per PruningStrategy subclass."""


@hookspec
def register_model_families(register):
    """Register model families: call `register(family)` once per ModelFamily."""
