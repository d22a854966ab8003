"""The README's marked examples run as written: each ```python block right after a
`<!-- readme-example: NAME -->` line is executed (its asserts are the check)."""
from __future__ import annotations

import re

import pytest

from tests import REPO_ROOT

MARKER = re.compile(r"<!-- readme-example: (\S+) -->\n```python\n(.*?)\n```", re.S)
EXAMPLES = dict(MARKER.findall((REPO_ROOT / "README.md").read_text()))


def test_the_readme_has_its_examples():
    assert "families" in EXAMPLES


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs(name):
    exec(compile(EXAMPLES[name], f"README.md:{name}", "exec"), {"__name__": f"readme_{name}"})
