"""The experiment report from a tiny trained, tested and evaluated experiment."""
import json
import os
import shutil

import pytest
from PIL import Image

from scripts import make_report
from scripts import visualize

pytestmark = pytest.mark.snippets  # the fixture trains the model


def _copy(exp, tmp_path, drop=()):
    """A private copy of the experiment (the fixture is shared), without the folders in ``drop``."""
    root = tmp_path / "tiny"
    shutil.copytree(exp["exp_root"], root, ignore=shutil.ignore_patterns(*drop))
    return str(root)


def test_report_holds_scores_curves_and_figures(tiny_experiment, tmp_path):  # noqa: F811
    exp = tiny_experiment
    root = _copy(exp, tmp_path)
    md_path, html_path = make_report.make_report(exp["cfg"], root)
    assert md_path == os.path.join(root, "report", "report.md")
    md = open(md_path).read()
    page = open(html_path).read()
    for heading in ("Validation scores during training", "Test scores", "Change detection on the test split",
                    "Training curves", "Triplets"):
        assert f"## {heading}" in md and f"<h2>{heading}" in page
    assert "No test scores" not in md

    # The numbers shown are the ones the tools wrote.
    val = [json.loads(line) for line in open(os.path.join(root, "metrics.jsonl")) if '"val"' in line]
    assert f"| {exp['iteration']} (best) | {100 * val[-1]['BLEU-4']:.2f} | {100 * val[-1]['CIDEr']:.2f} |" in md
    scores = json.load(open(os.path.join(root, "test_output", "captions", "eval_results.json")))
    test = scores["folders"]["test"]
    total = test["scores"]["total"]
    assert f"| total | {total['count']} | {100 * total['Bleu_1']:.2f} |" in md
    color = test["scores"]["color"]
    assert f"| color | {color['count']} |" in md
    no_change = test["change_detection"]["distractor_no_change"]
    assert f"| distractor pairs captioned 'no change' | {100 * no_change:.2f} |" in md
    assert f"<td>{100 * no_change:.2f}</td>" in page
    # The tiny data set is synthetic: evaluate.py found its scenes.json and scored the objects.
    objects = test["object_score"]
    assert "## Object-level score on the test split" in md and "<h2>Object-level score on the test split" in page
    assert ("| changed | {} | ".format(objects["pairs"]) + " | ".join(
        f"{100 * objects['figures'][f]:.2f}" for f in ("right_type", "object_color_shape", "object_named",
                                                        "new_value", "all_right")) + " |") in md
    drop = objects["per_type"]["drop"]
    assert f"| drop | {drop['pairs']} | {100 * drop['right_type']:.2f} | " in md and drop["new_value"] is None

    # Figures were drawn (none existed) and are referenced by relative path; the HTML embeds them.
    index = json.load(open(os.path.join(root, "figures", visualize.INDEX_FILE)))
    assert index and all(f"](../figures/{e['file']})" in md for e in index)
    assert page.count("data:image/png;base64,") == len(index) + 1  # figures and the curves
    assert all(e["changed_caption"] in page for e in index)
    assert all(f"\"{e['changed_caption']}\" ({e['changed_verdict']})" in md for e in index)
    with Image.open(os.path.join(root, "report", "training_curves.png")) as curves:
        assert curves.size == (1300, 900)


def test_missing_test_run_is_stated_not_fatal(tiny_experiment, tmp_path):  # noqa: F811
    exp = tiny_experiment
    root = _copy(exp, tmp_path, drop=("test_output",))
    md_path, _ = make_report.make_report(exp["cfg"], root, draw_figures=False)
    md = open(md_path).read()
    assert "## Missing pieces" in md and "No test scores yet: run python test.py" in md
    assert f"--snapshot {exp['iteration']}" in md
    assert "## Test scores" not in md
    assert "No triplet figures in" in md and "## Triplets" not in md
    assert "## Validation scores during training" in md


def test_existing_figures_are_reused(tiny_experiment, tmp_path):  # noqa: F811
    exp = tiny_experiment
    root = _copy(exp, tmp_path)
    scene = visualize.RCCDataset(exp["cfg"], "test").ids[-1]
    visualize.make_figures(exp["cfg"], exp["iteration"], ids=[scene], output_dir=os.path.join(root, "figures"))
    md_path, _ = make_report.make_report(exp["cfg"], root)
    md = open(md_path).read()
    assert md.count("![triplet_") == 1 and f"triplet_test_{scene:06d}.png" in md


def test_cli_errors_name_the_bad_file(tiny_experiment, tmp_path, capsys):  # noqa: F811
    exp = tiny_experiment
    root = _copy(exp, tmp_path)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(exp["cfg"].dump())
    bad = os.path.join(root, "test_output", "captions", "eval_results.json")
    with open(bad, "w") as handle:
        handle.write("{\"folders\": {\"test\": {}}}")
    for args, message in (([root, "--no_figures"], bad), ([str(tmp_path / "nowhere")], "does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            make_report.main(["--cfg", str(cfg_file), "--exp_dir", *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
