"""YAML loading that remembers the line of every key and item, so errors can name it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from milter.errors import Problem, RulesError

Path_ = tuple[str | int, ...]


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[Path_, int]]:
    """Parse a YAML file into plain data plus a map from each value's path to its 1-based line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError([Problem(path, None, f"cannot read: {exc}")]) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[Path_, int] = {}
        data = _build(loader, node, (), lines) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        reason = f"not valid YAML: {exc.problem or exc.context}"
        # The parser notices a mistake where it gives up, often a line after the typo;
        # the construct it was reading says where to look.
        if exc.context and exc.context_mark and exc.context_mark.line + 1 != line:
            reason += f" ({exc.context} that started on line {exc.context_mark.line + 1})"
        raise RulesError([Problem(path, line, reason)]) from None
    except yaml.YAMLError as exc:
        raise RulesError([Problem(path, None, f"not valid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    return data, lines


def _build(loader: yaml.SafeLoader, node: yaml.Node, at: Path_, lines: dict[Path_, int]) -> Any:
    # Walk the composed node tree ourselves: constructed dicts and lists lose their marks.
    lines[at] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        loader.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise yaml.MarkedYAMLError(
                    problem="a key must be a plain value", problem_mark=key_node.start_mark
                )
            if key in out:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
            child: Path_ = (*at, str(key))
            out[key] = _build(loader, value_node, child, lines)
            lines[child] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, (*at, i), lines) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def line_for(lines: dict[Path_, int], loc: tuple[str | int, ...]) -> int | None:
    """The line of the deepest known prefix of a location (pydantic error locs go deeper than the file)."""
    for n in range(len(loc), -1, -1):
        key = tuple(str(p) if not isinstance(p, int) else p for p in loc[:n])
        if key in lines:
            return lines[key]
    return None
