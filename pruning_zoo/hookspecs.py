"""The plugin hooks. Each hook hands the plugin a `register` callback: the host owns names and collisions.

A plugin is any module or object with functions marked `@pruning_zoo.hookimpl` whose names match these;
an installed distribution exposes it through the `pruning_zoo` entry-point group. docs/plugins.md documents
every hook with its exact signature (a test checks it).
"""

import pluggy

hookspec = pluggy.HookspecMarker("pruning_zoo")
hookimpl = pluggy.HookimplMarker("pruning_zoo")


@hookspec
def register_strategies(register):
    """Register pruning strategies: call `register(strategy_class)` once per PruningStrategy subclass."""


@hookspec
def register_model_families(register):
    """Register model families: call `register(family)` once per ModelFamily."""
