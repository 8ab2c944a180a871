"""Reading a plan's input file: YAML to a Fleet, with every failure turned into one PlanInputError.

Pydantic's own messages are accurate but list every error with internal locations; a person editing a
YAML file wants the first problem, named as they wrote it (``models[3] (bge-small).weights_gib``), with
what the field means and the value they gave.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from llmserve.planner.errors import PlanInputError
from llmserve.planner.schema import Fleet, GpuType, ModelSpec

_SECTIONS: dict[str, type[BaseModel]] = {"models": ModelSpec, "gpu_types": GpuType}


def load_fleet(path: str | Path) -> Fleet:
    """The Fleet in a YAML file; PlanInputError for a missing file, bad YAML or an invalid field."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanInputError("--models", f"no such file {str(path)!r}", "pass the path of a YAML file, e.g. "
                             "llmserve/planner/examples/a100-30-models.yaml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanInputError("--models", f"cannot read {str(path)!r}: {exc}", "pass a readable YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PlanInputError(str(path), f"invalid YAML{where}: {problem}", "fix the syntax there") from None
    return fleet_from_data(data, source=str(path))


def fleet_from_data(data: Any, source: str = "input") -> Fleet:
    """The Fleet in already-parsed data (a dict as the YAML file holds)."""
    if not isinstance(data, dict):
        raise PlanInputError(source, f"the file holds {type(data).__name__ if data is not None else 'nothing'}, "
                             "not a mapping", "write a mapping with a models: list (and optionally gpu_types:)")
    try:
        return Fleet.model_validate(data)
    except ValidationError as exc:
        # an unknown field first: a misspelt name is usually also why a required one is "missing"
        errors = sorted(exc.errors(), key=lambda e: e.get("type") != "extra_forbidden")
        raise _explain(errors[0], data, len(errors) - 1) from None


def _explain(error: Any, data: dict[str, Any], more: int) -> PlanInputError:
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    field = _field_name(loc, data)
    also = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if kind == "value_error":  # our own validators already say which field
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        return PlanInputError("", message + also)
    section = _SECTIONS.get(str(loc[0])) if len(loc) >= 3 else Fleet if len(loc) == 1 else None
    name = str(loc[-1]) if loc else ""
    if kind == "extra_forbidden":
        known = ", ".join(section.model_fields) if section is not None else ""
        return PlanInputError(field, f"unknown field {name!r}{also}",
                              f"remove it or fix its spelling{f'; the fields are: {known}' if known else ''}")
    meaning = _description(section, name)
    if kind == "missing":
        return PlanInputError(field, f"is required{also}", f"add {name}: <value>{f' ({meaning})' if meaning else ''}")
    got = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict | list) else ""
    message = str(error.get("msg", "is invalid"))
    message = message[0].lower() + message[1:] if message else message
    return PlanInputError(field, f"{message}{got}{also}", f"expected: {meaning}" if meaning else "")


def _field_name(loc: tuple[Any, ...], data: dict[str, Any]) -> str:
    """``('models', 3, 'weights_gib')`` as ``models[3] (bge-small).weights_gib``."""
    out = ""
    parent: Any = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            entry = parent[part] if isinstance(parent, list) and part < len(parent) else None
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                out += f" ({entry['name']})"
            parent = entry
        else:
            out += f".{part}" if out else str(part)
            parent = parent.get(part) if isinstance(parent, dict) else None
    return out


def _description(section: type[BaseModel] | None, name: str) -> str:
    if section is None or name not in section.model_fields:
        return ""
    return section.model_fields[name].description or ""
