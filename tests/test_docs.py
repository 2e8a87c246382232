"""The README and docs/ stay true to the repository: every relative link resolves (anchors against the target's
headings), the pages the README promises exist, every `file.py:name` in docs/reading.md names a function or class
that the file defines (read with ast, never imported), every `tests/test_x.py::test_name` the docs cite exists, and
the README's first 40 lines hold the two commands and where the results go. Text only: no training, well under a
second."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("recipes", "data", "scale", "faults", "results", "reading", "assignments")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def without_code(text):
    """The text with fenced code blocks and inline code removed: a link inside code is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M)}


def links(page):
    """(target path or None for the page itself, anchor or None) of each relative link on the page."""
    for target in LINK.findall(without_code(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        yield (page.parent / path).resolve() if path else page, anchor or None


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for path, anchor in links(page):
        if not path.exists():
            broken.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{path.name}#{anchor}: no such heading")
    assert not broken, f"{page.name}: {broken}"


def test_the_docs_pages_exist_and_the_readme_links_each():
    readme = ROOT / "README.md"
    linked = {path for path, _ in links(readme)}
    for name in PAGES:
        page = ROOT / "docs" / f"{name}.md"
        assert page.is_file() and page.read_text().strip(), f"docs/{name}.md is missing or empty"
        assert page.resolve() in linked, f"README.md does not link docs/{name}.md"


def defined(path):
    """Every name `path` defines at the top (functions, classes, assignments) and Class.method for its classes'
    functions, from its syntax tree: the file is not imported."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_every_name_in_reading_md_exists():
    text = (ROOT / "docs" / "reading.md").read_text()
    cited = set(re.findall(r"(?<![\w/.])([\w/]+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", text))
    assert len(cited) >= 20, f"reading.md names only {len(cited)} functions: the regex or the page is broken"
    missing = sorted(f"{file}:{name}" for file, name in cited
                     if not (ROOT / file).is_file() or name not in defined(ROOT / file))
    assert not missing, f"docs/reading.md names what the code does not define: {missing}"


def test_every_test_the_docs_cite_exists():
    cited = {(file, name) for page in DOCS
             for file, name in re.findall(r"(tests/\w+\.py)::(\w+)", page.read_text())}
    missing = sorted(f"{file}::{name}" for file, name in cited
                     if not (ROOT / file).is_file() or name not in defined(ROOT / file))
    assert not missing, f"the docs cite tests that do not exist: {missing}"


def test_the_readme_starts_with_the_commands_and_where_results_go():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    for needed in ("pip install -r requirements.txt", "python fewshot.py", "python -m pytest", "runs/fewshot"):
        assert needed in head, f"README.md's first 40 lines lack {needed!r}"
