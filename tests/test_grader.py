"""The grader: full marks for the solution, zero for the handout, and each typical mistake
(made by a text substitution on the solution, so it never drifts) costs exactly the snippet it
breaks. All submissions go through two CLI runs, shared by the tests below."""
import json
import os
import subprocess
import sys
import zipfile

import pytest

from grading.grader import SMOKE, locate_files
from grading.snippets import ASSIGNMENT_FILES, REPO, assignment_blocks, blank_text, read_text

SNIPPETS = ["CBR.CrossEn", "utils.CrossEn", "PositionEncoding", "SelfAttention", "CrossAttention", "Attention"]

# name: ([(file, old, new)], checks it must fail, a phrase the first failure's message must hold)
MISTAKES = {
    "info_nce_dim_cbr": ([("models/CBR.py", "F.log_softmax(sim_matrix, dim=-1)", "F.log_softmax(sim_matrix, dim=0)")],
                         {"CBR.CrossEn"}, "columns (dim 0)"),
    "info_nce_dim_utils": ([("utils/utils.py", "F.log_softmax(sim_matrix, dim=-1)",
                             "F.log_softmax(sim_matrix, dim=0)")], {"utils.CrossEn"}, "columns (dim 0)"),
    "sin_cos_swapped": ([("models/transformer_decoder.py", "pe[:, 0::2] = torch.sin(angle)", "pe[:, 0::2] = torch.cos(angle)"),
                         ("models/transformer_decoder.py", "pe[:, 1::2] = torch.cos(angle[", "pe[:, 1::2] = torch.sin(angle[")],
                        {"PositionEncoding"}, "sin and cos are swapped"),
    "causal_off_by_one": ([("models/transformer_decoder.py", "attention_scores = attention_scores + attention_mask  #",
                            "attention_scores = attention_scores + attention_mask.roll(1, dims=-1)  #")],
                          {"SelfAttention"}, "with a causal mask (B=2, d=16, 4 heads) — check the mask"),
    "mask_not_applied": ([("models/transformer_decoder.py", "attention_scores = attention_scores + attention_mask  #",
                           "attention_scores = attention_scores  #")],
                         {"SelfAttention"}, "the mask is not applied"),
    "no_scaling": ([("models/transformer_decoder.py",
                     "attention_scores = query_layer @ key_layer.transpose(-1, -2) / math.sqrt(self.attention_head_size)\n"
                     "        attention_probs = self.dropout(F.softmax(attention_scores, dim=-1))  # (B, h, L, N)",
                     "attention_scores = query_layer @ key_layer.transpose(-1, -2)\n"
                     "        attention_probs = self.dropout(F.softmax(attention_scores, dim=-1))  # (B, h, L, N)")],
                   {"CrossAttention"}, "not divided by sqrt(dh)"),
    "heads_merged_wrong": ([("models/SCORER.py", "context = context.transpose(1, 2).reshape(B, N,",
                             "context = context.reshape(B, N,")], {"Attention"}, "wrong order"),
    "self_heads_merged_wrong": ([("models/transformer_decoder.py", "context = context.transpose(1, 2).reshape(B, Lq,",
                                  "context = context.reshape(B, Lq,")], {"SelfAttention"}, "wrong order"),
    "exception": ([("models/SCORER.py", "attention_probs = F.softmax(attention_scores, dim=-1)",
                    "attention_probs = F.softmax(attention_scores, dim=5)")],
                  {"Attention", SMOKE}, "raises IndexError"),
    "syntax_error": ([("models/CBR.py", "loss = -torch.diagonal(log_probs).mean()", "loss = -torch.diagonal(log_probs).mean(")],
                     {"CBR.CrossEn", SMOKE}, "models/CBR.py could not be imported: raises SyntaxError"),
}
ENDLESS = ([("models/transformer_decoder.py", "context = context.transpose(1, 2).reshape(B, Lq, h * dh)  # (B, Lq, d)",
             "context = context.transpose(1, 2).reshape(B, Lq, h * dh)  # (B, Lq, d)\n        while True:\n            pass")],
           {"SelfAttention", SMOKE}, "stopped after 5 s")


def solution_texts():
    return {rel: read_text(os.path.join(REPO, rel)) for rel in ASSIGNMENT_FILES}


def mutate(substitutions):
    texts = solution_texts()
    for rel, old, new in substitutions:
        assert texts[rel].count(old) == 1, f"{old!r} must occur once in {rel}: update the mistake"
        texts[rel] = texts[rel].replace(old, new)
    return texts


def write_submission(folder, texts, flat=False, skip=()):
    for rel, text in texts.items():
        if rel in skip:
            continue
        path = os.path.join(folder, os.path.basename(rel) if flat else rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def run_grader(args, cwd):
    done = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "grade.py")] + args, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """{submission: JSON report} for the solution, the handout, every mistake and odd inputs."""
    root = tmp_path_factory.mktemp("grading")
    batch = root / "batch"
    batch.mkdir()
    # The solution comes zipped, flat and inside a stray folder, as students often send it.
    staging = root / "solution"
    write_submission(staging / "student_files", solution_texts(), flat=True)
    with zipfile.ZipFile(batch / "solution.zip", "w") as archive:
        for rel in ASSIGNMENT_FILES:
            name = "student_files/" + os.path.basename(rel)
            archive.write(staging / name, name)
    blocks = assignment_blocks(REPO)
    write_submission(batch / "handout", {rel: blank_text(text, blocks[rel]) for rel, text in solution_texts().items()})
    for name, (substitutions, _, _) in MISTAKES.items():
        write_submission(batch / name, mutate(substitutions))
    write_submission(batch / "missing_utils", solution_texts(), skip={"utils/utils.py"})
    (batch / "broken.zip").write_bytes(b"not a zip file")

    endless = root / "endless"
    write_submission(endless, mutate(ENDLESS[0]))
    json_dir = root / "json"
    table = run_grader(["--batch", str(batch), "--json", str(json_dir), "--out", str(root / "results.csv")], root)
    table += run_grader([str(endless), "--timeout", "5", "--json", str(json_dir)], root)
    reports = {}
    for name in os.listdir(json_dir):
        with open(json_dir / name) as f:
            reports[name[:-5]] = json.load(f)
    return {"reports": reports, "table": table, "csv": (root / "results.csv").read_text()}


def failed(report):
    return {check["name"] for check in report["checks"] if not check["passed"]}


def test_solution_scores_full_marks(graded):
    report = graded["reports"]["solution"]
    assert failed(report) == set(), report
    assert report["total"] == report["max_total"] == 100
    assert [check["name"] for check in report["checks"]] == SNIPPETS + [SMOKE]


def test_handout_scores_zero(graded):
    report = graded["reports"]["handout"]
    assert report["total"] == 0
    assert failed(report) == set(SNIPPETS) | {SMOKE}
    assert all("NotImplementedError" in check["message"] for check in report["checks"])


@pytest.mark.parametrize("name", sorted(MISTAKES) + ["endless"])
def test_each_mistake_costs_exactly_what_it_breaks(graded, name):
    _, broken, phrase = ENDLESS if name == "endless" else MISTAKES[name]
    report = graded["reports"][name]
    assert failed(report) == broken, [(c["name"], c["message"]) for c in report["checks"] if not c["passed"]]
    first = next(c for c in report["checks"] if not c["passed"])
    assert phrase in first["message"]
    assert report["total"] == 100 - sum(c["max_points"] for c in report["checks"] if c["name"] in broken)


def test_messages_locate_the_first_mismatch(graded):
    message = next(c["message"] for c in graded["reports"]["causal_off_by_one"]["checks"] if not c["passed"])
    assert message.startswith("the output differs from the reference at batch 0, position 0 (max abs diff ")


def test_missing_file_and_unreadable_zip_only_cost_their_part(graded):
    report = graded["reports"]["missing_utils"]
    assert failed(report) == {"utils.CrossEn", SMOKE}
    assert any("utils/utils.py is missing" in note for note in report["notes"])
    broken = graded["reports"]["broken"]
    assert broken["total"] == 0 and all("could not read the submission" in c["message"] for c in broken["checks"])


def test_table_and_csv(graded):
    assert "Submission solution" in graded["table"]
    assert "  total                   100/100" in graded["table"]
    lines = graded["csv"].splitlines()
    assert lines[0] == "submission," + ",".join(SNIPPETS) + f",{SMOKE},total,first_failure"
    assert "solution,15,15,15,15,15,15,10,100," in lines
    assert len(lines) == 1 + len(MISTAKES) + 4  # solution, handout, missing_utils, broken


def test_locate_files_prefers_the_expected_folder(tmp_path):
    write_submission(tmp_path / "repo", solution_texts())
    write_submission(tmp_path / "old", solution_texts(), flat=True)
    found, notes = locate_files(str(tmp_path))
    assert found["utils/utils.py"] == str(tmp_path / "repo" / "utils" / "utils.py")
    assert any("several utils.py files" in note for note in notes)


def test_bad_arguments_exit_2_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "grade.py"), str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
