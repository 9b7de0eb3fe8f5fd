import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))          # billing_helpers (import-mode=importlib adds no path)
sys.path.insert(0, str(HERE.parent))   # tests/: pgserver (a real PostgreSQL for the store tests)


def pytest_collection_modifyitems(config, items):
    """Long variants marked slow run only when asked for (-m slow); their short twins always run."""
    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long variant; run with -m slow")
    for item in items:
        if "slow" in item.keywords and HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)
