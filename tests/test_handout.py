"""The handout tool: a complete student repository with the snippets blanked, no solution left in it,
its tests passing on the untouched files and reporting the snippets still to write."""
import difflib
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from grading import GradingError
from grading import mistakes
from grading.snippets import HANDOUT_EXCLUDE, REPO, assignment_blocks, find_blocks, handout_readme, is_excluded, project_files, \
    solution_lines
from utils.assignment import ASSIGNMENT_FILES, SNIPPETS

TOOL = ["-m", "grading.make_handout"]
EXPECTED = [("models/SCORER.py", "Attention"), ("models/CBR.py", "CBR.CrossEn"),
            ("models/transformer_decoder.py", "PositionEncoding"), ("models/transformer_decoder.py", "SelfAttention"),
            ("models/transformer_decoder.py", "CrossAttention"), ("utils/utils.py", "utils.CrossEn")]
CASES = "tests/snippet_cases.pt"


def run_tool(*args, cwd=REPO):
    return subprocess.run([sys.executable, *TOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def in_handout(folder, *command, timeout=600):
    """A command run inside the handout, importing the handout's own packages."""
    env = {**os.environ, "PYTHONPATH": str(folder), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *command], cwd=folder, capture_output=True, text=True,
                          env=env, timeout=timeout)


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


def test_only_the_solution_lines_change_and_no_solution_is_left_anywhere(handout):
    names = iter(name for _, name in EXPECTED)
    for rel in ASSIGNMENT_FILES:
        before = read(os.path.join(REPO, rel)).splitlines(keepends=True)
        after = read(handout / "assignment" / rel).splitlines(keepends=True)
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, before, after, autojunk=False).get_opcodes():
            if tag == "equal":
                continue
            assert tag == "replace" and j2 - j1 == 1, (rel, before[i1:i2], after[j1:j2])
            indent = re.match(r"\s*", before[i1]).group(0)
            assert after[j1] == f'{indent}raise NotImplementedError("{next(names)}")\n'
            # The hints above stay, the end marker follows.
            assert before[i1 - 1].strip().startswith("#") and "== End ==" in before[i2]
            assert not before[i1].strip().startswith("#")
    assert next(names, None) is None  # all six blocks, each replaced exactly once

    leaked = solution_lines()
    assert len(leaked) > 15
    for rel in project_files(str(handout / "assignment")):
        content = (handout / "assignment" / rel).read_bytes()
        for line in leaked:
            assert line.encode() not in content, f"{rel} holds the solution line {line!r}"


def test_the_tools_tests_and_docs_of_instructors_stay_out(handout):
    expected = [rel for rel in project_files(REPO) if not is_excluded(rel)] + [CASES]
    found = sorted(os.path.relpath(os.path.join(folder, name), handout / "assignment").replace(os.sep, "/")
                   for folder, _, names in os.walk(handout / "assignment") for name in names)
    assert found == sorted(expected)
    for rel in expected:
        if rel not in ASSIGNMENT_FILES and rel not in ("README.md", CASES):
            with open(os.path.join(REPO, rel), "rb") as a, open(handout / "assignment" / rel, "rb") as b:
                assert a.read() == b.read(), rel
    for path in ("grading/grader.py", "grading/mistakes.py", "grading/grade.py", "grading/make_handout.py",
                 "tests/test_grader.py", "tests/test_snippet_formulas.py", "tests/test_snippet_feedback.py",
                 "tests/test_autograder.py", "tests/test_hostile_submissions.py", "docs/instructors.md"):
        assert is_excluded(path)
    assert not is_excluded("scripts/extract_features.py") and not is_excluded("tests/test_snippets.py")
    assert all(entry.endswith("/") or "." in entry for entry in HANDOUT_EXCLUDE)


def test_handout_readme_is_for_students_and_links_only_what_the_handout_holds(handout):
    folder = handout / "assignment"
    text = read(folder / "README.md")
    assert "not in the handout" not in text
    for tool in ("make_handout", "grade.py", "grading/", "docs/instructors.md", "docs/development.md"):
        assert tool not in text, tool
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if "://" not in target:
            assert (folder / target).exists(), f"README.md links {target}, which the handout lacks"
    assert "make snippets" in text and "make test" in text and "make demo" in text


def test_tar_holds_the_handout(handout):
    with tarfile.open(handout / "assignment.tar.gz") as tar:
        members = sorted(m.name for m in tar.getmembers() if m.isfile())
        blanked = tar.extractfile("assignment/models/CBR.py").read().decode()
    assert members == sorted("assignment/" + rel for rel in project_files(str(handout / "assignment")))
    assert f"assignment/{CASES}" in members
    assert 'raise NotImplementedError("CBR.CrossEn")' in blanked


# One wrong way per snippet, as students write them: (mistake of grading/mistakes.py or an edit, what
# `make snippets` must say about it).
SIX_WRONG = {
    "CBR.CrossEn": ("info_nce_both_directions", "the block computes one direction (each row against its column), "
                    "and its callers average CrossEn(S) and CrossEn(S^T): CBR.forward in models/CBR.py"),
    "utils.CrossEn": ("info_nce_over_columns", "The softmax runs over the columns (dim 0)"),
    "PositionEncoding": ("pe_sin_cos_swapped", "Sin and cos are swapped"),
    "SelfAttention": (("context = context.transpose(1, 2).reshape(B, Lq, h * dh)", "context = context"),
                      "has shape (2, 4, 5, 4) where shape (2, 5, 16) is expected, for no mask (B=2, d=16, 4 heads). "
                      "Usually the heads are not merged back"),
    "CrossAttention": ("dropout_on_output", "in training mode. Dropout (self.dropout) is applied to the merged output"),
    "Attention": ("attention_not_scaled", "The scores are not divided by sqrt(dh)"),
}


def test_snippet_check_reports_missing_then_wrong_with_a_sentence_each(handout, tmp_path):
    folder = tmp_path / "student"
    shutil.copytree(handout / "assignment", folder)
    done = in_handout(folder, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_snippets.py")
    assert done.returncode == 0, done.stdout[-3000:]
    assert done.stdout.count("not implemented yet") >= 6
    # The closing summary lists the snippets in the table's order.
    listed = ", ".join(f"{name} ({rel})" for name, rel in zip(SNIPPETS, (
        "models/CBR.py", "utils/utils.py", "models/transformer_decoder.py", "models/transformer_decoder.py",
        "models/transformer_decoder.py", "models/SCORER.py")))
    assert f"6 of 6 snippets are not implemented yet: {listed}." in done.stdout

    # The student writes every snippet, each wrong in one of the usual ways.
    texts = {rel: read(os.path.join(REPO, rel)) for rel in ASSIGNMENT_FILES}
    owner = {block.name: rel for rel, blocks in assignment_blocks(REPO).items() for block in blocks}
    for name, (how, _) in SIX_WRONG.items():
        rel = owner[name]
        if isinstance(how, tuple):
            assert texts[rel].count(how[0]) == 1
            texts[rel] = texts[rel].replace(*how)
        else:
            texts[rel] = mistakes.apply(next(m for m in mistakes.MISTAKES if m.name == how), name, texts[rel], rel)
    for rel, text in texts.items():
        (folder / rel).write_text(text)
    done = in_handout(folder, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_snippets.py")
    assert done.returncode == 1, done.stdout[-3000:]
    table = done.stdout.split("snippets ===", 1)[1].splitlines()[1:7]
    assert [line.split()[0] for line in table] == list(SNIPPETS)
    for line, (name, (_, said)) in zip(table, SIX_WRONG.items()):
        assert re.match(rf"{re.escape(name)}\s+WRONG: [A-Z].*\.$", line), line
        assert said in line, line
        assert "Failed:" not in line and "index ()" not in line, line


def test_demo_in_the_untouched_handout_stops_with_the_list(handout):
    done = in_handout(handout / "assignment", "scripts/demo.py", "--no_visdom", timeout=120)
    assert done.returncode != 0
    message = done.stderr
    assert "6 of the assignment's snippets are not implemented yet" in message and "make snippets" in message
    assert not (handout / "assignment" / "data" / "demo").exists()  # stopped before any work


@pytest.mark.slow
def test_handout_make_test_passes_and_counts_the_snippets_to_write(handout):
    done = in_handout(handout / "assignment", "-m", "pytest", "-p", "no:cacheprovider", timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "6 of 6 snippets are not implemented yet" in done.stdout
    assert not re.search(r"\d+ failed", done.stdout), done.stdout[-2000:]


def test_readme_positions_match_the_handout():
    readme = os.path.join(REPO, "README.md")
    section, inside, level = [], False, 0
    for line in read(readme).splitlines():
        heading = re.match(r"(#+)\s", line)
        if heading and "snippets" in line.lower() and "write" in line.lower():
            inside, level = True, len(heading.group(1))
        elif heading and inside and len(heading.group(1)) <= level:
            break
        elif inside:
            section.append(line)
    assert inside, "README.md needs a section on the snippets to write (a heading with 'write' and 'snippets')"
    quoted = sorted((path.replace("\\_", "_"), int(line)) for path, line in
                    re.findall(r"([\w/\\.]+\.py),\s*line\s+(\d+)", "\n".join(section), re.IGNORECASE))
    actual = sorted((rel, int(line)) for rel, line in (
        entry.split(" ")[0].split(":") for entry in run_tool("--positions").stdout.splitlines()))
    assert quoted == actual, "update the positions in README.md to `python -m grading.make_handout --positions`"


def test_existing_output_and_broken_markers_are_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    done = run_tool("--output", str(tmp_path / "taken"))
    assert done.returncode == 2 and "already exists" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(GradingError, match="x.py, line 3: '== To Implement ==' has no '== End =='"):
        find_blocks("class A:\n    def f(self):\n        # == To Implement == f\n        pass\n", "x.py")
    with pytest.raises(GradingError, match="x.py, line 1: the block is not inside a class"):
        find_blocks("# == To Implement ==\nx = 1\n# == End ==\n", "x.py")
    with pytest.raises(GradingError, match="has no '<!-- end not in the handout -->'"):
        handout_readme("a\n<!-- not in the handout -->\nb\n")
    assert handout_readme("a\n<!-- not in the handout -->\nb\n<!-- end not in the handout -->\nc\n") == "a\nc\n"
