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


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md", "docs/experiments.md"])
def test_relative_links_reach_a_file_and_heading(doc):
    """The README summarises and links into docs/experiments.md: a renamed heading or moved file must
    not leave a dead link."""
    root = DOCS.parent
    source = root / doc
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (source.parent / path).resolve() if path else source
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(f"{target}: no heading with anchor #{anchor} in {path or doc}")
    assert not broken, f"{doc}: dead links: {broken}"


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
