"""The coordinator must never load torch (it runs where no GPU stack is installed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_coordinator_does_not_import_torch():
    code = (
        "import sys\n"
        "import coordinator.server, coordinator.router, core.config\n"
        # the launcher and the Ray client run in the same (coordinator) process
        "import coordinator.launch, coordinator.ray_client, coordinator.cli\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
