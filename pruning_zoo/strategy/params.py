"""A strategy's parameters: a validated, frozen dataclass, built from user text or values, recorded as JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import pydantic
from pydantic.dataclasses import dataclass as params_dataclass

from pruning_zoo.errors import InvalidParameterError, closest
from pruning_zoo.inputs import parse_yaml, shown

__all__ = ["InLLMParams", "StrategyParams", "build_params", "describe_field", "param_schema", "params_as_dict",
           "params_dataclass", "parse_param_overrides"]


@params_dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))
class StrategyParams:
    """Base of every strategy's parameters: a validated, frozen dataclass.

    Subclass it with `@params_dataclass(frozen=True)`, give each field the paper's default and a
    `pydantic.Field(description=...)` that cites where the default comes from.
    """

    positions: Literal["keep", "renumber"] = pydantic.Field(
        default="renumber",
        description="position ids of kept tokens after a drop: 'keep' the original ones (gaps) or "
        "'renumber' them contiguously (M-RoPE: each image's kept tokens keep their 3-D layout and the tokens "
        "after it close the gap)",
    )


@params_dataclass(frozen=True)
class InLLMParams(StrategyParams):
    """Parameters of strategies that prune inside the LLM, whose budget can count two things."""

    budget_counts: Literal["after_pruning", "per_layer_average"] = pydantic.Field(
        default="after_pruning",
        description="what the budget counts: 'after_pruning' the visual tokens left after the last stage (how "
        "VisionZip's and DART's tables place FastV), 'per_layer_average' the average over all decoder layers "
        "(FLOPs-fair, how in-LLM papers compare)",
    )


def build_params(strategy: str, params_class: type[StrategyParams], values: Mapping[str, Any]):
    """Validate user-given parameter values (already typed, or strings from the CLI) into `params_class`."""
    known = [f.name for f in dataclasses.fields(params_class)]
    for key in values:
        if key not in known:
            suggestion = closest(key, known)
            hint = f"; did you mean {suggestion!r}?" if suggestion else ";"
            raise InvalidParameterError(
                f"strategy {strategy!r} has no parameter {key!r}{hint} its parameters: {', '.join(known)}"
            )
    # From the CLI a list comes as text, e.g. --param transprune.prune_layers=[7,9,12].
    values = {k: parse_yaml(v, f"parameter {strategy}.{k}") if isinstance(v, str) and v.strip().startswith("[") else v
              for k, v in values.items()}
    schema = param_schema(params_class)
    for key, value in values.items():  # pydantic's lax mode would take YAML's `true` as the number 1
        if isinstance(value, bool) and "boolean" not in str(schema.get(key)):
            raise InvalidParameterError(f"invalid value {value!r} for parameter {strategy}.{key}: a boolean is not "
                                        f"a number; allowed: {describe_field(params_class, key)}")
    try:
        return params_class(**values)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        if not first["loc"]:  # a rule across fields (a validator of the whole dataclass)
            raise InvalidParameterError(f"invalid parameters for strategy {strategy}: "
                                        f"{first['msg'].removeprefix('Value error, ')}") from None
        field = str(first["loc"][0])
        raise InvalidParameterError(
            f"invalid value {shown(first.get('input'))} for parameter {strategy}.{field}: {first['msg']}; "
            f"allowed: {describe_field(params_class, field)}"
        ) from None


def param_schema(params_class: type[StrategyParams]) -> dict[str, dict[str, Any]]:
    """JSON schema of each parameter (type, bounds, choices, default, description), by name."""
    return pydantic.TypeAdapter(params_class).json_schema()["properties"]


def params_as_dict(params: StrategyParams) -> dict[str, Any]:
    """Every parameter of a strategy (defaults included), JSON-ready: what a result records."""
    return pydantic.TypeAdapter(type(params)).dump_python(params, mode="json")


def describe_field(params_class: type[StrategyParams], field: str, default: bool = True) -> str:
    """A short phrase for what a parameter accepts, e.g. 'integer >= 1 (default 2)'."""
    schema = param_schema(params_class).get(field, {})
    if "enum" in schema:
        text = "one of " + ", ".join(repr(v) for v in schema["enum"])
    elif "const" in schema:
        text = repr(schema["const"])
    elif "anyOf" in schema:
        text = " or ".join(_describe_type(option) for option in schema["anyOf"])
    else:
        text = _describe_type(schema)
    if default and "default" in schema:
        text += f" (default {schema['default']!r})"
    return text


def _describe_type(schema: Mapping[str, Any]) -> str:
    text = schema.get("type", "value")
    bounds = [
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
    ]
    for key, symbol in bounds:
        if key in schema:
            text += f" {symbol} {schema[key]}"
    if "enum" in schema:
        text = "one of " + ", ".join(repr(v) for v in schema["enum"])
    return text


def parse_param_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """['fastv.k=3', 'random.seed=1'] -> {'fastv': {'k': '3'}, 'random': {'seed': '1'}}."""
    overrides: dict[str, dict[str, str]] = {}
    for item in items:
        target, equals, value = item.partition("=")
        strategy, dot, key = target.partition(".")
        if not (equals and dot and strategy and key):
            raise InvalidParameterError(
                f"--param {item!r} is not STRATEGY.PARAMETER=VALUE; for example --param fastv.k=3"
            )
        overrides.setdefault(strategy.strip(), {})[key.strip()] = value.strip()
    return overrides
