"""Every ```python block of README.md runs as printed, on the CPU.

Blocks run in document order, each after the blocks before it (in one namespace, as a reader would paste them), in
a fresh Python process in a temporary working folder, on the default CPU path (without TRITON_INTERPRET, which
`make test` sets for the Triton tests: the interpreter would take minutes over the TRL example). A block that cannot
run on the CPU carries a marker on the line before its fence, `<!-- readme-test: skip REASON -->`: the test reports
it as skipped with that reason, never silently.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_blocks_and_skip_markers_are_read():
    text = "x\n```python\na = 1\n```\n<!-- readme-test: skip needs a CUDA GPU -->\n```python\nb = 2\nc = 3\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n", None), (6, "b = 2\nc = 3\n", "needs a CUDA GPU")]


# exec each block compiled at its own README line, so that a traceback points into README.md
RUNNER = """
import json, sys
namespace = {"__name__": "__readme__"}
for line, code in json.load(sys.stdin):
    exec(compile("\\n" * line + code, "README.md", "exec"), namespace)
"""


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"line-{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(index, tmp_path):
    line, code, skip = BLOCKS[index]
    if skip:
        pytest.skip(f"README.md line {line}: {skip}")
    blocks = [(n, c) for n, c, s in BLOCKS[:index] if not s] + [(line, code)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"README.md block at line {line} failed:\n{proc.stderr[-3000:]}"
