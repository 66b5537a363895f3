"""scripts/make_submission.py (`make submission`): what it checks, what it refuses, the zip the grader reads."""
import os
import shutil
import zipfile

import pytest

from scripts import make_report, make_submission
from tests.helpers import write_cfg
from utils.assignment import ASSIGNMENT_FILES

pytestmark = pytest.mark.snippets  # the fixture trains the model


@pytest.fixture
def reported(tiny_experiment, tmp_path):
    """A private copy of the tiny experiment with figures and a report, and the path of its config file."""
    exp = tiny_experiment
    root = tmp_path / "experiments" / "tiny"
    shutil.copytree(exp["exp_root"], root)
    cfg = exp["cfg"].clone()
    cfg.defrost()
    cfg.exp_dir = str(tmp_path / "experiments")
    cfg.freeze()
    make_report.make_report(cfg, str(root))
    return write_cfg(cfg, tmp_path), root


def submit(cfg_file, out, *flags, capsys=None):
    try:
        make_submission.main(["--cfg", cfg_file, "--output", str(out), *flags])
    except SystemExit as stop:
        return stop.code, capsys.readouterr().err if capsys else ""
    return 0, capsys.readouterr().out if capsys else ""


def test_a_complete_hand_in_is_the_four_files_and_the_report(reported, tmp_path, capsys):
    cfg_file, root = reported
    out = tmp_path / "submission.zip"
    code, printed = submit(cfg_file, out, capsys=capsys)
    assert code == 0 and f"wrote {out}" in printed and "hand it in" in printed, printed
    with zipfile.ZipFile(out) as archive:
        assert sorted(archive.namelist()) == sorted([*ASSIGNMENT_FILES, "report.html"])
        assert archive.read("report.html") == (root / "report" / "report.html").read_bytes()
        for rel in ASSIGNMENT_FILES:
            assert archive.read(rel) == open(os.path.join(make_submission.ROOT, rel), "rb").read()


def test_missing_pieces_stop_it_with_what_to_do_and_force_writes_anyway(reported, tmp_path, capsys):
    cfg_file, root = reported
    out = tmp_path / "submission.zip"
    os.utime(root / "figures" / "triplets.json")  # newer than the report
    code, err = submit(cfg_file, out, capsys=capsys)
    assert code == 2 and "is older than the test scores or the figures" in err and "make_report.py" in err
    shutil.rmtree(root / "test_output")
    (root / "report" / "report.html").unlink()
    code, err = submit(cfg_file, out, capsys=capsys)
    assert code == 2 and "Traceback" not in err and not out.exists()
    assert "no test scores" in err and "python test.py --cfg" in err and "no report" in err
    code, printed = submit(cfg_file, out, "--force", capsys=capsys)
    assert code == 0 and "warning: no test scores" in printed and "(no report)" in printed
    with zipfile.ZipFile(out) as archive:
        assert sorted(archive.namelist()) == sorted(ASSIGNMENT_FILES)


def test_uncompiled_and_unwritten_snippets_are_named(tmp_path, monkeypatch):
    for rel in ASSIGNMENT_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(make_submission.ROOT, rel), tmp_path / rel)
    assert make_submission.compile_errors(str(tmp_path)) == []
    (tmp_path / "models" / "CBR.py").write_text("def broken(:\n")
    assert make_submission.compile_errors(str(tmp_path)) == ["models/CBR.py, line 1: invalid syntax"]
    text = (tmp_path / "utils" / "utils.py").read_text()
    start, end = text.index("== To Implement =="), text.index("== End ==")
    stubbed = text[:start] + '== To Implement ==\n        raise NotImplementedError("utils.CrossEn")\n        # ' + text[end:]
    (tmp_path / "utils" / "utils.py").write_text(stubbed)
    assert make_submission.snippet_problems(str(tmp_path)) == [
        "1 snippet(s) are not written yet: utils.CrossEn (utils/utils.py)"]


@pytest.mark.slow  # a grading run: tests/test_grader.py covers the layouts it accepts
def test_the_grader_scores_the_zip_as_it_is(reported, tmp_path, capsys):
    from grading.grader import grade

    cfg_file, _ = reported
    out = tmp_path / "alice.zip"
    assert submit(cfg_file, out, capsys=capsys)[0] == 0
    report = grade([str(out)])[0]
    assert sum(check["points"] for check in report["checks"]) == 100, report
