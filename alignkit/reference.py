"""The configuration reference (``docs/config-reference.md``), generated from the schemas.

Every stage kind's fields and every block they hold (``data``, ``heldout``, ``rollout.vllm``, …):
the key, its default and its docstring, which pydantic keeps as the field's description. A test
regenerates it and compares, so the reference cannot drift from the code:
``alignkit config-reference > docs/config-reference.md`` writes it again.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Mapping

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

HEADER = """# Configuration reference

Generated from the config schemas by `alignkit config-reference` (a test checks it is current).
Every stage has `name`, `kind` and `from` (the parent stage); a stage with a TRL trainer also
takes `train:`, its options passed to that trainer's config class. A block (`data:`,
`heldout:`, ...) is described once, under its own heading.
"""


def config_reference(stage_kinds: Mapping[str, type[BaseModel]]) -> str:
    """Markdown: one section per stage kind, then one per block the kinds hold."""
    blocks: dict[str, type[BaseModel]] = {}
    out = [HEADER]
    for kind, cls in stage_kinds.items():
        trainer = getattr(cls, "trainer_config", None)
        intro = " ".join(filter(None, [_doc(cls), f"`train:` → `{trainer}`." if trainer else ""]))
        out.append(f"## `{kind}`\n\n" + (f"{intro}\n\n" if intro else ""))
        out.append(_table(cls, blocks, skip={"kind", "name", "from_", "train"}))
    seen: set[str] = set()
    while len(seen) < len(blocks):
        for name, cls in sorted(blocks.items()):
            if name not in seen:
                seen.add(name)
                doc = _doc(cls)
                out.append(f"## block `{name}`\n\n" + (f"{doc}\n\n" if doc else ""))
                out.append(_table(cls, blocks, skip=set()))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out))


def _doc(cls: type) -> str:
    doc = inspect.getdoc(cls) if "__doc__" in vars(cls) and cls.__doc__ else ""
    return " ".join(doc.split())


def _table(cls: type[BaseModel], blocks: dict[str, type[BaseModel]], skip: set[str]) -> str:
    rows = ["| key | default | what it does |", "| --- | --- | --- |"]
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        block = _block_of(field)
        if block is not None:
            blocks.setdefault(block.__name__, block)
        default = _default(field)
        if block is not None:
            many = typing.get_origin(field.annotation) is list
            default = f"{'list of ' if many else ''}block `{block.__name__}`" + (
                f" or {default}" if default in ("`None`", "`[]`") else ""
            )
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{field.alias or name}` | {default} | {description} |")
    return "\n".join(rows) + "\n"


def _block_of(field: FieldInfo) -> type[BaseModel] | None:
    for candidate in (field.annotation, *typing.get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    return f"`{value!r}`".replace("|", "\\|")
