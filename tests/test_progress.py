"""Progress output: a tqdm bar on a terminal, periodic plain lines (and a summary) in a log.

    .venv/bin/python -m pytest tests/test_progress.py
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import time
from moma.tokenizers.progress import progress
bar = progress(total=60, desc="work", unit="step")
for i in range(60):
    time.sleep(0.01)
    bar.update(1)
    bar.set_postfix(loss=f"{1 / (i + 1):.2f}")
bar.close()
"""


def test_a_log_gets_a_line_every_few_seconds_not_a_redraw_per_update() -> None:
    # stderr is a pipe, as in a SLURM log: ~0.6 s of work at one line per 0.2 s
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60,
                          env={"MOMA_PROGRESS_SECONDS": "0.2", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "\r" not in proc.stderr  # no carriage-return redraws
    assert 2 <= len(lines) <= 6, lines  # a handful of periodic lines, not one per update
    assert all(line.startswith("work: progress ") for line in lines[:-1])
    assert lines[-1].startswith("work: done 60/60 step in ") and lines[-1].endswith("loss=0.02")
