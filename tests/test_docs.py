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
