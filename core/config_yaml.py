"""Read a YAML topology file strictly: syntax errors and duplicate keys become ConfigErrors.

PyYAML silently keeps the last of two equal keys, which hides exactly the kind of copy-paste slip
a topology file invites (two ``kv_cache:`` blocks under one pool), so the loader refuses them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from core.config_errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    pass


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError([f"{key}: duplicate key (line {line})"])
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def load_yaml_mapping(path: str | Path) -> object:
    text = Path(path).read_text()
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(exc.problems, str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"<yaml>: {exc}"], str(path)) from None
