"""Deprecated path, kept so that plugins written for 0.1 keep working: `ModelFamily` lives in
pruning_zoo.plugins.families (also `pruning_zoo.ModelFamily`), the built-in families in pruning_zoo.engine.families.
This module goes away with 0.2 (interface 2), not before.
"""

import warnings

from pruning_zoo.engine.families import LLAVA, LLAVA_NEXT, QWEN2_5_VL, QWEN2_VL, clip_grid_tokens  # noqa: F401
from pruning_zoo.plugins.families import ModelFamily  # noqa: F401

warnings.warn("pruning_zoo.families moved: use pruning_zoo.ModelFamily (pruning_zoo.plugins.families) to register "
              "a family; the built-in ones are in pruning_zoo.engine.families", DeprecationWarning, stacklevel=2)
