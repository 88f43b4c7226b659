import sys
from pathlib import Path

# Test this checkout's lem package, whatever `pip install -e` points at.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
