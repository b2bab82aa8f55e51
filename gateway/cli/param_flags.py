"""Command-line flags generated from a pydantic hyperparameter model (`lethe unlearn`, `lethe teach`),
so a hyperparameter has one definition: its field, with its bounds and description.

Hand-written rather than pydantic-settings' CLI source, which splits list values on commas and
would cut a regular expression such as `a\\d{1,2}` in two (see `gateway/cli/unlearn.py`).
Unset flags stay out of the result, so the model's own defaults apply.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

PREFIX = "param__"


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(get_origin(a) is list for a in get_args(annotation))


def add_param_flags(parser: argparse.ArgumentParser, model: type[BaseModel], title: str) -> None:
    """One `--flag` per field (by its alias where it has one, e.g. `--lambda`)."""
    group = parser.add_argument_group(title)
    for name, field in model.model_fields.items():
        key = field.alias or name
        extra: dict[str, Any] = {"nargs": "+"} if _is_list(field.annotation) else {}
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        group.add_argument(
            f"--{key.replace('_', '-')}",
            dest=PREFIX + key,
            metavar=key.upper(),
            choices=choices or None,
            help=f"{field.description} [default: {field.default}]",
            **extra,
        )


def param_values(args: argparse.Namespace, prefix: str = PREFIX) -> dict[str, Any]:
    """The values given on the command line for the flags whose `dest` starts with `prefix`, by
    field name or alias, to validate."""
    return {
        name.removeprefix(prefix): value
        for name, value in vars(args).items()
        if name.startswith(prefix) and value is not None
    }
