"""Where the tests find the repository and their fixture files, from any depth of tests/."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"
BENCH = ROOT / "bench"
