"""research/ablate.py --smoke: two variants on a 25-scene set, two steps each, tested on a test set of their own;
then the table and the chart, and a second run that skips what is done. A trained run is tested again, not
trained again, when its test split changes."""
import json
import os
import re

import pytest

from research import ablate
from tests.helpers import run_cli

pytestmark = pytest.mark.snippets


def _right_object(result_file):
    """The right-object share (%) of a run's test captions, from evaluate.py's object-level score."""
    test = json.loads(open(result_file).read())["folders"]["test"]
    return 100 * test["object_score"]["figures"]["object_color_shape"]


@pytest.mark.slow  # about 1.5 minutes: the tables and their formulas are checked fast below
def test_smoke_run_writes_the_table_and_chart_and_resumes(tmp_path):
    done = run_cli("research/ablate.py", "--smoke", "--test_scenes", "10", "--workdir", tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = (tmp_path / "ablation.md").read_text()
    assert "<!-- ablate.py section smoke: begin -->" in doc and (tmp_path / "ablation_smoke.png").stat().st_size > 0
    assert f"Reproduce: `python research/ablate.py --smoke --test_scenes 10 --workdir {tmp_path}`" in doc
    assert "test split: data/ablation/test-10 (10 changed and as many distractor pairs)" in doc
    header = next(line for line in doc.splitlines() if line.startswith("| variant | total CIDEr"))
    assert header.split(" | ")[-3:] == ["right object %", "type, object and value right %", "runs |"]
    rows = re.findall(r"^\| (subtraction|scorer_cbr) \| ([^|]+) \|", doc, re.M)
    assert [name for name, _ in rows[:2]] == ["subtraction", "scorer_cbr"]
    assert "| scorer_cbr − subtraction |" in doc
    # The test set: 10 scenes of its own, every one in the test split; each run was tested on it.
    test_data = tmp_path / "data" / "ablation" / "test-10"
    splits = json.loads((test_data / "splits.json").read_text())
    assert splits["train"] == splits["val"] == [] and splits["test"] == list(range(100000, 100010))
    for run, name in (("subtraction-s1", "subtraction"), ("scorer_cbr-s1", "scorer_cbr")):
        root = tmp_path / "experiments" / "ablation" / "smoke" / run
        summary = json.loads((root / "ablation_run.json").read_text())
        assert summary["test_data"] == "data/ablation/test-10" and summary["test_pairs"] == 10
        right_object = _right_object(root / "test_output" / "captions" / "eval_results.json")
        assert summary["right_object"] == right_object
        assert re.search(rf"^\| {name} s1 \| .* \| {right_object:.1f} \| [0-9.]+ \| [0-9.]+ \|$", doc, re.M), doc
    # Hand-written text around the section stays; a second run skips the finished runs.
    (tmp_path / "ablation.md").write_text("# Notes\n\nkept\n\n" + doc.split("\n", 1)[1] + "\n## After\n")
    again = run_cli("research/ablate.py", "--smoke", "--test_scenes", "10", "--workdir", tmp_path, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 2, again.stdout
    rewritten = (tmp_path / "ablation.md").read_text()
    assert rewritten.startswith("# Notes\n\nkept\n") and rewritten.endswith("section smoke: end -->\n\n## After\n")


def _evaluation(right_object):
    """The part of evaluate.py's eval_results.json that metrics_of reads (one result folder)."""
    types = ablate.CHANGE_TYPES
    return {"scores": {split: {"CIDEr": 0.5, "Bleu_4": 0.25, "count": 400 if split == "semantic" else 80}
                       for split in ("total", "semantic") + types},
            "change_detection": {"change_type_correct": 0.75, "distractor_no_change": 0.9},
            "object_score": {"figures": {"object_color_shape": right_object, "all_right": 0.1},
                             "per_type": {t: {"object_color_shape": right_object} for t in types}}}


def test_a_trained_run_is_tested_again_on_a_new_test_split_not_trained_again(tmp_path, monkeypatch):
    args = ablate.parse_args(["--workdir", str(tmp_path), "--test_scenes", "400", "--variants", "scorer"])
    run = ablate.Run(args, "scorer", 2)
    # What an earlier version left: training finished at step 1200, best snapshot 1000, a summary of the test
    # on the data set's own split (no test split named, no object-level score).
    root = tmp_path / "experiments" / "ablation" / "shift-1" / "scorer-s2"
    (root / "snapshots").mkdir(parents=True)
    (root / "config.yaml").write_text("train:\n  max_iter: 1200\n")
    (root / "snapshots" / "scorer-s2_checkpoint_1200.pt").write_bytes(b"")
    (root / "best_snapshot.json").write_text('{"iteration": 1000}')
    (root / "ablation_run.json").write_text(json.dumps({"variant": "scorer", "seed": 2, "seconds": 612.5}))
    assert run.trained() and not run.done()
    commands = []

    def fake_run(command, log, what):
        commands.append(command)
        if command[1].endswith("evaluate.py"):
            os.makedirs(os.path.dirname(run.layout.test_scores), exist_ok=True)
            with open(run.layout.test_scores, "w") as handle:
                json.dump({"folders": {"test": _evaluation(0.42)}}, handle)

    monkeypatch.setattr(ablate, "_run", fake_run)
    summary = run.execute(log=None)
    test_data = str(tmp_path / "data" / "ablation" / "test-400")
    assert [os.path.basename(c[1]) for c in commands] == ["test.py", "evaluate.py"]  # no train.py
    test = commands[0]
    assert test[test.index("--snapshot") + 1] == "1000"
    assert test[test.index("data.default_feature_dir") + 1] == os.path.join(test_data, "features")
    assert test[test.index("exp_name") + 1] == "scorer-s2" and "train.lambda_m" in test
    evaluate = commands[1]
    assert evaluate[evaluate.index("--anno") + 1] == os.path.join(test_data, "total_change_captions_reformat.json")
    assert summary["seconds"] == 612.5  # the minutes of the training run stay
    assert summary["test_data"] == "data/ablation/test-400" and summary["test_pairs"] == 400
    assert summary["right_object"] == pytest.approx(42.0) and summary["right_object_move"] == pytest.approx(42.0)
    assert run.done() and not ablate.Run(ablate.parse_args(["--workdir", str(tmp_path)]), "scorer", 2).done()


def test_test_scenes_must_cover_every_change_type(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ablate.parse_args(["--test_scenes", "4", "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--test_scenes must be at least 5" in capsys.readouterr().err


def _summary(variant, seed, cider, no_change, right_object=None):
    summary = {"variant": variant, "seed": seed, "best_iteration": 100, "seconds": 60.0, "CIDEr": cider,
               "Bleu_4": 30.0, "semantic_CIDEr": None, "right_type": 50.0, "no_change": no_change,
               "right_object": right_object, "all_right": None if right_object is None else 20.0}
    summary.update({f"CIDEr_{change}": None for change in ablate.CHANGE_TYPES})
    summary.update({f"right_object_{change}": None if right_object is None else right_object + k
                    for k, change in enumerate(ablate.CHANGE_TYPES)})
    return summary


def test_tables_show_means_and_paired_differences_with_their_signs():
    summaries = [_summary("base", 1, 90.0, 80.0), _summary("base", 2, 92.0, 84.0), _summary("base", 3, 94.0, 82.0),
                 _summary("new", 1, 91.0, 90.0, 40.0), _summary("new", 2, 95.0, 90.0, 44.0),
                 _summary("new", 3, 93.0, 92.0, 42.0)]
    text = "\n".join(ablate.tables(summaries, ["base", "new"], [1, 2, 3]))
    # base: mean 92, sample sd 2, no object-level score (None: no changed pair); differences new - base: CIDEr 1, 3, -1 (mean 1, sd 2),
    # 'no change' 10, 6, 10.
    assert "| base | 92.0 ± 2.0 | 30.0 ± 0.0 | 50.0 ± 0.0 | 82.0 ± 2.0 | - | - | 3 |" in text
    assert "| new | 93.0 ± 2.0 | 30.0 ± 0.0 | 50.0 ± 0.0 | 90.7 ± 1.2 | 42.0 ± 2.0 | 20.0 ± 0.0 | 3 |" in text
    assert "| new − base | 1.0 ± 2.0 (2/3 > 0) | 0.0 ± 0.0 (0/3 > 0) | 0.0 ± 0.0 (0/3 > 0) | " \
           "8.7 ± 2.3 (3/3 > 0) | - | - | 3 |" in text
    assert text.count("| base | - | - | - | - | - | - |") == 2  # no per-type CIDEr, no per-type object score
    assert "| new | 42.0 ± 2.0 | 43.0 ± 2.0 | 44.0 ± 2.0 | 45.0 ± 2.0 | 46.0 ± 2.0 | 42.0 ± 2.0 |" in text
    assert "| new s2 | 100 | 95.0 | 30.0 | 50.0 | 90.0 | 44.0 | 20.0 | 1.0 |" in text
    assert "| base s1 | 100 | 90.0 | 30.0 | 50.0 | 80.0 | - | - | 1.0 |" in text
