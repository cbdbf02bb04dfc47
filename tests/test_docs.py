"""Execute the code blocks of the docs, so the documented shapes cannot drift from the code."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("doc", ["architecture.md"])
def test_doc_code_blocks_run(doc):
    text = (DOCS / doc).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{doc}[block {i}]", "exec"), namespace)
        except Exception as error:  # name the block that went stale
            raise AssertionError(f"{doc}: code block {i} failed: {error!r}\n{block}") from error


def _slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _dead_link(target: str, source: Path) -> str | None:
    """Why a relative link from `source` leads nowhere, or None if its file (and heading) exist."""
    path, _, anchor = target.partition("#")
    file = (source.parent / path).resolve() if path else source
    if not file.exists():
        return f"{target}: no file {file}"
    if anchor and file.suffix == ".md":
        headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
        if anchor not in {_slug(h) for h in headings}:
            return f"{target}: no heading with anchor #{anchor} in {path or source.name}"
    return None


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md", "docs/experiments.md", "docs/training.md",
                                 "docs/performance.md", "docs/visualization.md"])
def test_relative_links_reach_a_file_and_heading(doc):
    """The README summarises and links into docs/: a renamed heading or moved file must not leave a
    dead link."""
    source = DOCS.parent / doc
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", source.read_text()) if not re.match(r"[a-z]+://", t)]
    broken = [reason for t in targets if (reason := _dead_link(t, source))]
    assert not broken, f"{doc}: dead links: {broken}"


def test_dead_link_is_caught():
    """The link check itself can fail: a missing heading and a missing file are both reported."""
    readme = DOCS.parent / "README.md"
    assert _dead_link("docs/experiments.md#no-such-heading", readme)
    assert _dead_link("docs/no-such-file.md", readme)
    assert _dead_link("docs/experiments.md#recipe-logs", readme) is None


def test_each_cifar_recipe_header_gives_its_command_and_result():
    """Each shipped CIFAR recipe's YAML header names the command that repeats it and a measured accuracy."""
    recipes = DOCS.parent / "src" / "vitkit" / "recipes"
    names = sorted(p.stem for p in recipes.glob("cifar10-*.yaml"))
    assert names
    for name in names:
        header = [line for line in (recipes / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
        text = "\n".join(header)
        assert f"# Command: vitkit train --recipe {name} " in text, f"{name}.yaml: no '# Command:' line"
        assert re.search(r"\d\d\.\d\d%", text), f"{name}.yaml: no measured accuracy in its header"


RECIPES = DOCS.parent / "src" / "vitkit" / "recipes"


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_header_is_short_and_links_to_its_record(recipe):
    """A recipe's header says what it is, its command and its result in at most 12 comment lines; the
    dated record, machine names and rejected alternatives live in docs/experiments.md, which it links."""
    lines = (RECIPES / recipe).read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert len(header) <= 12, f"{recipe}: {len(header)} comment lines; move the rest to docs/experiments.md"
    comments = "\n".join(line for line in lines if "#" in line)
    named = re.findall(r"xeon|epyc|zen ?[345]|amx|20\d\d-\d\d-\d\d", comments, flags=re.I)
    assert not named, f"{recipe}: machine names or dates in its comments: {named}"
    for target in re.findall(r"docs/\S+\.md#[\w-]+", comments):
        assert _dead_link(target, DOCS.parent / "README.md") is None, f"{recipe}: dead link {target}"
    if recipe.startswith("cifar10-"):
        assert f"docs/experiments.md#{recipe.removesuffix('.yaml')}" in comments, f"{recipe}: no link to its record"
