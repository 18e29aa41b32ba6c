"""Memory: glibc's mmap threshold fixed by the pipeline, and the peak RSS per stage in the training report."""

import json
import sys

import pytest

from prism_persona.store import RunDir
from prism_persona.train.pipeline import peak_rss_mb
from prism_persona.train.report import write_report


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_peak_memory_per_stage_in_the_report_and_kept_across_invocations(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True, exist_ok=True)
    write_report(run, [], {"bootstrap": 1.0}, {"load_model": 600.0, "bootstrap": 1500.5})
    rep = write_report(run, [], {"gate": 2.0}, {"gate": 1200.0, "distill": None})
    assert rep["stage_peak_rss_mb"] == {"load_model": 600.0, "bootstrap": 1500.5, "gate": 1200.0}
    assert json.loads((run.root / "training_report.json").read_text())["stage_peak_rss_mb"]["bootstrap"] == 1500.5
    md = (run.root / "training_report.md").read_text()
    assert "| bootstrap | 1500 |" in md and "| gate | 1200 |" in md


def test_peak_rss_is_this_process_in_megabytes():
    assert 10 < peak_rss_mb() < 1 << 20
