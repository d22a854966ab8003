"""The test suite; its folders mirror the packages (decoding/, workers/, pipeline/, training/, cli/)
plus faults/. Helpers are imported one way everywhere: `from tests.<module> import ...`."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
