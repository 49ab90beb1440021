"""Same scenario, same output, byte for byte, whatever the hash seed (STYLE.md lesson 1)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCENARIOS = [str(p) for p in sorted((ROOT / "scenarios" / "arch").glob("*.toml"))[:12]]


def run_json(seed: str) -> bytes:
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run([sys.executable, "-m", "kvmodel", "run", "--json", *SCENARIOS],
                         cwd=ROOT, env=env, capture_output=True, check=True)
    return out.stdout


def test_json_output_does_not_depend_on_the_hash_seed():
    first = run_json("1")
    assert b'"passed": true' in first
    assert first == run_json("2")
