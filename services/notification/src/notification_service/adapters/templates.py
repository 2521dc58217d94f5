"""Message templates: Jinja2, one pair of files per kind and language.

``<lang>/<kind>.txt`` holds the blocks ``subject``, ``push`` and ``text`` (plain text, not
escaped); ``<lang>/<kind>.html`` the HTML part (autoescaped: shopper-supplied values such as
product names can never inject markup). A language without a translation falls back to the
default language.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    TemplateNotFound,
    select_autoescape,
)
from jinja2.exceptions import TemplateError


class UnknownTemplate(LookupError):
    """No template for a kind in the wanted or the default language."""


class TemplateFailed(ValueError):
    """A template exists but cannot be rendered with the message's values."""


@dataclass(frozen=True)
class Rendered:
    """One message rendered in one language."""

    language: str
    subject: str
    text: str
    html: str
    push: str


class Templates:
    """Renders message kinds; ``directory`` replaces the packaged templates."""

    def __init__(self, default_language: str = "en", directory: str | None = None) -> None:
        root = (
            Path(directory) if directory else Path(str(files("notification_service") / "templates"))
        )
        self.default_language = default_language
        self.env = Environment(
            loader=FileSystemLoader(str(root)),
            autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
        )

    def languages_for(self, language: str | None) -> list[str]:
        """The languages to try, in order: ``de-CH`` -> ``de-CH``, ``de``, the default."""
        wanted = [language, language.split("-")[0]] if language else []
        return list(dict.fromkeys([*(w.lower() for w in wanted if w), self.default_language]))

    def render(self, kind: str, language: str | None, values: dict[str, Any]) -> Rendered:
        """Render ``kind`` in ``language`` (or the default language)."""
        for lang in self.languages_for(language):
            try:
                text_t = self.env.get_template(f"{lang}/{kind}.txt")
                html_t = self.env.get_template(f"{lang}/{kind}.html")
            except TemplateNotFound:
                continue
            context = {"language": lang, **values}
            try:
                blocks = {
                    name: "".join(text_t.blocks[name](text_t.new_context(context))).strip()
                    for name in ("subject", "push", "text")
                }
                html = html_t.render(context)
            except (TemplateError, KeyError) as exc:
                raise TemplateFailed(f"{lang}/{kind}: {exc}") from exc
            return Rendered(
                lang, " ".join(blocks["subject"].split()), blocks["text"], html, blocks["push"]
            )
        raise UnknownTemplate(f"no template {kind!r} in {self.languages_for(language)}")
