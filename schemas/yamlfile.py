"""Reading pipeline YAML safely: duplicate keys are errors, aliases cannot blow up, only text files.

PyYAML's ``safe_load`` keeps the last of two equal keys (the first is silently lost) and
builds aliases as shared references, so ten nested aliases of ten items each load in
microseconds but expand to 10^10 values when the params are hashed or written as JSON.
``load_yaml`` refuses both, naming the key and lines or the expanded size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_VALUES = 1_000_000  # values a pipeline file may expand to (the default pipeline has ~100)
MAX_BYTES = 16 * 2**20  # a pipeline file is text of a few KB
MAX_DEPTH = 64  # levels of nested lists/mappings (the default pipeline has 4; JSON hashing stops near 250)


class YamlProblem(ValueError):
    """What is wrong with a YAML text, in words (the caller adds the file)."""


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key repeated in one mapping (merge keys ``<<`` still override)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeConstructor reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise YamlProblem(f"duplicate key {key!r} on lines {first} and {key_node.start_mark.line + 1} "
                                  "(YAML keeps only the last; remove one)")
        return super().construct_mapping(node, deep=deep)


def expanded_size(value: Any, limit: int = MAX_VALUES, max_depth: int = MAX_DEPTH) -> int:
    """How many values ``value`` holds once every alias is written out (linear time: shared
    sub-trees are counted once and multiplied). Raises ``YamlProblem`` above ``limit``, for lists
    and mappings nested deeper than ``max_depth``, or for a structure that contains itself."""
    seen: dict[int, tuple[int, int]] = {}  # id -> (expanded size, height)
    active: set[int] = set()

    def size(node: Any) -> tuple[int, int]:
        if not isinstance(node, (dict, list)):
            return 1, 0
        key = id(node)
        if key in seen:
            return seen[key]
        if key in active:
            raise YamlProblem("an alias refers to a mapping or list that contains it (a recursive structure)")
        active.add(key)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total, height = 1, 0
        for child in children:
            n, h = size(child)
            total, height = total + n, max(height, h + 1)
            if total > limit:
                raise YamlProblem(f"aliases expand to more than {limit:,} values (an alias bomb?); "
                                  "write the values out or use fewer nested aliases")
            if height > max_depth:
                raise YamlProblem(f"lists and mappings nested more than {max_depth} levels deep")
        active.discard(key)
        seen[key] = (total, height)
        return seen[key]

    return size(value)[0]


def load_yaml(text: str) -> Any:
    """Parse YAML text with the checks above; ``YamlProblem`` or ``yaml.YAMLError`` on failure."""
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506  a SafeLoader subclass
        expanded_size(value)
    except RecursionError:
        raise YamlProblem(f"lists and mappings nested more than {MAX_DEPTH} levels deep") from None
    return value


def read_text(path: Path) -> str:
    """A pipeline file's text; ``YamlProblem`` for a folder, a binary file or a huge one."""
    path = Path(path)
    if path.is_dir():
        raise YamlProblem("is a folder, not a pipeline file (pass a .yaml file)")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise YamlProblem(f"{size:,} bytes: too large for a pipeline file (at most {MAX_BYTES:,})")
        data = path.read_bytes()
    except OSError as exc:
        raise YamlProblem(f"cannot read ({exc.strerror or exc})") from None
    if b"\0" in data:
        raise YamlProblem("a binary file, not YAML text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlProblem(f"not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
