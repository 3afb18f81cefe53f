"""Typed sub-job configs: every key has a type, a default and a one-line help.

A sub-job declares its config as a dataclass, in the style of `run_clm.py`'s argument classes:

    @dataclass
    class Sampling:
        batch_size: int = option(32, "prompts per forward pass", minimum=1)
        style: Literal["nocot", "cot"] = option("nocot", "answer directly or step by step")

The annotation says how a value is read and checked: bool, int, float, str, `Literal[...]` (the
choices), `list[T]`, `dict[str, T]`, `T | None`, or another config dataclass (a nested mapping whose
keys are checked too). Values arrive typed (defaults, recipes, YAML files) or as `--set` text; both
go through `check_value`, so `bf16=true` is a bool, `bf16=maybe` an error naming the choices, and a
key no field declares is refused: nothing is accepted and dropped.
"""
import copy
import dataclasses
import types
import typing
from pathlib import Path

import yaml

from runner.errors import UserError

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def option(default, help: str, *, minimum=None, maximum=None, path: bool = False, config_file=None):
    """A config field. `minimum`/`maximum` bound numbers (and list lengths' elements); `path` marks a
    file path read relative to the working directory (stored absolute); `config_file` (a function
    (path, config so far) -> mapping of keys) marks a field naming a file whose keys form a layer of the config."""
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "path": path, "config_file": config_file}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def schema_fields(schema) -> dict:
    """name -> (dataclasses.Field, resolved type hint)."""
    hints = typing.get_type_hints(schema)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(schema)}


def defaults(schema) -> dict:
    """The schema's defaults as plain data (nested configs as mappings)."""
    return to_plain(schema())


def to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def describe_type(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is list:
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping with keys " + ", ".join(schema_fields(hint))
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else "''" if value == "" else str(value)


def _bad(where: str, value, hint, why: str = ""):
    return UserError(f"{where}={_show(value) if not isinstance(value, str) else value}: expected "
                     f"{describe_type(hint)}{why}")


def parse_text(raw: str, hint):
    """A `--set` value (text) read as `hint` wants: text stays text, everything else is YAML."""
    if hint is str:
        return raw
    origin = typing.get_origin(hint)
    if origin is typing.Literal and all(isinstance(a, (str, bool)) for a in typing.get_args(hint)):
        lowered = raw.strip().lower()
        for choice in typing.get_args(hint):
            if _show(choice).lower() == lowered:
                return choice
        return raw
    if hint is bool:
        lowered = raw.strip().lower()
        return True if lowered in TRUE else False if lowered in FALSE else raw
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def check_value(value, hint, where: str, field=None, base=None):
    """`value` checked (and normalised: ints to floats, nested mappings filled from `base` or the
    defaults) against `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # Optional[T]: T's own message (with its bounds)
            return check_value(value, others[0], where, field, base)
        for option_hint in others:
            try:
                return check_value(value, option_hint, where, field)
            except UserError:
                continue
        raise _bad(where, value, hint)
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise _bad(where, value, hint)
    if dataclasses.is_dataclass(hint):
        return check_mapping(value, hint, where, base)
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise _bad(where, value, hint)
        return [check_value(v, args[0], f"{where}[{i}]", field) for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _bad(where, value, hint)
        return {k: check_value(v, args[1], f"{where}.{k}", field) for k, v in value.items()} if args else value
    if hint is type(None):
        if value is None:
            return None
        raise _bad(where, value, hint)
    return _check_scalar(value, hint, where, field)


def _check_scalar(value, hint, where, field):
    given = value
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as text
            value = float(value)
        except ValueError:
            raise _bad(where, value, hint) from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is typing.Any:
        return value
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise _bad(where, value, hint)
    metadata = field.metadata if field is not None else {}
    if metadata.get("minimum") is not None and value < metadata["minimum"]:
        raise _bad(where, given, hint, f" >= {metadata['minimum']}")
    if metadata.get("maximum") is not None and value > metadata["maximum"]:
        raise _bad(where, given, hint, f" <= {metadata['maximum']}")
    if metadata.get("path") and value:
        value = str(Path(value).expanduser().resolve())
    return value


def check_mapping(value, schema, where: str, base: dict = None) -> dict:
    """A mapping for a nested config: unknown keys refused, missing ones keep `base` (or the defaults)."""
    if not isinstance(value, dict):
        raise _bad(where, value, schema)
    fields = schema_fields(schema)
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(fields)}")
    result = copy.deepcopy(base) if isinstance(base, dict) else defaults(schema)
    for key, item in value.items():
        field, hint = fields[key]
        result[key] = check_value(item, hint, f"{where}.{key}", field)
    return result


def nested_config(hint):
    """The config dataclass of a nested field (also inside Optional[...]), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def field_at(schema, dotted: str):
    """(field, hint) of a dotted key (nested configs), or None."""
    head, _, rest = dotted.partition(".")
    fields = schema_fields(schema)
    if head not in fields:
        return None
    field, hint = fields[head]
    if not rest:
        return field, hint
    return field_at(nested_config(hint), rest) if nested_config(hint) else None


def keys(schema, prefix: str = "") -> list:
    """Every settable key: each field, and each field of a nested config."""
    out = []
    for name, (_, hint) in schema_fields(schema).items():
        out.append(prefix + name)
        if nested_config(hint):
            out.extend(keys(nested_config(hint), f"{prefix}{name}."))
    return out


def assign(config: dict, schema, dotted: str, value, source: str) -> None:
    """Set a dotted key of `config` to `value`, checked against its field."""
    found = field_at(schema, dotted)
    if found is None:
        raise UserError(f"{source}: unknown key {dotted!r}; valid keys: {', '.join(keys(schema))}")
    field, hint = found
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        if node[part] is None:  # an unset Optional config: its keys start from the defaults
            node[part] = defaults(nested_config(field_at(schema, part)[1]))
        node = node[part]
    where = f"--set {dotted}" if source == "--set" else f"{source}: {dotted}"
    node[leaf] = check_value(value, hint, where, field, node.get(leaf))


def apply_layer(config: dict, schema, layer: dict, source: str) -> None:
    for key, value in layer.items():
        assign(config, schema, key, value, source)


def config_file_field(schema):
    """(name, loader) of the field whose file supplies a layer of keys, or None."""
    for name, (field, _) in schema_fields(schema).items():
        if field.metadata.get("config_file"):
            return name, field.metadata["config_file"]
    return None


def describe(schema, values: dict = None, indent: str = "  ") -> list:
    """One line per key: name, type, default (or the given value) and help."""
    values = defaults(schema) if values is None else values
    lines = []
    for name, (field, hint) in schema_fields(schema).items():
        if dataclasses.is_dataclass(hint):
            lines.append(f"{indent}{name}: {field.metadata['help']}")
            lines.extend(describe(hint, values[name], indent + "  "))
            continue
        shown = yaml.safe_dump(values[name], default_flow_style=True, width=10**6).strip()
        shown = shown[:-4].strip() if shown.endswith("...") else shown
        lines.append(f"{indent}{name} ({describe_type(hint)}) = {shown}: {field.metadata['help']}")
    return lines
