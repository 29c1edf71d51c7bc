"""The README and docs/ point at what exists: every relative link reaches a file (and its heading,
when it names one), and every repository path or dotted module name they quote is there."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PACKAGES = ("protocol", "infra", "generator_service", "trainer", "experiments", "benchmarks", "tests", "docs")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(rf"^(?:{'|'.join(PACKAGES)})/[\w./*-]*$")
DOTTED = re.compile(rf"^((?:{'|'.join(PACKAGES[:-2])})(?:\.\w+)+)")


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (shell and Python examples name paths of a run)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", _prose(page), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.replace("`", "").strip().lower()).replace(" ", "-") for h in headings}


def test_every_page_is_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "design.md", "workflows.md", "recipe.md", "metrics.md"} <= names, names


def test_every_relative_link_reaches_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target in LINK.findall(_prose(page)):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s):, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.is_file():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_quoted_repository_path_exists():
    missing = []
    for page in PAGES:
        for text in CODE.findall(_prose(page)):
            if REPO_PATH.match(text) and not any(REPO.glob(text.rstrip("/"))):
                missing.append(f"{page.relative_to(REPO)}: {text}")
    assert not missing, "\n".join(missing)


def test_every_quoted_module_name_resolves():
    """``trainer.loop.train``: the longest module prefix is a file, and the next name is in it."""
    missing = []
    for page in PAGES:
        for text in CODE.findall(_prose(page)):
            match = DOTTED.match(text)
            if not match:
                continue
            parts = match.group(1).split(".")
            for cut in range(len(parts), 0, -1):
                base = REPO.joinpath(*parts[:cut])
                module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
                if module.is_file():
                    break
            else:
                missing.append(f"{page.relative_to(REPO)}: {text}")
                continue
            rest = parts[cut:]
            if rest and rest[0] not in module.read_text():
                missing.append(f"{page.relative_to(REPO)}: {text}")
    assert not missing, "\n".join(missing)


def _imports(block: str) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from X import ...`` in a block, parenthesized lists included."""
    code = re.sub(r"#.*", "", block)
    found = []
    for module, group, line in re.findall(r"^from ([\w.]+) import (?:\(([^)]*)\)|(.*))$", code, re.M):
        found.append((module, re.findall(r"\b[A-Za-z_]\w*\b", group or line)))
    return found


def test_every_python_example_imports_from_a_module_that_has_the_names():
    """The ``from X import a, b`` lines of the pages' Python blocks name real modules and names."""
    wrong = []
    for page in PAGES:
        for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M):
            for module, names in _imports(block):
                base = REPO.joinpath(*module.split("."))
                path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
                text = path.read_text() if path.is_file() else ""
                assert names, f"{page.relative_to(REPO)}: from {module} import: no names read"
                wrong += [f"{page.relative_to(REPO)}: from {module} import {name}" for name in names
                          if not re.search(rf"\b{name}\b", text)]
    assert not wrong, "\n".join(wrong)
