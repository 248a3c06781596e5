"""The documentation: the generated reference pages match the code they are generated from (a changed field
description makes the page stale until `make docs-reference`), every configuration key is described, and the README
stays a short entry point whose links and demo console are real. `make test` builds the site itself with
`mkdocs build --strict` (a broken link or anchor fails it)."""

import re
from pathlib import Path

from danceopd.config import TrainConfig
from danceopd_cli.docs_reference import render_config, stale_pages, undocumented_keys

ROOT = Path(__file__).resolve().parents[1]


def test_the_generated_reference_pages_are_current():
    assert stale_pages() == [], "a config model or an endpoint changed: run `make docs-reference` and commit docs/reference/"


def test_a_changed_field_description_makes_the_config_reference_stale(monkeypatch):
    field = TrainConfig.model_fields["steps"]
    page = (ROOT / "docs" / "reference" / "config.md").read_text()
    assert f"| `steps` | int | `600` | {field.description} |" in page
    monkeypatch.setattr(field, "description", "optimizer updates, said differently")
    assert "| `steps` | int | `600` | optimizer updates, said differently |" in render_config()
    assert "reference/config.md" in stale_pages()


def test_every_configuration_key_has_a_description():
    assert undocumented_keys() == []


def test_the_readme_is_a_short_entry_point_with_working_links():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\(((?:docs/)[^)#]+)(?:#[^)]*)?\)", readme)
    assert len(links) >= 10
    assert [link for link in links if not (ROOT / link).exists()] == []


def console_block(text: str) -> str:
    return re.search(r"Its console, on a 2-core machine:\n\n```text\n(.*?)```", text, re.S).group(1)


def test_the_readme_and_the_quickstart_show_the_same_demo_console():
    readme, quickstart = (ROOT / "README.md").read_text(), (ROOT / "docs" / "quickstart.md").read_text()
    assert console_block(readme) == console_block(quickstart)
    assert "step   " in console_block(readme) and "report: " in console_block(readme)
