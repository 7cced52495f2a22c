"""Checking LazyConfig overrides ("key=value", as train_net.py and the detector prompt source take
them) before they are applied: detectron2's `LazyConfig.apply_overrides` adds any key it is given,
so a misspelled key would be silently ignored, and a value of the wrong type would fail much later.
"""
import difflib
import inspect
from typing import Any, List

from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf


def _accepts(target: Any, name: str) -> bool:
    """Whether the callable a LazyCall node builds takes an argument `name` (by name, or through
    **kwargs that its parent classes' constructors name)."""
    if isinstance(target, str):
        try:
            target = locate(target)
        except Exception:
            return False
    classes = inspect.getmro(target) if inspect.isclass(target) else (target,)
    for c in classes:
        try:
            params = inspect.signature(c.__init__ if inspect.isclass(c) else c).parameters
        except (TypeError, ValueError):
            return False
        if name in params:
            return True
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return False
    return False


def _type_problem(old: Any, new: Any) -> str:
    """Why `new` cannot replace `old` ("" if it can): numbers stay numbers, booleans booleans,
    lists lists and nodes nodes; strings, None and interpolations take anything."""
    if isinstance(old, bool):
        return "" if isinstance(new, bool) else "a boolean (True or False)"
    if isinstance(old, int):
        return "" if isinstance(new, int) and not isinstance(new, bool) else "an integer"
    if isinstance(old, float):
        return "" if isinstance(new, (int, float)) and not isinstance(new, bool) else "a number"
    if isinstance(old, (list, tuple, ListConfig)):
        return "" if isinstance(new, (list, tuple, ListConfig)) else "a list, e.g. [a,b]"
    if isinstance(old, (dict, DictConfig)):
        return "" if isinstance(new, (dict, DictConfig)) else "a config node"
    return ""


def check_overrides(cfg, overrides: List[str], config_file: str = "") -> None:
    """Refuse, before anything runs, overrides whose key the config does not have (detectron2 would
    add it silently: a misspelled key would be ignored) or whose value has the wrong type (it would
    fail much later, deep inside training). A key that is an argument of the object its node
    builds may be added; `+key=value` adds any key on purpose."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    problems = []
    for text, o in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        key, value = o.key_or_group, o.value()
        if o.is_add():
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if not OmegaConf.is_config(node) or leaf not in node:
            if OmegaConf.is_dict(node) and "_target_" in node and _accepts(node["_target_"], leaf):
                continue
            known = [str(k) for k in node.keys()] if OmegaConf.is_dict(node) else []
            close = difflib.get_close_matches(leaf, known, n=3)
            hint = f" Did you mean {', '.join(f'{parent}.{c}' if parent else c for c in close)}?" if close else (
                f" Keys of {parent or 'the config'}: {', '.join(known[:12])}." if known else "")
            problems.append(f"unknown key {key!r} (in {text!r}).{hint} To add a new key on purpose, write +{text}.")
            continue
        old = node._get_node(leaf)._value() if OmegaConf.is_dict(node) else None
        if isinstance(old, str) and old.startswith("${"):
            continue  # an interpolation: its type is the target's
        why = _type_problem(old, value)
        if why:
            problems.append(f"{key}={value!r} (in {text!r}): {key} is {old!r}, so the value must be {why}.")
    if problems:
        where = f" for {config_file}" if config_file else ""
        raise ValueError(f"Refused LazyConfig override{'s' if len(problems) > 1 else ''}{where}: " + " ".join(problems))
