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


SECTIONS = ("suite", "data", "student", "routes", "method", "execution", "optim", "eval", "tracking", "cluster", "services")
FILE_SUFFIXES = (".py", ".md", ".yaml", ".json", ".png")  # `suite.py` names a file, not a key
WRONG_ON_PURPOSE = "<!-- wrong key on purpose -->"  # beside an error example's deliberate typo (`optim.lrr`)


def reference_patterns(page: str) -> list[re.Pattern]:
    """The generated reference's keys and every section above them (`routes.<name>` of `routes.<name>.weight`) as
    patterns: `<name>` any one segment, `[]` a list's index (or its placeholder)."""
    keys = re.findall(r"^\| `([^`]+)`", page, re.M)
    sections = {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 2)}
    out = []
    for key in sorted(sections):
        parts = re.split(r"(<[^>]+>|\[\])", key)
        body = "".join(r"[^.\s]+" if p.startswith("<") else r"(\[\]|\.\d+|\.<[^>]+>|\.\{i\})" if p == "[]" else re.escape(p)
                       for p in parts if p)
        out.append(re.compile(body + "$"))
    return out


def keys_named(text: str, quoted: bool = True) -> list[tuple[int, str]]:
    """(line, key) of every configuration key the text names: in backticks (`optim.lr`, `cluster.memory_check: warn`), or
    anywhere in plain text (`quoted` false: the reference's descriptions)."""
    key = r"(?:%s)\.[A-Za-z0-9_.<>\[\]{}-]*[A-Za-z0-9_>\]}]" % "|".join(SECTIONS)
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        if WRONG_ON_PURPOSE in line:
            continue
        tokens = re.findall(r"`([^`]+)`", line) if quoted else [line]
        found += [(n, m) for t in tokens for m in re.findall(rf"(?:^|(?<=[\s(]))({key})", t)
                  if (not quoted or t.startswith(m)) and not m.endswith(FILE_SUFFIXES)]
    return found


def unknown_keys(docs: list[Path], reference: Path) -> list[tuple[str, str]]:
    """(where, key) of each key named in `docs`, or in the reference's descriptions, that the reference does not have."""
    page = reference.read_text()
    patterns = reference_patterns(page)
    bad = [(f"{f.name}:{n}", k) for f in docs for n, k in keys_named(f.read_text()) if not any(p.match(k) for p in patterns)]
    descriptions = "\n".join(row.split(" | ")[-1] for row in page.splitlines() if row.startswith("| `"))
    return bad + [(f"a description in {reference.name}", k) for _, k in keys_named(descriptions, quoted=False)
                  if not any(p.match(k) for p in patterns)]


def test_every_configuration_key_the_docs_name_exists():
    """A key the docs present as one (a dotted name in backticks under a known section, and any in the config's own
    descriptions) is in the generated reference: a renamed or vanished key fails here (before: `eval.guidance_scale`,
    named by docs/method.md and by method.student_cfg_scale's description, existed nowhere)."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert unknown_keys(docs, ROOT / "docs" / "reference" / "config.md") == []


def test_the_docs_key_check_finds_a_vanished_key(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Set `optim.lr`, `routes.t2i.teacher.loras`, `data.sources.0.path`, `cluster.memory_check: warn`; and "
                    f"`eval.guidance_scale`.\nBad input: `optim.lrr: Extra inputs are not permitted` {WRONG_ON_PURPOSE}\n")
    assert unknown_keys([page], ROOT / "docs" / "reference" / "config.md") == [("page.md:1", "eval.guidance_scale")]
