"""``test.py`` with the test suite's custom heads registered (run by tests/test_distributed.py, with
python or torchrun): a run trained with those heads is evaluated as test.py would."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import test as test_entry  # noqa: E402
from custom_heads import register_all  # noqa: E402
from utils.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    register_all()
    sys.exit(run_cli(test_entry.main, sys.argv[1:]))
