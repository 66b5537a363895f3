"""The Gradescope autograder: the zip that `python -m grading.autograder build` writes, and its
run_autograder in a temporary folder laid out like /autograder (source/, submission/, results/),
with results.json checked field by field against Gradescope's format."""
import importlib.metadata
import io
import json
import os
import stat
import subprocess
import sys
import zipfile

import pytest
import torch

from grading.autograder import REQUIREMENTS, RUNTIME
from grading.child import SMOKE, SMOKE_INPUTS
from grading.gradescope import CASES_FILE, SETTINGS_FILE, VISIBILITIES, submission_path
from grading.snippets import REPO, assignment_blocks, blank_text, read_text, solution_lines
from utils.assignment import ASSIGNMENT_FILES, SNIPPETS

VISIBILITY = "after_published"
NAMES = [f"{name} ({rel})" for name, rel in zip(SNIPPETS, ("models/CBR.py", "utils/utils.py",
                                                            "models/transformer_decoder.py",
                                                            "models/transformer_decoder.py",
                                                            "models/transformer_decoder.py", "models/SCORER.py"))]
NAMES.append("smoke run: the whole model trains and decodes")


def solution_texts():
    return {rel: read_text(os.path.join(REPO, rel)) for rel in ASSIGNMENT_FILES}


def handout_texts():
    blocks = assignment_blocks(REPO)
    return {rel: blank_text(text, blocks[rel]) for rel, text in solution_texts().items()}


def edit(texts, rel, old, new):
    assert texts[rel].count(old) == 1, f"{old!r} must occur once in {rel}"
    return {**texts, rel: texts[rel].replace(old, new)}


SIN_COS = [("models/transformer_decoder.py", "pe[:, 0::2] = torch.sin(angle)", "pe[:, 0::2] = torch.cos(angle)"),
           ("models/transformer_decoder.py", "pe[:, 1::2] = torch.cos(angle[", "pe[:, 1::2] = torch.sin(angle[")]
SYNTAX = ("models/CBR.py", "loss = -torch.diagonal(log_probs).mean()", "loss = -torch.diagonal(log_probs).mean(")
CRASH = ("models/SCORER.py", "class AddSpatialInfo(nn.Module):",
         "raise RuntimeError('the file crashes on import')\n\n\nclass AddSpatialInfo(nn.Module):")


def with_edits(texts, *edits):
    for rel, old, new in edits:
        texts = edit(texts, rel, old, new)
    return texts


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "autograder.zip"
    done = subprocess.run([sys.executable, "-m", "grading.autograder", "build", "--out", str(out),
                           "--visibility", VISIBILITY, "--timeout", "30"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def autograde(bundle, root, texts=None, layout="folders", skip=()):
    """Runs run_autograder on a submission in ``root`` laid out like /autograder; (exit status, results.json, stderr)."""
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(root / "source")
    for name in ("run_autograder", "setup.sh"):
        os.chmod(root / "source" / name, 0o755)
    submission = root / "submission"
    submission.mkdir()
    for rel, text in (texts or {}).items():
        if rel in skip:
            continue
        path = submission / (rel if layout == "folders" else os.path.join("my_work", os.path.basename(rel)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "AUTOGRADER_PYTHON": sys.executable}
    done = subprocess.run(["bash", str(root / "source" / "run_autograder")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    with open(root / "results" / "results.json") as handle:
        return done.returncode, json.load(handle), done.stderr


def check_format(results):
    """Every field of results.json as Gradescope documents it."""
    assert set(results) <= {"score", "execution_time", "output", "visibility", "stdout_visibility", "tests",
                            "extra_data", "output_format", "leaderboard"}
    assert isinstance(results["score"], (int, float)) and isinstance(results["execution_time"], (int, float))
    assert results["execution_time"] >= 0 and isinstance(results["output"], str) and results["output"]
    assert results["stdout_visibility"] in VISIBILITIES
    assert isinstance(results["tests"], list)
    for number, test in enumerate(results["tests"], 1):
        assert set(test) == {"name", "number", "score", "max_score", "status", "output", "visibility"}, test
        assert isinstance(test["name"], str) and test["number"] == str(number)
        assert isinstance(test["score"], int) and isinstance(test["max_score"], int)
        assert test["score"] in (0, test["max_score"])
        assert test["status"] == ("passed" if test["score"] == test["max_score"] else "failed")
        assert isinstance(test["output"], str) and test["output"].endswith((".", "?"))
        assert test["visibility"] == VISIBILITY
    assert results["score"] == sum(test["score"] for test in results["tests"])


def scores(results):
    return {test["name"]: test["score"] for test in results["tests"]}


def test_the_zip_holds_the_grader_the_hidden_cases_and_no_solution(bundle):
    with zipfile.ZipFile(bundle) as archive:
        names = archive.namelist()
        modes = {info.filename: info.external_attr >> 16 for info in archive.infolist()}
        contents = {name: archive.read(name) for name in names}
    for name in ["setup.sh", "run_autograder", "requirements-grading.txt", f"project/{CASES_FILE}",
                 f"project/{SETTINGS_FILE}", "project/tests/snippet_cases.py"] + [f"project/{rel}" for rel in RUNTIME]:
        assert name in names, name
    assert not [name for name in names if name.startswith("project/grading/") and name[len("project/"):] not in RUNTIME]
    assert modes["run_autograder"] & stat.S_IXUSR and modes["setup.sh"] & stat.S_IXUSR
    lines = solution_lines()
    assert len(lines) > 15
    for name, content in contents.items():
        for line in lines:
            assert line.encode() not in content, f"{name} holds the solution line {line!r}"
    assert json.loads(contents[f"project/{SETTINGS_FILE}"]) == {"visibility": VISIBILITY, "timeout": 30.0}
    # The smoke run's recorded losses are hidden: in the cases only root reads, not in the handout's.
    hidden = torch.load(io.BytesIO(contents[f"project/{CASES_FILE}"]), weights_only=True)
    public = torch.load(io.BytesIO(contents["project/tests/snippet_cases.pt"]), weights_only=True)
    assert sorted(hidden) == sorted(list(SNIPPETS) + [SMOKE]) and sorted(public) == sorted(SNIPPETS)
    assert set(hidden[SMOKE]) == set(SMOKE_INPUTS) | {"losses", "tokens", "logprobs"}
    assert subprocess.run(["bash", "-n", "-c", contents["setup.sh"].decode()]).returncode == 0
    assert "download.pytorch.org/whl/cpu" in contents["setup.sh"].decode()


def test_setup_installs_what_the_grader_imports(bundle):
    """The distributions the grader and the handout's packages import are torch, REQUIREMENTS and what they require."""
    code = ("import sys, grading.gradescope, grading.sandbox, grading.child, models.captioner, utils.utils\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    owners = importlib.metadata.packages_distributions()
    imported = {dist.lower() for module in done.stdout.split() for dist in owners.get(module, [])}
    requirements = pytest.importorskip("packaging.requirements")
    allowed, pending = set(), ["torch", *REQUIREMENTS]
    while pending:
        name = pending.pop().lower()
        if name in allowed:
            continue
        allowed.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = requirements.Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    allowed = {name.replace("_", "-") for name in allowed}
    missing = {name.replace("_", "-") for name in imported} - allowed - {"scorer-cbr-change-captioning"}
    assert not missing, f"setup.sh would not install {sorted(missing)}: add them to grading/autograder.py: REQUIREMENTS"


def test_submission_layouts_are_found(tmp_path):
    nested = tmp_path / "nested"
    (nested / "deep" / "models").mkdir(parents=True)
    (nested / "deep" / "models" / "CBR.py").write_text("")
    assert submission_path(str(nested)) == str(nested)
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    with zipfile.ZipFile(zipped / "hand-in.zip", "w") as archive:
        archive.writestr("utils/utils.py", "")
    assert submission_path(str(zipped)) == str(zipped / "hand-in.zip")


def test_the_solution_scores_100(bundle, tmp_path):
    code, results, stderr = autograde(bundle, tmp_path, solution_texts(), layout="flat")
    assert code == 0, stderr
    check_format(results)
    assert results["score"] == 100 and [test["name"] for test in results["tests"]] == NAMES
    assert "All four files were found." in results["output"] and "once the grades are published" in results["output"]


def test_the_untouched_handout_scores_0(bundle, tmp_path):
    code, results, stderr = autograde(bundle, tmp_path, handout_texts())
    assert code == 0, stderr
    check_format(results)
    assert results["score"] == 0
    assert all("NotImplementedError" in test["output"] for test in results["tests"])


def test_wrong_missing_syntax_error_and_crash_in_one_submission(bundle, tmp_path):
    texts = with_edits(solution_texts(), *SIN_COS, SYNTAX, CRASH)
    code, results, stderr = autograde(bundle, tmp_path, texts, skip={"utils/utils.py"})
    assert code == 0, stderr
    check_format(results)
    assert list(scores(results).values()) == [0, 0, 0, 15, 15, 0, 0] and results["score"] == 30
    outputs = [test["output"] for test in results["tests"]]
    assert "models/CBR.py could not be imported: the code raises SyntaxError" in outputs[0]
    assert outputs[1] == "utils/utils.py is missing from the submission." == outputs[6]
    assert "Sin and cos are swapped" in outputs[2]
    assert "RuntimeError: the file crashes on import (models/SCORER.py, line " in outputs[5]
    assert "utils/utils.py is missing from the submission; its snippets score 0" in results["output"]


@pytest.mark.slow
@pytest.mark.parametrize("kind, edits, skip, total, failing", [
    ("wrong", SIN_COS, (), 75, ["PositionEncoding", "smoke run"]),
    ("missing file", [], ("utils/utils.py",), 75, ["utils.CrossEn", "smoke run"]),
    ("syntax error", [SYNTAX], (), 75, ["CBR.CrossEn", "smoke run"]),
    ("crash", [CRASH], (), 75, ["Attention", "smoke run"]),
])
def test_each_kind_of_broken_submission(bundle, tmp_path, kind, edits, skip, total, failing):
    code, results, stderr = autograde(bundle, tmp_path, with_edits(solution_texts(), *edits), skip=set(skip))
    assert code == 0, stderr
    check_format(results)
    assert results["score"] == total
    assert [t["name"].split(" ")[0] for t in results["tests"] if t["status"] == "failed"] == \
        [name.split(" ")[0] for name in failing]


def test_a_hostile_submission_cannot_read_the_cases_or_write_the_results(bundle, tmp_path):
    attack = f"""
import os
_leaked = []
try:
    with open({str(tmp_path / "source" / "project" / CASES_FILE)!r}, "rb") as _handle:
        if _handle.read(16):
            _leaked.append("cases")
except OSError:
    pass
for _path, _text in (({str(tmp_path / "results" / "results.json")!r}, '{{"score": 100, "tests": []}}'),
                     ({str(tmp_path / "source" / "project" / "grading" / "grader.py")!r}, "SNIPPET_POINTS = 0")):
    try:
        with open(_path, "w") as _handle:
            _handle.write(_text)
    except OSError:
        pass
if _leaked:
    raise RuntimeError("LEAK")
os._exit(0)
"""
    texts = edit(solution_texts(), "models/CBR.py", "class CrossEn(nn.Module):", attack + "\n\nclass CrossEn(nn.Module):")
    grader = read_text(os.path.join(REPO, "grading", "grader.py"))
    code, results, stderr = autograde(bundle, tmp_path, texts)
    assert code == 0, stderr
    check_format(results)
    if os.getuid() == 0:  # as on Gradescope; without root the child could read and write them
        assert list(scores(results).values()) == [0, 15, 15, 15, 15, 15, 0]
        assert "before it saved its results" in results["tests"][0]["output"]
        assert read_text(str(tmp_path / "source" / "project" / "grading" / "grader.py")) == grader
        assert stat.S_IMODE(os.stat(tmp_path / "source" / "project" / CASES_FILE).st_mode) == 0o600
    assert "LEAK" not in json.dumps(results)


def test_an_empty_upload_gets_results_that_say_so(bundle, tmp_path):
    code, results, _ = autograde(bundle, tmp_path, {})
    assert code == 0
    check_format(results)
    assert results["score"] == 0 and all(t["output"].endswith("missing from the submission.") for t in results["tests"])


def test_a_broken_bundle_still_writes_results(bundle, tmp_path):
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(tmp_path / "source")
    os.remove(tmp_path / "source" / "project" / CASES_FILE)
    (tmp_path / "submission").mkdir()
    env = {**os.environ, "AUTOGRADER_ROOT": str(tmp_path), "AUTOGRADER_PYTHON": sys.executable}
    done = subprocess.run(["bash", str(tmp_path / "source" / "run_autograder")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    with open(tmp_path / "results" / "results.json") as handle:
        results = json.load(handle)
    check_format(results)
    assert results["score"] == 0 and "could not grade" in results["output"] and CASES_FILE in results["output"]
