"""mkdocs hook: the configuration reference, generated from pathflow's one pydantic config model at build
time, so it can never drift from the code (``<!-- config-reference -->`` in a page is replaced)."""

from __future__ import annotations

import json
import typing

MARKER = "<!-- config-reference -->"


def _type(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = text.replace("typing.", "").replace("NoneType", "null").replace("Optional[", "null | [")
    for lit in ("Literal[",):
        text = text.replace(lit, "one of [")
    return text


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.is_required():
        return "required"
    else:
        value = field.default
    return json.dumps(value, ensure_ascii=False)


def reference() -> str:
    from pathflow.config import Config

    out = []
    for section, f in Config.model_fields.items():
        model = typing.get_args(f.annotation)[0] if typing.get_args(f.annotation) else f.annotation
        out += [f"### `{section}`", "", "| key | type | default | what it is |", "|---|---|---|---|"]
        for key, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            typ = _type(field.annotation).replace(" | ", " or ")
            out.append(f"| `{section}.{key}` | `{typ}` | `{_default(field)}` | {desc} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown
