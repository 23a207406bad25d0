"""Every ```python block of README.md runs as printed, on the CPU.

Blocks run in document order, each after the blocks before it (in one namespace, as a reader would paste them), in
a temporary working folder. A block that cannot run on the CPU carries a marker on the line before its fence,
`<!-- readme-test: skip REASON -->`: the test reports it as skipped with that reason, never silently.
"""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).parent.parent / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s+(.+?)\s*-->")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, code, skip reason or None) of each ```python block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            previous = lines[start - 2] if start >= 2 else ""
            skip = SKIP.search(previous)
            blocks.append((start, "\n".join(body) + "\n", skip.group(1) if skip else None))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"line-{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(index, tmp_path, monkeypatch):
    line, code, skip = BLOCKS[index]
    if skip:
        pytest.skip(f"README.md line {line}: {skip}")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    for before_line, before, before_skip in BLOCKS[:index]:
        if not before_skip:
            exec(compile(before, f"README.md:{before_line}", "exec"), namespace)
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
