import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))      # billing_helpers (import-mode=importlib adds no path)
