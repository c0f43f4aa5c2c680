"""The manual in docs/method.md: every "method.md section N" / "method.md N.N" reference resolves to a heading."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANUAL = ROOT / "docs" / "method.md"
# "method.md 5.4", "method.md section 6", "method.md sections 3, 7, 8, 9", "method.md §11.2", "method.md 5.1."
REFERENCE = re.compile(r"method\.md,?\s+(?:sections?\s+|§\s*)?(\d+(?:\.\d+)?(?:(?:\s*,\s*|\s+and\s+)\d+(?:\.\d+)?)*)")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", re.MULTILINE)


def _sources():
    for folder in ("src", "docs", "benchmarks", "tests", "scripts"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".yaml", ".sh") and path.is_file():
                yield path
    yield ROOT / "README.md"


def _references():
    for path in _sources():
        for match in REFERENCE.finditer(path.read_text()):
            for number in re.split(r"\s*,\s*|\s+and\s+", match.group(1)):
                yield path.relative_to(ROOT), number


def test_manual_sections_exist():
    sections = set(HEADING.findall(MANUAL.read_text()))
    for n in ("3", "5.3", "5.4", "6", "7", "8", "9", "10.1", "10.2", "11.1", "11.2", "11.3", "12.3", "12.4", "12.5"):
        assert n in sections, n


def test_every_method_md_reference_resolves():
    sections = set(HEADING.findall(MANUAL.read_text()))
    refs = list(_references())
    assert len(refs) > 100  # the references are found at all (presets alone hold many)
    missing = sorted({f"{path}: method.md {n}" for path, n in refs if n not in sections})
    assert not missing, "references to sections docs/method.md does not have:\n" + "\n".join(missing)


def test_reference_pattern_reads_the_forms_in_use():
    found = [m.group(1) for m in REFERENCE.finditer("method.md 5.1. x method.md sections 3, 7, 8, 9 and method.md §11.2 "
                                                   "(method.md 11.2 (b)) method.md section 6")]
    assert found == ["5.1", "3, 7, 8, 9", "11.2", "11.2", "6"]
