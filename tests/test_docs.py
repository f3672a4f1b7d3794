"""The docs as a newcomer meets them: a README of at most 10 KB, every link resolving to a file inside the
repository (no link leaves it, neither a URL nor a path above the root), anchors naming real headings, every
`scripts/...` the docs name existing, and the README's test command being what CI runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT = 10_000  # bytes: "README <= 10 KB"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "runtime" / "native" / "README.md"]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
AUTOLINK = re.compile(r"<((?:[a-z][a-z0-9+.-]*):[^>\s]*)>", re.I)


def prose(text: str) -> str:
    """Markdown without fenced code blocks and code spans (a `](x)` inside code is not a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Targets of inline links, images, reference definitions and autolinks, in order."""
    body = prose(text)
    found = [m.group(1) for m in INLINE_LINK.finditer(body)] + [m.group(1) for m in REFERENCE_DEF.finditer(body)]
    return [t[1:-1] if t.startswith("<") else t for t in found] + [m.group(1) for m in AUTOLINK.finditer(body)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", FENCE.sub("", path.read_text()), re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problem(source: Path, target: str, root: Path = ROOT) -> str | None:
    """Why `target`, linked from `source`, does not resolve to a file inside `root` (None: it does)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
        return "leaves the repository (a URL)"
    path, _, anchor = target.partition("#")
    if path.startswith("/"):
        return "is an absolute path"
    resolved = (source.parent / path).resolve() if path else source.resolve()
    if not resolved.is_relative_to(root.resolve()):
        return "leaves the repository"
    if not resolved.exists():
        return "names no file"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"names no heading '#{anchor}' in {resolved.relative_to(root.resolve())}"
    return None


def test_readme_is_at_most_10_kb():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into docs/ (limit {README_LIMIT})"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(doc):
    problems = [f"{target}: {why}" for target in links(doc.read_text())
                if (why := link_problem(doc, target)) is not None]
    assert not problems, f"{doc.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_link_check_catches_what_it_should(tmp_path):
    """The checker itself: it finds links outside code, and refuses URLs, escapes, missing files and headings."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "a.md").write_text("# Title\n\n## A section: here\n")
    doc = repo / "README.md"
    text = ("[ok](docs/a.md#a-section-here) ![img](docs/a.md) [out](../shared/notes/method.md) "
            "[web](https://example.com) [gone](docs/b.md) [bad anchor](docs/a.md#nope) `[code](x.md)`\n\n"
            "```\n[fenced](y.md)\n```\n[ref]: /etc/passwd\n")
    doc.write_text(text)
    found = links(text)
    assert found == ["docs/a.md#a-section-here", "docs/a.md", "../shared/notes/method.md", "https://example.com",
                     "docs/b.md", "docs/a.md#nope", "/etc/passwd"]
    verdicts = [link_problem(doc, t, repo) for t in found]
    assert verdicts[:2] == [None, None]
    assert verdicts[2] == "leaves the repository" and "URL" in verdicts[3]
    assert verdicts[4] == "names no file" and "#nope" in verdicts[5] and verdicts[6] == "is an absolute path"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_script_the_docs_name_exists(doc):
    named = set(re.findall(r"\bscripts/[\w.-]+\.(?:sh|py)\b", doc.read_text()))
    history = doc.name == "performance-history.md"  # the record names the scripts of its time, and says so
    missing = sorted(n for n in named if not (ROOT / n).exists())
    if history:
        missing = [n for n in missing if n not in {"scripts/speed_variants.py", "scripts/device_bench_17.sh"}]
    assert not missing, f"{doc.relative_to(ROOT)} names scripts that do not exist: {missing}"


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs the README's install-and-test command, step by step and in order."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    command = next(b for b in blocks if "python -m pytest" in b)

    def steps(text: str) -> list[str]:
        lines = [line.split(" #")[0].strip() for line in text.splitlines()]
        parts = [p.strip() for line in lines if line and not line.startswith("#") for p in line.split("&&")]
        return [p.removeprefix("bash ") for p in parts]

    readme, ci = steps(command), steps((ROOT / ".ci" / "run").read_text())
    positions = [ci.index(step) if step in ci else -1 for step in readme]
    assert -1 not in positions, f".ci/run lacks README steps: {[s for s, p in zip(readme, positions) if p < 0]}"
    assert positions == sorted(positions), f".ci/run runs the README's steps in another order: {positions}"
