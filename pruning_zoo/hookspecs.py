"""Deprecated path, kept so that plugins written for 0.1 keep working: the hooks live in pruning_zoo.plugins.hookspecs.

Use `pruning_zoo.hookimpl` (or `pruning_zoo.plugins.hookspecs`); this module goes away with 0.2 (interface 2), not before.
"""

import warnings

from pruning_zoo.plugins.hookspecs import *  # noqa: F403 - the whole deprecated namespace
from pruning_zoo.plugins.hookspecs import INTERFACE_VERSION, hookimpl, hookspec  # noqa: F401

warnings.warn("pruning_zoo.hookspecs moved to pruning_zoo.plugins.hookspecs; use pruning_zoo.hookimpl",
              DeprecationWarning, stacklevel=2)
