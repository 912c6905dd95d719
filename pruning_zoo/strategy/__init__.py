"""The strategy interface: what every pruning method implements and what it is handed.

`interface` holds the strategy class, the stages, selections and the context a strategy scores; `params` its
validated parameters; `budget` what a token budget means; `tensors` the ranking and counting helpers strategies
share. Every name is importable from here, as plugins do: `from pruning_zoo.strategy import PruningStrategy`.
Each is imported from its module when first read: `budget` needs no torch, and `import pruning_zoo` (which reads
it) must start without torch, which takes seconds.
"""

import importlib

#: Where each name of this package lives.
NAMES = {
    "budget": ("Budget", "BudgetMeaning"),
    "interface": ("LLM_OBSERVATIONS", "OBSERVATIONS", "VISION_OBSERVATIONS", "VISION_STAGE_OBSERVATIONS",
                  "ModelIdentity", "PruningStrategy", "ScoreContext", "Selection", "Stage", "SublayerIO",
                  "checked_scores", "describe_stages", "one_size", "plan_stages", "stages_that_prune"),
    "params": ("InLLMParams", "StrategyParams", "build_params", "describe_field", "param_schema", "params_as_dict",
               "params_dataclass"),
    "tensors": ("PAIRWISE_LIMIT", "ascending", "fp32_products", "top_k_in_order", "top_k_mask", "true_indices"),
}
MODULE_OF = {name: module for module, names in NAMES.items() for name in names}

__all__ = sorted(MODULE_OF)


def __getattr__(name: str):
    if name in MODULE_OF:
        return getattr(importlib.import_module(f"pruning_zoo.strategy.{MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'pruning_zoo.strategy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
