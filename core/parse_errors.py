"""One line out of jsonargparse's error tree for a bad plugin, callback or data argument.

jsonargparse reports a wrong value inside a list of subclasses (``model.plugins``,
``trainer.callbacks``) as a tree: every type of the Union it tried, what each said, the value
given. The useful line is one leaf of it, often the fifth or sixth line, below some 60 lines
of usage. :func:`summarize_parse_error` finds that leaf and names what it is about: "plugin EMA
(model.plugins), argument 'decay': Expected a <class 'float'>. Got value: abc". Plain text in,
plain text out: no parser object is needed, so it is tested on jsonargparse's own messages.
"""

from __future__ import annotations

import importlib
import inspect
import re

_TOP_KEY = re.compile(r'^Parser key "([^"]+)":')
_CLASS_PROBLEM = re.compile(r"^- Problem with given class_path '([^']+)':$")
_NESTED_KEY = re.compile(r'^Parser key "([^"]+)":$')
_UNKNOWN_CLASS = re.compile(r"^- Expected a dot import path string: (\S+)$")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_KINDS = {"model.plugins": "plugin", "trainer.callbacks": "callback", "data": "data module"}


def summarize_parse_error(message: str, known_classes: dict[str, list[str]] | None = None) -> str | None:
    """The one line that says what is wrong, or None when ``message`` is not such a tree.

    ``known_classes`` maps a key (``"model.plugins"``) to the class names it accepts by short
    name, listed when a name is unknown.
    """
    lines = [line.strip() for line in message.strip().splitlines()]
    top = _TOP_KEY.match(lines[0]) if lines else None
    if top is None:
        return None
    key = top.group(1)
    if len(lines) == 2:  # a plain option: "Parser key "trainer.max_steps":" and what is wrong
        return f"{key}: {lines[1]}"
    kind = _KINDS.get(key, "class")
    for i, line in enumerate(lines):
        problem = _CLASS_PROBLEM.match(line)
        if problem is not None:  # the first class tried is the one the user named
            return _class_problem(kind, key, problem.group(1), lines[i + 1 :])
    for line in lines:
        unknown = _UNKNOWN_CLASS.match(line)
        if unknown is not None:
            name = unknown.group(1)
            known = (known_classes or {}).get(key)
            listing = f"; the known ones: {', '.join(sorted(known))}" if known else ""
            return f"{key}: '{name}' is not a known {kind} class name or import path{listing}"
    return None


def _class_problem(kind: str, key: str, class_path: str, rest: list[str]) -> str:
    where = f"{kind} {class_path.rsplit('.', 1)[-1]} ({key})"
    if not rest:
        return where
    nested = _NESTED_KEY.match(rest[0])
    if nested is not None and len(rest) > 1:
        return f"{where}, argument '{nested.group(1)}': {rest[1]}"
    leaf = rest[0]
    not_accepted = _NOT_ACCEPTED.match(leaf)
    if not_accepted is not None:
        accepted = _init_arguments(class_path)
        if accepted:
            leaf += f"; it takes: {', '.join(accepted)}"
    return f"{where}: {leaf}"


def _init_arguments(class_path: str) -> list[str]:
    """The constructor's named arguments of the class at ``class_path`` (empty if not importable)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in named and p.name != "self"]
