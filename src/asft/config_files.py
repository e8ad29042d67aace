"""Reading config files strictly: a key repeated in one mapping is an error, not a silent overwrite.

PyYAML (and Snakemake's own loader) keep the last of repeated keys, so a mode row written twice would lose the
first without a word. Also home of ConfigError and the dotted key paths every config message uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem, reported with the file and the dotted key that is wrong."""


def key_path(path: Any) -> str:
    parts = []
    for part in path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).lstrip(".") or "<top level>"


def check_config_files(paths: Iterable[str | Path]) -> None:
    """Re-read config files with the strict loader: Snakemake's own loader keeps the last of repeated keys."""
    for path in paths:
        read_config_file(path)


def read_config_file(path: str | Path) -> Any:
    """Parse a config file as Snakemake does (JSON first, then YAML), but refuse a key repeated in one mapping.

    Raises ConfigError naming the file, the key path and (for YAML) the lines of both occurrences.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err}") from err
    try:
        return _read_json(text, path)
    except json.JSONDecodeError:
        pass
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except _DuplicateKeys as err:
        raise ConfigError(f"{path}: invalid configuration:\n  " + "\n  ".join(err.problems)) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    finally:
        loader.dispose()


def _read_json(text: str, path: Path) -> Any:
    repeated: list[tuple[dict, str]] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict:
        obj: dict = {}
        for key, value in pairs:
            if key in obj:
                repeated.append((obj, key))
            obj[key] = value
        return obj

    data = json.loads(text, object_pairs_hook=pairs_hook)
    if repeated:
        paths = {id(obj): keys for keys, obj in _mappings(data)}
        problems = [f"{key_path([*paths[id(obj)], key])}: duplicate key" for obj, key in repeated]
        raise ConfigError(f"{path}: invalid configuration:\n  " + "\n  ".join(problems))
    return data


def _mappings(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """Every mapping in a parsed document, with its key path."""
    if isinstance(value, dict):
        yield path, value
        for key, item in value.items():
            yield from _mappings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _mappings(item, (*path, index))


class _DuplicateKeys(yaml.YAMLError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping: PyYAML silently keeps the last value, so a mode row
    written twice would lose the first without a word.

    Checked on the node tree before anything is constructed, where each mapping still has only its own keys
    (merge keys `<<:` are expanded later, and may legitimately be overridden).
    """

    def construct_document(self, node: yaml.Node) -> Any:
        problems: list[str] = []
        self._find_duplicates(node, (), set(), problems)
        if problems:
            raise _DuplicateKeys(problems)
        return super().construct_document(node)

    def _find_duplicates(self, node: yaml.Node, path: tuple, seen: set[int], problems: list[str]) -> None:
        if id(node) in seen:  # an alias of a node already checked (or a recursive one)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._find_duplicates(item, (*path, index), seen, problems)
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._find_duplicates(value_node, path, seen, problems)
                    continue
                if not isinstance(key_node, yaml.ScalarNode):  # a collection as a key: the constructor refuses it
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    problems.append(
                        f"{key_path([*path, key])}: duplicate key on line {line} (first on line "
                        f"{first_line[key]}; YAML would keep only the last)"
                    )
                else:
                    first_line[key] = line
                self._find_duplicates(value_node, (*path, key), seen, problems)
