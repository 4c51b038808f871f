"""Every script in examples/ runs as a user would run it (a subprocess, argv only) and exits 0."""
import glob
import os
import subprocess
import sys
import time

import pytest

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "[0-9][0-9]_*.py")))


def test_examples_are_numbered_and_documented():
    """The examples are numbered from 01 without gaps, and examples/README.md has a paragraph for each."""
    names = [os.path.basename(p) for p in EXAMPLES]
    assert [int(n[:2]) for n in names] == list(range(1, len(names) + 1))
    with open(os.path.join(os.path.dirname(__file__), "..", "examples", "README.md")) as f:
        readme = f.read()
    for name in names:
        assert f"`{name}`" in readme, f"{name} has no paragraph in examples/README.md"


@pytest.mark.root
@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_runs(path):
    """The example exits 0 within a few seconds and prints what it did."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(path))
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"{os.path.basename(path)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), "an example prints what it does and what it saw"
    assert elapsed < 20, f"{os.path.basename(path)} took {elapsed:.1f} s"
