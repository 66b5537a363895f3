"""scripts/ablate.py --smoke: two variants on a 25-scene set, two steps each; then the table and the chart,
and a second run that skips what is done."""
import os
import re

import pytest

from scripts import ablate
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
    (tmp_path / "ablation.md").write_text("# Notes\n\nkept\n\n" + doc.split("\n", 1)[1] + "\n## After\n")
    again = run_cli("scripts/ablate.py", "--smoke", "--workdir", tmp_path, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 2, again.stdout
    rewritten = (tmp_path / "ablation.md").read_text()
    assert rewritten.startswith("# Notes\n\nkept\n") and rewritten.endswith("section smoke: end -->\n\n## After\n")


def _summary(variant, seed, cider, no_change):
    summary = {"variant": variant, "seed": seed, "best_iteration": 100, "seconds": 60.0, "CIDEr": cider,
               "Bleu_4": 30.0, "semantic_CIDEr": None, "right_type": 50.0, "no_change": no_change}
    summary.update({f"CIDEr_{change}": None for change in ablate.CHANGE_TYPES})
    return summary


def test_tables_show_means_and_paired_differences_with_their_signs():
    summaries = [_summary("base", 1, 90.0, 80.0), _summary("base", 2, 92.0, 84.0), _summary("base", 3, 94.0, 82.0),
                 _summary("new", 1, 91.0, 90.0), _summary("new", 2, 95.0, 90.0), _summary("new", 3, 93.0, 92.0)]
    text = "\n".join(ablate.tables(summaries, ["base", "new"], [1, 2, 3]))
    # base: mean 92, sample sd 2; differences new - base: CIDEr 1, 3, -1 (mean 1, sd 2), 'no change' 10, 6, 10.
    assert "| base | 92.0 ± 2.0 | 30.0 ± 0.0 | 50.0 ± 0.0 | 82.0 ± 2.0 | 3 |" in text
    assert "| new − base | 1.0 ± 2.0 (2/3 > 0) | 0.0 ± 0.0 (0/3 > 0) | 0.0 ± 0.0 (0/3 > 0) | " \
           "8.7 ± 2.3 (3/3 > 0) | 3 |" in text
    assert "| base | - | - | - | - | - | - |" in text  # no changed pair of any type: no per-type CIDEr
