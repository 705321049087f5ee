"""The repository stands on its own: no pointer leaves it, and no link in its docs dangles.

- No file tracked by git outside ``tests/`` and ``.ci/`` names the team's private notes
  or the data folder beside the checkout (only the tests and CI read that folder).
- Every relative link in README.md and docs/*.md names a file that exists, and a
  ``#fragment`` names a heading of its target (GitHub's heading anchors).
- Every "docs/method.md section N" / "docs/design.md decision N" pointer in the tracked
  files names a section or decision that exists.
"""

import pathlib
import re
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Names that must not appear outside tests/ and .ci/ (built from parts, so that this
# file does not match itself).
FORBIDDEN = (
    "METHOD" + ".md",
    "DESIGN" + ".md",
    "STYLE" + ".md",
    "../" + "shared",
    "/work/" + "shared",
)
ALLOWED_DIRS = ("tests/", ".ci/")

DOC_FILES = [
    "README.md",
    *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")),
]

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
_SECTION_POINTER = re.compile(r"docs/(\w+)\.md,? sections? (\d+)(?:\s*(?:-|and)\s*(\d+))?")
_DECISION_POINTER = re.compile(r"docs/design\.md decisions? (\d+)")


def _tracked_files() -> list[str]:
    """Files tracked by git (skipped outside a git checkout, e.g. an unpacked sdist)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [name for name in out.split("\0") if name and (REPO / name).is_file()]


def _text(path: pathlib.Path) -> str:
    return path.read_bytes().decode("utf-8", errors="ignore")


def _prose(markdown: str) -> str:
    """Markdown without code blocks and inline code (where brackets are not links)."""
    return _INLINE_CODE.sub("", _FENCE.sub("", markdown))


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    return {_anchor(h) for h in _HEADING.findall(_FENCE.sub("", _text(path)))}


def test_no_reference_outside_the_repository():
    offenders = []
    for name in _tracked_files():
        if name.startswith(ALLOWED_DIRS):
            continue
        text = _text(REPO / name)
        for number, line in enumerate(text.splitlines(), 1):
            found = [word for word in FORBIDDEN if word in line]
            if found:
                offenders.append(f"{name}:{number}: {', '.join(found)}: {line.strip()}")
    assert not offenders, (
        "files outside tests/ and .ci/ point outside the repository; cite docs/*.md or "
        "a user-supplied path (folder:PATH/TO/cifar10) instead:\n" + "\n".join(offenders)
    )


def test_docs_exist():
    for name in ("docs/method.md", "docs/design.md", "docs/results.md", "LICENSE", "CITATION.cff"):
        assert (REPO / name).is_file(), f"{name} is missing"
    assert "Apache License" in _text(REPO / "LICENSE")
    assert "cff-version: 1.2.0" in _text(REPO / "CITATION.cff")


@pytest.mark.parametrize("doc", DOC_FILES)
def test_relative_links_resolve(doc):
    source = REPO / doc
    broken = []
    for target in _LINK.findall(_prose(_text(source))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (source.parent / path_part).resolve() if path_part else source
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.name}")
    assert not broken, f"{doc} has broken links:\n" + "\n".join(broken)


def _numbered_sections(path: pathlib.Path) -> set[int]:
    """N of every heading ``## N. ...`` of a docs page."""
    return {int(n) for n in re.findall(r"^##\s+(\d+)\.", _text(path), re.MULTILINE)}


def test_section_and_decision_pointers_exist():
    sections = {p.stem: _numbered_sections(p) for p in (REPO / "docs").glob("*.md")}
    decisions = {
        int(n) for n in re.findall(r"^(\d+)\.\s+\*\*", _text(REPO / "docs/design.md"), re.M)
    }
    broken = []
    for name in _tracked_files():
        if name == "tests/docs_test.py":
            continue
        for number, line in enumerate(_text(REPO / name).splitlines(), 1):
            for page, first, last in _SECTION_POINTER.findall(line):
                wanted = {int(first), int(last or first)}
                if page not in sections or not wanted <= sections[page]:
                    broken.append(f"{name}:{number}: docs/{page}.md section(s) {sorted(wanted)}")
            for n in _DECISION_POINTER.findall(line):
                if int(n) not in decisions:
                    broken.append(f"{name}:{number}: docs/design.md decision {n}")
    assert not broken, "pointers into docs/ that name nothing:\n" + "\n".join(broken)
