"""scripts/ablate.py --smoke: two variants on a 25-scene set, two steps each; then the table and the chart,
and a second run that skips what is done."""
import os
import re

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.snippets


def test_smoke_run_writes_the_table_and_chart_and_resumes(tmp_path):
    done = run_cli("scripts/ablate.py", "--smoke", "--workdir", tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = (tmp_path / "ablation.md").read_text()
    assert "<!-- ablate.py section smoke: begin -->" in doc and (tmp_path / "ablation_smoke.png").stat().st_size > 0
    assert f"Reproduce: `python scripts/ablate.py --smoke --workdir {tmp_path}`" in doc
    rows = re.findall(r"^\| (subtraction|scorer_cbr) \| ([^|]+) \|", doc, re.M)
    assert [name for name, _ in rows[:2]] == ["subtraction", "scorer_cbr"]
    assert "| scorer_cbr − subtraction |" in doc
    for run in ("subtraction-s1", "scorer_cbr-s1"):
        assert os.path.exists(tmp_path / "experiments" / "ablation" / "smoke" / run / "test_output" / "captions" /
                              "eval_results.json")
    # Hand-written text around the section stays; a second run skips the finished runs.
    (tmp_path / "ablation.md").write_text("# Notes\n\nkept\n\n" + doc.split("\n", 1)[1])
    again = run_cli("scripts/ablate.py", "--smoke", "--workdir", tmp_path, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 2, again.stdout
    assert (tmp_path / "ablation.md").read_text().startswith("# Notes\n\nkept\n")
