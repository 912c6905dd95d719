"""Token budgets: how many visual tokens a strategy keeps per image, and what that number means."""

from __future__ import annotations

import enum
import re

from pruning_zoo.errors import InvalidParameterError

#: A budget is a token count per image (int >= 1) or a share of the image's visual tokens (float in (0, 1]).
Budget = int | float
#: More visual tokens than any image of any supported model has (Qwen2-VL's largest image: 16,384): a larger
#: count is a typo, refused before any model is looked at.
MAX_BUDGET = 1_000_000


class BudgetMeaning(str, enum.Enum):
    """What a strategy's budget counts; papers compare pre-LLM and in-LLM methods differently."""

    #: Visual tokens per image that enter the first decoder layer (VisionZip, LearnPruner).
    ENTERING_LLM = "entering_llm"
    #: Visual tokens per image in the decoder layers after the strategy's last stage: what an in-LLM method
    #: ends with (FastV "at 64 tokens" in VisionZip's and DART's tables, LearnPruner's "32 tokens").
    AFTER_PRUNING = "after_pruning"
    #: Visual tokens per image averaged over all decoder layers (how in-LLM papers compare FLOPs-fairly).
    PER_LAYER_AVERAGE = "per_layer_average"


def parse_budget(text: str) -> Budget:
    """'64' -> 64 tokens per image; '0.25' -> a quarter of each image's visual tokens. Plain decimal digits only:
    Python's int() and float() would also take '1_000', '1e3', 'nan' and ' 64 '."""
    value: Budget
    text = text.strip()
    if re.fullmatch(r"-?[0-9]{1,12}", text):  # a sign, to say why -1 is refused
        value = int(text)
    elif re.fullmatch(r"[0-9]*\.[0-9]+|[0-9]+\.", text):
        value = float(text)
    else:
        raise InvalidParameterError(
            f"budget {text[:40]!r} is not a number; give a token count per image (e.g. 64) "
            "or a ratio in (0, 1] (e.g. 0.25)"
        )
    check_budget(value)
    return value


def check_budget(budget: Budget) -> None:
    """Reject budgets that no image can satisfy: zero, negative, ratios above 1, bools."""
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise InvalidParameterError(
            f"budget {budget!r} must be an int token count or a float ratio in (0, 1]"
        )
    if isinstance(budget, int) and budget < 1:
        raise InvalidParameterError(
            f"budget {budget} must keep at least 1 visual token per image; use a count >= 1 "
            "or a ratio in (0, 1]"
        )
    if isinstance(budget, int) and budget > MAX_BUDGET:
        raise InvalidParameterError(
            f"budget {budget:,} is more visual tokens than any image has (at most {MAX_BUDGET:,}); give a token "
            "count per image such as 64, or a ratio in (0, 1]"
        )
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise InvalidParameterError(
            f"budget ratio {budget} is outside (0, 1]; use a ratio such as 0.25, or an int token count"
        )


def resolve_budget(budget: Budget, num_visual: int) -> int:
    """The exact number of visual tokens to keep for an image of `num_visual` tokens.

    A ratio b keeps round(b * N), at least 1 (METHODS.md, budget semantics).
    """
    check_budget(budget)
    if isinstance(budget, float):
        return max(1, round(budget * num_visual))
    if budget > num_visual:
        raise InvalidParameterError(
            f"budget {budget} is larger than the {num_visual} visual tokens of this image; "
            f"use at most {num_visual} tokens (keep-all is the 'none' strategy) or a ratio in (0, 1]"
        )
    return budget
