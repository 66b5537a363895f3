"""The local grader: full marks for the solution and for the snippets written in other correct ways,
zero for the handout, and each typical mistake (made by a text substitution on the solution, so it
never drifts) costs exactly the snippet it breaks and, when it changes the model, the smoke run,
which says where the whole model departs from the solution's. All submissions go through two CLI
runs, shared by the tests below."""
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
    # CBR averages InfoNCE over S and S^T, so the model, and the smoke run, stay the solution's.
    "info_nce_dim_cbr": ([("models/CBR.py", "F.log_softmax(sim_matrix, dim=-1)", "F.log_softmax(sim_matrix, dim=0)")],
                         {"CBR.CrossEn"}, "columns (dim 0)"),
    "info_nce_dim_utils": ([("utils/utils.py", "F.log_softmax(sim_matrix, dim=-1)",
                             "F.log_softmax(sim_matrix, dim=0)")], {"utils.CrossEn", SMOKE}, "columns (dim 0)"),
    "sin_cos_swapped": ([("models/transformer_decoder.py", "pe[:, 0::2] = torch.sin(angle)", "pe[:, 0::2] = torch.cos(angle)"),
                         ("models/transformer_decoder.py", "pe[:, 1::2] = torch.cos(angle[", "pe[:, 1::2] = torch.sin(angle[")],
                        {"PositionEncoding", SMOKE}, "Sin and cos are swapped"),
    "causal_off_by_one": ([("models/transformer_decoder.py", "attention_scores = attention_scores + attention_mask  #",
                            "attention_scores = attention_scores + attention_mask.roll(1, dims=-1)  #")],
                          {"SelfAttention", SMOKE}, "for a causal mask (B=2, d=16, 2 heads). The cases without a mask match"),
    "mask_not_applied": ([("models/transformer_decoder.py", "attention_scores = attention_scores + attention_mask  #",
                           "attention_scores = attention_scores  #")],
                         {"SelfAttention", SMOKE}, "The mask is not applied"),
    "no_scaling": ([("models/transformer_decoder.py",
                     "attention_scores = query_layer @ key_layer.transpose(-1, -2) / math.sqrt(self.attention_head_size)\n"
                     "        attention_probs = self.dropout(F.softmax(attention_scores, dim=-1))  # (B, h, L, N)",
                     "attention_scores = query_layer @ key_layer.transpose(-1, -2)\n"
                     "        attention_probs = self.dropout(F.softmax(attention_scores, dim=-1))  # (B, h, L, N)")],
                   {"CrossAttention", SMOKE}, "not divided by sqrt(dh)"),
    "heads_merged_wrong": ([("models/SCORER.py", "context = context.transpose(1, 2).reshape(B, N,",
                             "context = context.reshape(B, N,")], {"Attention", SMOKE}, "wrong order"),
    "self_heads_merged_wrong": ([("models/transformer_decoder.py", "context = context.transpose(1, 2).reshape(B, Lq,",
                                  "context = context.reshape(B, Lq,")], {"SelfAttention", SMOKE}, "wrong order"),
    "exception": ([("models/SCORER.py", "attention_probs = F.softmax(attention_scores, dim=-1)",
                    "attention_probs = F.softmax(attention_scores, dim=5)")],
                  {"Attention", SMOKE}, "raises IndexError"),
    "syntax_error": ([("models/CBR.py", "loss = -torch.diagonal(log_probs).mean()", "loss = -torch.diagonal(log_probs).mean(")],
                     {"CBR.CrossEn", SMOKE}, "models/CBR.py could not be imported: the code raises SyntaxError"),
}
ENDLESS = ([("models/transformer_decoder.py", "context = context.transpose(1, 2).reshape(B, Lq, h * dh)  # (B, Lq, d)",
             "context = context.transpose(1, 2).reshape(B, Lq, h * dh)  # (B, Lq, d)\n        while True:\n            pass")],
           {"SelfAttention", SMOKE}, "Stopped after 5 s")
# The six blocks written in other correct ways: other operations and orders, other rounding.
REWRITTEN = {
    "CBR.CrossEn": "loss = (torch.logsumexp(sim_matrix, dim=1) - sim_matrix.diagonal()).mean()\n",
    "utils.CrossEn": "loss = F.cross_entropy(sim_matrix, torch.arange(sim_matrix.size(0), device=sim_matrix.device))\n",
    "PositionEncoding": (
        "positions = torch.arange(0, max_len).float().unsqueeze(1)\n"
        "rate = torch.exp(torch.arange(0, n_filters, 2).float() * (-math.log(10000.0) / n_filters))\n"
        "pe = torch.zeros(max_len, n_filters)\n"
        "pe[:, 0::2] = torch.sin(positions * rate)\n"
        "pe[:, 1::2] = torch.cos(positions * rate)[:, :n_filters // 2]\n"),
    "SelfAttention": (
        "scale = self.attention_head_size ** -0.5\n"
        "attention_scores = torch.einsum('bhqd,bhkd->bhqk', query_layer * scale, key_layer) + attention_mask\n"
        "weights = torch.exp(attention_scores - attention_scores.amax(dim=-1, keepdim=True))\n"
        "attention_probs = self.dropout(weights / weights.sum(dim=-1, keepdim=True))\n"
        "context = torch.einsum('bhqk,bhkd->bhqd', attention_probs, value_layer)\n"
        "context = context.permute(0, 2, 1, 3).contiguous().view(context.size(0), context.size(2), -1)\n"),
    "CrossAttention": (
        "scale = self.attention_head_size ** -0.5\n"
        "attention_scores = torch.einsum('bhqd,bhkd->bhqk', query_layer, key_layer) * scale\n"
        "weights = torch.exp(attention_scores - attention_scores.amax(dim=-1, keepdim=True))\n"
        "attention_probs = self.dropout(weights / weights.sum(dim=-1, keepdim=True))\n"
        "context = torch.einsum('bhqk,bhkd->bhqd', attention_probs, value_layer)\n"
        "context = context.permute(0, 2, 1, 3).contiguous().view(context.size(0), context.size(2), -1)\n"),
    "Attention": (
        "attention_scores = torch.matmul(query_layer * self.attention_head_size ** -0.5, key_layer.transpose(2, 3))\n"
        "attention_probs = attention_scores.softmax(-1)\n"
        "attention_map = attention_probs.sum(dim=1) / attention_probs.size(1)\n"
        "context = torch.einsum('bhqk,bhkd->bhqd', self.dropout(attention_probs), value_layer)\n"
        "context = torch.cat(context.unbind(1), dim=-1)\n"),
}


def solution_texts():
    return {rel: read_text(os.path.join(REPO, rel)) for rel in ASSIGNMENT_FILES}


def mutate(substitutions):
    texts = solution_texts()
    for rel, old, new in substitutions:
        assert texts[rel].count(old) == 1, f"{old!r} must occur once in {rel}: update the mistake"
        texts[rel] = texts[rel].replace(old, new)
    return texts


def rewritten():
    """The solution's files with each block's lines replaced by REWRITTEN."""
    texts = solution_texts()
    for rel, blocks in assignment_blocks(REPO).items():
        lines = texts[rel].splitlines(keepends=True)
        for block in sorted(blocks, key=lambda b: b.start, reverse=True):
            body = REWRITTEN[block.name].splitlines()
            lines[block.code_start:block.end] = [block.indent + line + "\n" for line in body]
        texts[rel] = "".join(lines)
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
    done = subprocess.run([sys.executable, "-m", "grading.grade"] + args, cwd=cwd,
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
    write_submission(batch / "rewritten", rewritten())
    (batch / "broken.zip").write_bytes(b"not a zip file")

    endless = root / "endless"
    write_submission(endless, mutate(ENDLESS[0]))
    json_dir = root / "json"
    table = run_grader(["--batch", str(batch), "--json", str(json_dir), "--out", str(root / "results.csv"),
                        "--jobs", "2"], root)
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


def test_snippets_written_in_other_correct_ways_score_full_marks(graded):
    report = graded["reports"]["rewritten"]
    assert failed(report) == set(), [(c["name"], c["message"]) for c in report["checks"] if not c["passed"]]
    assert report["total"] == 100


def test_the_smoke_run_says_where_the_model_departs_from_the_solution(graded):
    def smoke(name):
        return next(c["message"] for c in graded["reports"][name]["checks"] if c["name"] == SMOKE)

    assert smoke("solution").endswith("step by step as the solution's; greedy decoding gives its captions.")
    assert smoke("sin_cos_swapped").startswith("Before training, the caption loss is ")
    assert "look at models/transformer_decoder.py or models/SCORER.py." in smoke("sin_cos_swapped")
    assert "the cross-view loss is " in smoke("info_nce_dim_utils")
    assert "look at utils/utils.py or models/SCORER.py." in smoke("info_nce_dim_utils")
    assert "look at models/SCORER.py." in smoke("heads_merged_wrong")
    # The decoder starts with weights near 0, where a missing 1/sqrt(dh) changes nothing yet.
    assert smoke("no_scaling").startswith("The losses before training match the solution's, but training departs")
    assert "a missing scale" in smoke("no_scaling")


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
    assert message.startswith("The output differs from the solution's at batch 0, position 0, column ")
    assert "(by up to " in message


def test_missing_file_and_unreadable_zip_only_cost_their_part(graded):
    report = graded["reports"]["missing_utils"]
    assert failed(report) == {"utils.CrossEn", SMOKE}
    assert any("utils/utils.py is missing" in note for note in report["notes"])
    broken = graded["reports"]["broken"]
    assert broken["total"] == 0 and all("could not read the submission" in c["message"].lower() for c in broken["checks"])


def test_table_and_csv(graded):
    assert "Submission solution" in graded["table"]
    assert "sandbox: user: own unprivileged user" in graded["table"] or os.getuid() != 0
    assert "  total                   100/100" in graded["table"]
    lines = graded["csv"].splitlines()
    assert lines[0] == "submission," + ",".join(SNIPPETS) + f",{SMOKE},total,first_failure"
    assert "solution,15,15,15,15,15,15,10,100," in lines
    assert len(lines) == 1 + len(MISTAKES) + 5  # solution, rewritten, handout, missing_utils, broken


def test_locate_files_prefers_the_expected_folder(tmp_path):
    write_submission(tmp_path / "repo", solution_texts())
    write_submission(tmp_path / "old", solution_texts(), flat=True)
    found, notes = locate_files(str(tmp_path))
    assert found["utils/utils.py"] == str(tmp_path / "repo" / "utils" / "utils.py")
    assert any("several utils.py files" in note for note in notes)


def test_bad_arguments_exit_2_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "grading.grade", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_the_benchmark_makes_correct_wrong_and_broken_submissions(tmp_path):
    from grading.benchmark import generate

    kinds = generate(str(tmp_path), 10)
    assert sorted(kinds.values()).count("correct") == 4 and sorted(kinds.values()).count("partly wrong") == 4
    assert {kinds["student004"], kinds["student009"]} == {"syntax error", "crash on import"}
    for name, kind in kinds.items():
        texts = {rel: (tmp_path / name / rel).read_text() for rel in ASSIGNMENT_FILES if (tmp_path / name / rel).exists()}
        changed = [rel for rel, text in texts.items() if text != solution_texts()[rel]]
        assert (not changed) == (kind == "correct"), (name, kind, changed)
        assert len(texts) == 4

