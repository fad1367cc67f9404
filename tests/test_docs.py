"""The examples in fastnote's docstrings run and print what they say (under the interpreter
without a GPU, so the kernels are what runs); every section of docs/ that the code cites exists,
and the links of the docs pages resolve."""
import doctest
import importlib
import os
import pkgutil
import re

import pytest

import fastnote

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(fastnote.__path__, "fastnote.")
    if not m.name.startswith("fastnote.triton_kernels") and m.name != "fastnote._C"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"


def test_examples_exist():
    # The public entry points carry examples: guards against the doctest run finding nothing.
    attempted = sum(doctest.testmod(importlib.import_module(n)).attempted for n in
                    ("fastnote.ops.hardswish", "fastnote.ops.squeeze_excitation", "fastnote.patch"))
    assert attempted >= 5


# ------------------------------------------------------------------------------------------------
# docs/: the project's design pages. Code cites them as "docs/ops.md section 4" or
# "docs/design.md section 3.1" (a citation may wrap onto the next line); every cited page and
# section must exist, and the pages' own relative links must resolve.
# ------------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
SOURCE_DIRS = ("fastnote", "triton_kernels", "csrc", "tests", "benchmarks", "examples", "scripts", "docs")
SOURCE_FILES = ("README.md", "setup.py", "pyproject.toml")
SUFFIXES = (".py", ".md", ".sh", ".cpp", ".cu", ".h", ".toml")
CITATION = re.compile(r"docs/([\w-]+\.md)(?:'s)?,?\s+section\s+(\d+(?:\.\d+)*)")
DOC_MENTION = re.compile(r"docs/([\w-]+\.md)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)
SECTION_NUMBER = re.compile(r"(\d+(?:\.\d+)*)\.?\s")
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Design documents that live outside the repository, which a reader cannot follow.
OUTSIDE = re.compile(r"\b(?:SPEC|DESIGN)\.md\b")


def _sources():
    paths = [os.path.join(ROOT, f) for f in SOURCE_FILES]
    for top in SOURCE_DIRS:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "results")]
            paths += [os.path.join(folder, f) for f in files if f.endswith(SUFFIXES)]
    return {os.path.relpath(p, ROOT): open(p, encoding="utf-8").read() for p in paths if os.path.isfile(p)}


def _headings(path):
    with open(path, encoding="utf-8") as f:
        return HEADING.findall(f.read())


def _section_numbers(path):
    return {m.group(1) for h in _headings(path) if (m := SECTION_NUMBER.match(h + " "))}


def _anchor(heading):
    """The anchor a markdown renderer (GitHub's rule) gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def test_cited_doc_sections_exist():
    cited, missing = 0, []
    for name, text in _sources().items():
        for doc in DOC_MENTION.findall(text):
            if not os.path.isfile(os.path.join(DOCS, doc)):
                missing.append(f"{name}: docs/{doc} does not exist")
        for doc, section in CITATION.findall(text):
            cited += 1
            path = os.path.join(DOCS, doc)
            if os.path.isfile(path) and section not in _section_numbers(path):
                missing.append(f"{name}: docs/{doc} has no section {section}")
    assert not missing, "\n".join(missing)
    assert cited >= 20, f"only {cited} citations of docs/ sections found: has the citation form changed?"


def test_docs_links_resolve():
    broken = []
    pages = [os.path.join(DOCS, f) for f in sorted(os.listdir(DOCS)) if f.endswith(".md")]
    assert pages, "docs/ has no pages"
    for page in pages + [os.path.join(ROOT, "README.md")]:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # external: not checked offline
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
            where = os.path.relpath(page, ROOT)
            if not os.path.exists(path):
                broken.append(f"{where}: {target} (no such file)")
            elif anchor and path.endswith(".md") and anchor not in {_anchor(h) for h in _headings(path)}:
                broken.append(f"{where}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_no_citations_of_documents_outside_the_repository():
    found = [f"{name}: {m.group(0)}" for name, text in _sources().items() for m in OUTSIDE.finditer(text)]
    assert not found, "cite docs/ops.md or docs/design.md instead:\n" + "\n".join(found)
