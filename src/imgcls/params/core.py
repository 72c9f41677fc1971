"""What every params section shares: strict sections, parsing with messages that name the key, the value
and the rule, and YAML read as DVC reads it. The values themselves live only in params.yaml (no defaults in
the schema): a key missing from the file is an error, not a silent default.

The file is read as YAML 1.2, as DVC reads it (``1e-3`` is a number; a duplicate key is an error). Every
section a stage reads is checked before it does any work: an unknown key (a typo such as ``trian.lr``), a
wrong type or an out-of-range value raises ``ParamsError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from ..errors import ParamsError

# The largest image side anything in the pipeline takes: params, checkpoints and model files alike. A model
# file claiming more is refused before any buffer is sized from it.
MAX_IMAGE_SIZE = 512
# The sections of params.yaml. A stage parses only those it reads, but any other name is a typo (``trian:``)
# that every stage refuses; project.Params has exactly these fields (tests/test_params.py checks).
SECTIONS = ("base", "data", "preprocess", "audit", "train", "evaluate", "export")
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # https://, file://, s3://: train paths are never URLs


def _tta_level(value: object) -> object:
    """true and false, the values before there were levels: all 6 views, and none."""
    return {True: "mirror_shifts", False: "none"}.get(value, value) if isinstance(value, bool) else value


# evaluate.tta and export.tta, test-time augmentation: none | mirror (2 views) | mirror_shifts (6 views); the
# views of each are imgcls.model.networks.TTA_LEVELS.
TTALevel = Annotated[Literal["none", "mirror", "mirror_shifts"], BeforeValidator(_tta_level)]


class Section(BaseModel):
    """One params.yaml section (or subsection)."""

    # strict: no "3" -> 3 or 1 -> True coercion; ints are still accepted where numbers (floats) are expected.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StageParams(BaseModel):
    """The sections one stage reads. Other sections are ignored here: the validate stage, first in dvc.yaml,
    checks the whole file, so a stage's code depends only on the schema of what it reads."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    def check(self) -> None:
        """Rules across keys of these sections; raises ParamsError."""


StageParamsT = TypeVar("StageParamsT", bound=StageParams)


def _allowed(field_info: Any) -> str:
    """The rule a field's value broke, from its description or its bounds: "8..512", "0 < x <= 10"."""
    if field_info.description:
        return field_info.description
    return _bounds_rule(field_info.metadata, field_info.annotation is int) or str(field_info.annotation)


def _bounds_rule(metadata: list, is_int: bool) -> str | None:
    """Bounds (annotated_types' Ge, Gt, Le, Lt) as a rule: "8..512", "0 < x <= 10"; None without any."""
    bounds = {}
    for item in metadata:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    if "ge" in bounds and "le" in bounds and is_int:
        return f"{bounds['ge']}..{bounds['le']}"
    lower = f"{bounds['ge']} <= " if "ge" in bounds else f"{bounds['gt']} < " if "gt" in bounds else ""
    upper = f" <= {bounds['le']}" if "le" in bounds else f" < {bounds['lt']}" if "lt" in bounds else ""
    return f"{lower}x{upper}" if lower or upper else None


def _field_info(root: type[BaseModel], loc: tuple) -> Any:
    model: Any = root
    info = None
    for part in loc:
        info = model.model_fields.get(part) if isinstance(part, str) and isinstance(model, type) else None
        if info is None:
            return None
        model = info.annotation
    return info


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxdict, _SHORT_REPR.maxlist = 2, 4, 4
_SHORT_REPR.maxstring, _SHORT_REPR.maxother = 80, 80

TYPE_NAMES = {
    "float_type": "a number",
    "int_type": "an integer",
    "bool_type": "true or false",
    "string_type": "a string",
    "model_type": "a mapping of keys to values",
    "dict_type": "a mapping",
}


def _field_path(loc: tuple, root: type[BaseModel]) -> tuple[tuple, bool]:
    """``loc`` without the member tags pydantic adds inside a union (``lr.constrained-float``), and whether
    there were any: the key a user wrote, and whether it also takes ``auto``."""
    for end in range(len(loc), 0, -1):
        info = _field_info(root, loc[:end])
        if info is not None:
            union = typing.get_origin(info.annotation) in (typing.Union, types.UnionType)
            return (loc[:end], True) if union and end < len(loc) else (loc, False)
    return loc, False


def _number_rule(union: Any) -> str | None:
    """The bounds of the number member of ``Annotated[float, Field(gt=0, le=10)] | Literal["auto"]``."""
    from pydantic.fields import FieldInfo

    for member in typing.get_args(union):
        if typing.get_origin(member) is typing.Annotated:
            number, *extras = typing.get_args(member)
            for extra in extras:
                if isinstance(extra, FieldInfo):
                    return _bounds_rule(extra.metadata, number is int)
    return None


def _describe_union_member(key: str, value: Any, error: dict, info: Any) -> str:
    """A value refused by every member of ``float | Literal["auto"]`` (a recipe key): the number's rule."""
    if error["type"] in TYPE_NAMES:
        return f"params: {key} = {show(value)} has the wrong type; expected auto or {TYPE_NAMES[error['type']]}"
    rule = _number_rule(info.annotation) or error["msg"]
    return f"params: {key} = {show(value)} is not allowed; expected auto or {rule}"


def _describe(error: dict, root: type[BaseModel]) -> str:
    loc, in_union = _field_path(error["loc"], root)
    key = ".".join(str(part) for part in loc)
    if in_union and error["type"] != "literal_error":
        return _describe_union_member(key, error.get("input"), error, _field_info(root, loc))
    value = error.get("input")
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _field_info(root, loc[:-1]).annotation if len(loc) > 1 else root
        return (
            f"params: unknown key {key!r} (value {show(value)}); {'.'.join(map(str, loc[:-1])) or 'params.yaml'} "
            f"allows: {', '.join(parent.model_fields)}"
        )
    if kind == "missing":
        return f"params: {key} is missing; params.yaml must set it (every key has its value there)"
    if kind in TYPE_NAMES:
        return f"params: {key} = {show(value)} has the wrong type; expected {TYPE_NAMES[kind]}"
    if kind == "literal_error":
        return f"params: {key} = {show(value)} is not allowed; expected one of {error['ctx']['expected']}"
    info = _field_info(root, loc)
    allowed = _allowed(info) if info is not None else error["msg"]
    return f"params: {key} = {show(value)} is not allowed; expected {allowed}"


def show(value: Any) -> str:
    """A value for a message, cut short: YAML aliases can make a small file hold an enormous structure."""
    return _SHORT_REPR.repr(value)


def _check_keys(raw: dict, prefix: str = "", seen: set[int] | None = None) -> None:
    seen = set() if seen is None else seen
    if id(raw) in seen:  # a mapping reached again through a YAML alias: checked once, not once per path
        return
    seen.add(id(raw))
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ParamsError(
                f"params: key {show(key)} in {prefix.rstrip('.') or 'params.yaml'} is not a name; "
                "keys are words such as train or lr"
            )
        if isinstance(value, dict):
            _check_keys(value, f"{prefix}{key}.", seen)


def parse_params(raw: Any, model: type[StageParamsT]) -> StageParamsT:
    """Validate the parsed params file's sections that ``model`` reads; the first problem raises
    ParamsError naming key, value and rule."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params: params.yaml must be a mapping of sections to keys, got {show(raw)}")
    try:
        _check_keys(raw)
    except RecursionError:
        raise ParamsError("params: params.yaml nests mappings thousands deep; it is not a params file") from None
    unknown = [key for key in raw if key not in SECTIONS]
    if unknown:
        raise ParamsError(
            f"params: unknown key {unknown[0]!r} (value {show(raw[unknown[0]])}); params.yaml allows: "
            f"{', '.join(SECTIONS)}"
        )
    try:
        params = model.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_describe(error.errors()[0], model)) from None
    params.check()
    return params


def read_yaml(path: Path) -> Any:
    """YAML 1.2 as DVC reads it: ``1e-3`` is a number, ``yes`` a string, and a duplicate key an error."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"params: {path} not found; run the stage from the project root") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise ParamsError(
            f"params: {path} is not a UTF-8 text file ({type(error).__name__}); save it as UTF-8"
        ) from None
    except (RecursionError, ValueError) as error:  # nesting thousands deep, integers of thousands of digits
        raise ParamsError(
            f"params: {path} cannot be read as params ({type(error).__name__}: {show(str(error))})"
        ) from None
    except YAMLError as error:
        problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ParamsError(f"params: {path} is not valid YAML: {problem or error}{where}") from None


def load_params(path: str | Path, model: type[StageParamsT]) -> StageParamsT:
    """Read params.yaml and validate the sections ``model`` reads."""
    return parse_params(read_yaml(Path(path)), model)


def as_dict(params: BaseModel) -> dict:
    """Plain nested dict of params (for checkpoints and logs)."""
    return params.model_dump()
