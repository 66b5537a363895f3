"""The handout tool: blocks blanked, nothing else changed, no solution left, the rest still works."""
import difflib
import os
import re
import subprocess
import sys
import tarfile

import pytest

from grading import GradingError
from grading.snippets import ASSIGNMENT_FILES, HANDOUT_EXCLUDE, REPO, find_blocks, is_excluded, project_files

SCRIPT = os.path.join(REPO, "scripts", "make_handout.py")
EXPECTED = [("models/SCORER.py", "Attention"), ("models/CBR.py", "CBR.CrossEn"),
            ("models/transformer_decoder.py", "PositionEncoding"), ("models/transformer_decoder.py", "SelfAttention"),
            ("models/transformer_decoder.py", "CrossAttention"), ("utils/utils.py", "utils.CrossEn")]


def run_tool(*args, cwd=REPO):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    root = tmp_path_factory.mktemp("handout")
    done = run_tool("--output", str(root / "assignment"), "--tar", str(root / "assignment.tar.gz"))
    assert done.returncode == 0, done.stderr
    return root


def read(path):
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def test_positions_name_each_block_where_the_handout_has_it(handout):
    done = run_tool("--positions")
    assert done.returncode == 0, done.stderr
    entries = [re.fullmatch(r"(\S+):(\d+) (\S+)", line).groups() for line in done.stdout.splitlines()]
    assert [(rel, name) for rel, _, name in entries] == EXPECTED
    for rel, line, name in entries:
        lines = read(handout / "assignment" / rel).splitlines()
        marker = int(line) - 1
        assert "== To Implement ==" in lines[marker]
        stub = next(text for text in lines[marker:] if not text.strip().startswith("#"))
        assert stub.strip() == f'raise NotImplementedError("{name}")'


def test_only_the_solution_lines_change(handout):
    names = iter(name for _, name in EXPECTED)
    leaked_candidates = []
    for rel in ASSIGNMENT_FILES:
        before = read(os.path.join(REPO, rel)).splitlines(keepends=True)
        after = read(handout / "assignment" / rel).splitlines(keepends=True)
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, before, after, autojunk=False).get_opcodes():
            if tag == "equal":
                continue
            assert tag == "replace" and j2 - j1 == 1, (rel, before[i1:i2], after[j1:j2])
            indent = re.match(r"\s*", before[i1]).group(0)
            assert after[j1] == f'{indent}raise NotImplementedError("{next(names)}")\n'
            # The hints above stay, the end marker follows, and no comment-only line is dropped
            # except those inside the solution code.
            assert before[i1 - 1].strip().startswith("#") and "== End ==" in before[i2]
            assert not before[i1].strip().startswith("#")
            leaked_candidates += [line.split("#")[0].strip() for line in before[i1:i2]]
    assert next(names, None) is None  # all six blocks, each replaced exactly once

    # No solution line survives anywhere in the handout (e.g. in a test or a script).
    leaked_candidates = [line for line in leaked_candidates if len(line) >= 20]
    for rel in project_files(str(handout / "assignment")):
        content = (handout / "assignment" / rel).read_bytes()
        for line in leaked_candidates:
            assert line.encode() not in content, f"{rel} holds the solution line {line!r}"


def test_every_other_file_is_byte_identical_and_the_tools_stay_out(handout):
    expected = [rel for rel in project_files(REPO) if not is_excluded(rel)]
    found = sorted(os.path.relpath(os.path.join(folder, name), handout / "assignment").replace(os.sep, "/")
                   for folder, _, names in os.walk(handout / "assignment") for name in names)
    assert found == sorted(expected)
    for rel in expected:
        if rel not in ASSIGNMENT_FILES:
            with open(os.path.join(REPO, rel), "rb") as a, open(handout / "assignment" / rel, "rb") as b:
                assert a.read() == b.read(), rel
    for path in ("grading/grader.py", "scripts/grade.py", "scripts/make_handout.py", "tests/test_grader.py"):
        assert is_excluded(path)
    assert not is_excluded("scripts/extract_features.py") and not is_excluded("tests/test_models.py")
    assert all(entry.endswith("/") or entry.endswith(".py") for entry in HANDOUT_EXCLUDE)


def test_tar_holds_the_handout(handout):
    with tarfile.open(handout / "assignment.tar.gz") as tar:
        members = sorted(m.name for m in tar.getmembers() if m.isfile())
        blanked = tar.extractfile("assignment/models/CBR.py").read().decode()
    assert members == sorted("assignment/" + rel for rel in project_files(str(handout / "assignment")))
    assert 'raise NotImplementedError("CBR.CrossEn")' in blanked


def test_handout_imports_and_its_tests_without_snippets_pass(handout):
    folder = handout / "assignment"
    imported = subprocess.run([sys.executable, "-c", "import models.SCORER, models.CBR, "
                               "models.transformer_decoder, utils.utils, models.captioner"],
                              cwd=folder, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                             "not slow and not snippets", "tests/test_models.py"],
                            cwd=folder, capture_output=True, text=True, timeout=300)
    failing = re.findall(r"^FAILED (\S+)", tested.stdout, re.MULTILINE)
    assert tested.returncode == 0, ("these tests need the snippets; mark them @pytest.mark.snippets: "
                                    f"{failing}\n{tested.stdout[-2000:]}")


@pytest.mark.slow
def test_whole_handout_suite_without_snippets_passes(handout):
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                             "not slow and not snippets"], cwd=handout / "assignment",
                            capture_output=True, text=True, timeout=1200)
    assert tested.returncode in (0, 5), tested.stdout[-3000:]  # 5: nothing collected


def test_readme_positions_match_the_handout():
    readme = os.path.join(REPO, "README.md")
    if not os.path.exists(readme):
        pytest.skip("README.md does not exist yet")
    section, inside, level = [], False, 0
    for line in read(readme).splitlines():
        heading = re.match(r"(#+)\s", line)
        if heading and "code to implement" in line.lower():
            inside, level = True, len(heading.group(1))
        elif heading and inside and len(heading.group(1)) <= level:
            break
        elif inside:
            section.append(line)
    if not inside:
        pytest.skip("README.md has no 'Code To Implement' section yet")
    quoted = sorted((path.replace("\\_", "_"), int(line)) for path, line in
                    re.findall(r"([\w/\\.]+\.py),\s*line\s+(\d+)", "\n".join(section), re.IGNORECASE))
    actual = sorted((rel, int(line)) for rel, line in (
        entry.split(" ")[0].split(":") for entry in run_tool("--positions").stdout.splitlines()))
    assert quoted == actual, "update the positions in README.md to `python scripts/make_handout.py --positions`"


def test_existing_output_and_broken_markers_are_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    done = run_tool("--output", str(tmp_path / "taken"))
    assert done.returncode == 2 and "already exists" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(GradingError, match="x.py, line 3: '== To Implement ==' has no '== End =='"):
        find_blocks("class A:\n    def f(self):\n        # == To Implement == f\n        pass\n", "x.py")
    with pytest.raises(GradingError, match="x.py, line 1: the block is not inside a class"):
        find_blocks("# == To Implement ==\nx = 1\n# == End ==\n", "x.py")
