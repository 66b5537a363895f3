"""Grading submissions: find the student's four files, put each beside the handout's packages, run
the checks in the sandbox (grading.sandbox), judge what comes back, report.

This process decides the scores and never runs or imports a submission's code: the sandboxed
children compute outputs, gradients and loss curves on inputs that carry no answer, and this
process compares them with the recorded hidden cases (tests/snippet_cases.py: explain; the smoke
run: judge_smoke). Children cannot read the cases: they hold only their inputs, run as
another user (when the grader is root) and see the paths in ``hide`` as empty.
"""
import csv
import ctypes
import ctypes.util
import io
import json
import math
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import zipfile

import torch

from grading import REPO, GradingError, snippet_cases_module
from grading.child import LOSSES, OUTPUTS, SMOKE, SMOKE_INPUTS, SMOKE_STEPS
from grading.sandbox import LOG
from grading.snippets import assignment_blocks, blank_text, is_excluded, project_files, read_text
from utils.assignment import ASSIGNMENT_FILES, SNIPPETS
from utils.fileio import write_text_atomic

SNIPPET_POINTS = 15
SMOKE_POINTS = 10
# The smoke run against the solution's recorded run: the four losses before training and the total
# and caption losses after every step within SMOKE_RTOL (relative), then the same greedy captions with
# log-probabilities within SMOKE_LOGPROB_ATOL. The measurements behind them: docs/instructors.md,
# "Grading on your machine".
SMOKE_RTOL = 1e-4
SMOKE_LOGPROB_ATOL = 1e-3
TRAJECTORY = ("total", "caption")
LOSS_LABELS = {"total": "total loss", "caption": "caption loss", "cross_view": "cross-view loss",
               "cross_modal": "cross-modal loss"}
# The files whose code each loss passes through, the most specific first. Which losses differ
# before training narrows the search, but not to one file: at the small initial weights of the
# decoder, a mistake in the encoder can leave the caption loss as it is (measured on the known mistakes).
LOSS_FILES = {"caption": ("models/transformer_decoder.py", "models/SCORER.py"),
              "cross_view": ("utils/utils.py", "models/SCORER.py"),
              "cross_modal": ("models/CBR.py", "models/transformer_decoder.py", "models/SCORER.py")}
PACKAGES = ("configs", "models", "utils")  # what a check imports: the student's files and their neighbours
LIMITS = {"memory_mb": 2048, "file_mb": 16, "processes": 8}  # per child; see grading.sandbox
_SKIP_DIRS = {"__MACOSX", "__pycache__", ".git", ".venv", "venv", "site-packages", "node_modules"}

snippet_cases = snippet_cases_module()


# ---------------------------------------------------------------- finding submissions

def submission_name(path):
    base = os.path.basename(os.path.normpath(path))
    return base[:-4] if base.lower().endswith(".zip") else base


def batch_submissions(folder):
    """Every sub-folder or .zip of folder is one student's submission."""
    if not os.path.isdir(folder):
        raise GradingError(f"--batch {folder} is not a folder; give the folder that holds one "
                           f"sub-folder or .zip per student")
    entries = [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if not name.startswith(".")]
    found = [path for path in entries if os.path.isdir(path) or path.lower().endswith(".zip")]
    if not found:
        raise GradingError(f"{folder} holds no sub-folders or .zip files to grade")
    return found


def check_paths(paths):
    for path in paths:
        if not os.path.exists(path):
            raise GradingError(f"submission {path} does not exist")
        if not (os.path.isdir(path) or path.lower().endswith(".zip")):
            raise GradingError(f"submission {path} is neither a folder nor a .zip file")


def unpack(path, target):
    """A folder to search: path itself, or the .zip extracted into target (unsafe names skipped)."""
    if os.path.isdir(path):
        return path
    os.makedirs(target)
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            name = member.filename
            parts = name.replace("\\", "/").split("/")
            if member.is_dir() or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                continue
            destination = os.path.join(target, *parts)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            with archive.open(member) as source, open(destination, "wb") as out:
                shutil.copyfileobj(source, out)
    return target


def locate_files(folder):
    """{rel: path} for each assignment file found in folder, plus notes on missing or ambiguous ones.

    A file is found by name anywhere below folder; among several, one under the expected
    sub-folder (models/, utils/) wins, then the shallowest.
    """
    by_name = {}
    for current, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in names:
            by_name.setdefault(name, []).append(os.path.join(current, name))
    found, notes = {}, []
    for rel in ASSIGNMENT_FILES:
        candidates = by_name.get(os.path.basename(rel), [])
        if not candidates:
            notes.append(f"{rel} is missing from the submission; its snippets score 0")
            continue
        suffix = os.sep + os.path.join(*rel.split("/"))
        candidates.sort(key=lambda p: (not p.endswith(suffix), p.count(os.sep), p))
        found[rel] = candidates[0]
        if len(candidates) > 1:
            others = ", ".join(os.path.relpath(p, folder) for p in candidates[1:])
            notes.append(f"several {os.path.basename(rel)} files; graded "
                         f"{os.path.relpath(candidates[0], folder)} (ignored: {others})")
    return found, notes


# ---------------------------------------------------------------- the folders the children see

def _copy_tree(files, source, target, student_files=None):
    """Copies the relative paths ``files`` from source to target, readable by all and writable by none
    but the grader; student_files {rel: path} replace their counterparts."""
    for rel in files:
        destination = os.path.join(target, rel)
        os.makedirs(os.path.dirname(destination), mode=0o755, exist_ok=True)
        shutil.copyfile((student_files or {}).get(rel) or os.path.join(source, rel), destination)
        os.chmod(destination, 0o644)


def build_template(source, target):
    """The handout's packages (PACKAGES of ``source``, the four files blanked): what surrounds a
    student's file in every check. Returns the relative paths written."""
    blocks = assignment_blocks(source)
    files = [rel for rel in project_files(source) if rel.split("/")[0] in PACKAGES and not is_excluded(rel)]
    missing = [rel for rel in ASSIGNMENT_FILES if rel not in files]
    if missing:
        raise GradingError(f"{', '.join(missing)} not tracked by git in {source}; `git add` them first")
    _copy_tree(files, source, target)
    for rel in ASSIGNMENT_FILES:
        path = os.path.join(target, rel)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(blank_text(read_text(os.path.join(source, rel)), blocks[rel]))
    return files


def _slug(text):
    return re.sub(r"\W+", "_", text)


# ---------------------------------------------------------------- judging what a child returned

def _read_regular(path, limit):
    """The bytes of the regular file ``path`` (no symlink, FIFO or device; at most ``limit`` bytes from its end)."""
    handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(handle, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{os.path.basename(path)} is not a regular file")
        f.seek(max(0, info.st_size - limit))
        return f.read(limit), info.st_size


def _log_tail(scratch, limit=300):
    try:
        data, _ = _read_regular(os.path.join(scratch, LOG), limit)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return re.sub(r"[^\x20-\x7e\n]", "?", text).strip().replace("\n", " | ")


def _load_outputs(scratch, limit):
    """What the child saved, loaded with weights_only; None when absent or unreadable."""
    try:
        data, size = _read_regular(os.path.join(scratch, OUTPUTS), limit + 1)
        if size > limit:
            return None
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception:  # a missing, odd or hostile file is no result
        return None


_SIGNALS = {"SIGXFSZ": "it wrote more than {file_mb} MB (output or files)",
            "SIGXCPU": "it used more than {timeout:g} s of CPU time",
            "SIGKILL": "it was killed, e.g. for using too much memory",
            "SIGSEGV": "it crashed (segmentation fault)"}


def _no_result(status, scratch, options):
    if status["timed_out"]:
        return f"Stopped after {options['timeout']:g} s: an endless loop, a sleep, or far too slow."
    if status["signal"]:
        reason = _SIGNALS.get(status["signal"], f"it was stopped by {status['signal']}").format(**options)
        text = f"The check process ended without results: {reason}."
    else:
        text = (f"The check process ended (exit status {status['exit']}) before it saved its results; "
                f"does the code call sys.exit or os._exit?")
    tail = _log_tail(scratch)
    return text + (f' Its last output: "{tail}".' if tail else "")


def judge_snippet(name, rel, cases, outputs):
    """(passed, message) for a snippet check's outputs against the recorded cases."""
    unreadable = (False, "The check returned results in a form the grader cannot read.")
    if not isinstance(outputs, dict):
        return unreadable
    if "error" in outputs:
        return False, snippet_cases.sentence(f"{rel} could not be imported: {str(outputs['error'])[:600]}")
    results = outputs.get("results")
    if not (isinstance(results, list) and len(results) == len(cases) and all(isinstance(r, dict) for r in results)):
        return unreadable
    try:
        return snippet_cases.explain_all(name, cases, results)
    except Exception:  # malformed tensors or keys: never a pass, never a crash of the grader
        return unreadable


def _loss_lists(losses):
    """The child's losses if they are {name: [float]} for LOSSES, all of one length from 1 to SMOKE_STEPS."""
    if not (isinstance(losses, dict) and set(losses) == set(LOSSES)):
        return None
    lists = [losses[name] for name in LOSSES]
    if not all(isinstance(values, list) and all(type(x) is float for x in values) for values in lists):
        return None
    return losses if 0 < len(lists[0]) <= SMOKE_STEPS and all(len(v) == len(lists[0]) for v in lists) else None


def _suspects(parts):
    """The files whose code every loss in ``parts`` passes through (LOSS_FILES), as "A or B"."""
    common = [rel for rel in LOSS_FILES[parts[0]] if all(rel in LOSS_FILES[name] for name in parts)]
    return " or ".join([", ".join(common[:-1]), common[-1]] if len(common) > 2 else common)


def _loss_difference(step, names, got, expected):
    return " and ".join(f"the {LOSS_LABELS[name]} is {got[name][step]:.6g} where the solution's is "
                        f"{expected[name][step]:.6g}" for name in names)


def _smoke_difference(case, outputs, scale):
    """(passed, message) for a readable smoke run, None for an unreadable one."""
    got, expected = _loss_lists(outputs.get("losses")), case["losses"]
    if got is None:
        return None
    for step in range(len(got["total"])):
        names = LOSSES if step == 0 else TRAJECTORY
        if not all(math.isfinite(got[name][step]) for name in names):
            return False, f"The loss is not finite at step {step} of the smoke run."
        off = [name for name in names
               if not abs(got[name][step] - expected[name][step]) <= SMOKE_RTOL * scale * abs(expected[name][step])]
        off = [name for name in off if name != "total"] or off  # the total differs through its parts
        if off and step == 0:
            return False, snippet_cases.sentence(
                f"before training, {_loss_difference(0, off, got, expected)}"
                + (f"; look at {_suspects(off)}" if off != ["total"] else "")) + (
                " The smoke run trains the whole model of the four files from the solution's initial weights, "
                "so a snippet that fails its own check fails it too.")
        if off:
            return False, snippet_cases.sentence(
                f"the losses before training match the solution's, but training departs from it: after {step} "
                f"Adam step{'s' if step > 1 else ''}, {_loss_difference(step, off, got, expected)}") + (
                " Before training the decoder's weights are near 0, where many formulas give the same numbers: "
                "look for one that differs from the solution's once they grow (a missing scale, a softmax "
                "over another axis, heads merged in another order) or a value autograd does not follow "
                "(.detach(), .data, .item(), an in-place change).")
    if len(got["total"]) != SMOKE_STEPS:
        return None  # the child stops early only at a non-finite loss
    tokens, logprobs = outputs.get("tokens"), outputs.get("logprobs")
    if not (torch.is_tensor(tokens) and torch.is_tensor(logprobs)):
        return None
    want_tokens, want_logprobs = case["tokens"], case["logprobs"]
    if tokens.shape != want_tokens.shape or logprobs.shape != want_logprobs.shape:
        return False, (f"The losses match the solution's at every step, but greedy decoding returns shape "
                       f"{tuple(tokens.shape)} where {tuple(want_tokens.shape)} is expected.")
    if tokens.dtype != want_tokens.dtype or not logprobs.is_floating_point():
        return None
    differs = (tokens != want_tokens) | ~((logprobs.double() - want_logprobs.double()).abs()
                                         <= SMOKE_LOGPROB_ATOL * scale)
    if differs.any():
        row, word = differs.nonzero()[0].tolist()
        return False, (f"The losses match the solution's at every step, but greedy decoding after training "
                       f"differs: caption {row}, word {word} is token {int(tokens[row, word])} with log-probability "
                       f"{float(logprobs[row, word]):.4f} where the solution's is token {int(want_tokens[row, word])} "
                       f"with {float(want_logprobs[row, word]):.4f}.")
    return True, (f"Loss {got['total'][0]:.3f} -> {got['total'][-1]:.3f} in {SMOKE_STEPS} Adam steps, step by "
                  f"step as the solution's; greedy decoding gives its captions.")


def judge_smoke(case, outputs, scale=1.0):
    """(passed, message) for the smoke run's outputs against the recorded smoke case: its losses before
    training and at every step, then its greedy captions. ``scale`` multiplies the tolerances (the
    recorder checks its own run in float64 with a tenth of them)."""
    unreadable = (False, "The smoke run returned results in a form the grader cannot read.")
    if not isinstance(outputs, dict):
        return unreadable
    if "error" in outputs:
        return False, snippet_cases.sentence(f"the smoke run fails: {str(outputs['error'])[:600]}")
    try:
        return _smoke_difference(case, outputs, scale) or unreadable
    except Exception:  # malformed tensors: never a pass, never a crash of the grader
        return unreadable


# ---------------------------------------------------------------- grading

def _unique_names(paths):
    names, seen = [], {}
    for path in paths:
        name = re.sub(r"[^\w.-]+", "_", submission_name(path)) or "submission"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def _not_dumpable():
    """Keeps processes of the same user from reading this one's memory (the cases) through ptrace or /proc."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE


def default_jobs():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _plan(index, name, path, work, files, template, template_files, inputs):
    """The report of one submission, with the checks that need no run already decided, and the jobs
    of the others: each gets a copy of the template with the student's file(s) in place."""
    report = {"submission": name, "source": os.path.abspath(path), "notes": [], "checks": []}
    folder = os.path.join(work, secrets.token_hex(8))  # unguessable: other children cannot find it
    os.makedirs(folder, mode=0o711)
    unreadable = None
    try:
        found, report["notes"] = locate_files(unpack(path, os.path.join(work, "private", str(index))))
    except (OSError, zipfile.BadZipFile) as error:
        found, unreadable = {}, f"could not read the submission: {error}"
        report["notes"].append(unreadable)
    jobs = []
    for snippet in list(SNIPPETS) + [SMOKE]:
        rel = files.get(snippet)
        check = {"name": snippet, "file": rel, "max_points": SMOKE_POINTS if rel is None else SNIPPET_POINTS}
        report["checks"].append(check)
        missing = [r for r in ([rel] if rel else ASSIGNMENT_FILES) if r not in found]
        if unreadable or missing:
            verb = "is" if len(missing) == 1 else "are"
            check.update(passed=False, message=snippet_cases.sentence(
                unreadable or f"{', '.join(missing)} {verb} missing from the submission"))
            continue
        project = os.path.join(folder, _slug(snippet), "project")
        _copy_tree(template_files, template, project, dict(found) if rel is None else {rel: found[rel]})
        jobs.append((check, {"id": f"{index}/{snippet}", "kind": "smoke" if rel is None else "snippet",
                             "snippet": snippet, "project": project, "inputs": inputs.get(snippet),
                             "scratch": os.path.join(folder, _slug(snippet), "run")}))
    return report, jobs


def grade(paths, timeout=60.0, jobs=None, cases=None, source=REPO, hide=None, names=None, progress=None):
    """Grades each submission path (folder or .zip); returns one report dict per submission.

    cases: the hidden cases {snippet: [case]}; when None they are recorded now from the solution
    in ``source`` (the full project), which is then hidden from the children with the submissions.
    source: the project whose packages surround the student's files (blanked). hide: paths the
    children see as empty. names: one report name per path. progress(report) follows each submission.
    """
    if not sys.platform.startswith("linux"):
        raise GradingError("the grader's sandbox needs Linux (namespaces, seccomp, /proc): on macOS or "
                           "Windows grade inside a Linux container (docs/instructors.md)")
    check_paths(paths)
    if cases is None:
        from grading.recorder import record  # the full project only

        torch.set_num_threads(1)
        cases = record("hidden")
        hide = [source] + [os.path.abspath(p) for p in paths] + list(hide or [])
    _not_dumpable()
    files = {block.name: rel for rel, blocks in assignment_blocks(source).items() for block in blocks}
    if sorted(files) != sorted(SNIPPETS) or sorted(cases) != sorted(list(SNIPPETS) + [SMOKE]):
        raise GradingError(f"the project's blocks are {sorted(files)} and the recorded cases cover "
                           f"{sorted(cases)}, but the checks are {list(SNIPPETS) + [SMOKE]}; record the cases again")
    work = tempfile.mkdtemp(prefix="grading-")
    os.chmod(work, 0o711)  # children reach their own folders (random names) but cannot list the others
    try:
        private = os.path.join(work, "private")  # the grader's alone: jobs, unpacked submissions, errors
        os.makedirs(private, mode=0o700)
        template = os.path.join(work, "template")
        template_files = build_template(source, template)
        inputs = {}
        given = {name: [snippet_cases.answer_free(case) for case in cases[name]] for name in SNIPPETS}
        given[SMOKE] = {key: cases[SMOKE][key] for key in SMOKE_INPUTS}
        for name, data in given.items():
            inputs[name] = os.path.join(work, "inputs", _slug(name) + ".pt")
            os.makedirs(os.path.dirname(inputs[name]), mode=0o755, exist_ok=True)
            torch.save(data, inputs[name])
            os.chmod(inputs[name], 0o644)
        reports, checks_of = [], {}
        for index, (path, name) in enumerate(zip(paths, names or _unique_names(paths))):
            report, planned = _plan(index, name, path, work, files, template, template_files, inputs)
            reports.append(report)
            checks_of.update({job["id"]: (report, check, job) for check, job in planned})
        options = {"jobs": max(1, jobs or default_jobs()), "timeout": float(timeout), **LIMITS,
                   "hide": [os.path.abspath(p) for p in hide or []], "template": template,
                   "work": os.path.join(work, secrets.token_hex(8))}
        sandbox = _run_sandbox(options, private, cases, checks_of, progress) if checks_of else \
            "not started: nothing to run"
        for report in reports:
            report["sandbox"] = sandbox
            _total(report)
        return reports
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _total(report):
    for check in report["checks"]:
        check.setdefault("passed", False)
        check.setdefault("message", "No result: the grader's sandbox stopped before this check ran.")
        check["points"] = check["max_points"] if check["passed"] else 0
    report["total"] = sum(check["points"] for check in report["checks"])
    report["max_total"] = sum(check["max_points"] for check in report["checks"])


def _probe_summary(found, options):
    """One line on the sandbox; GradingError when a child cannot run Python at all."""
    if not isinstance(found, dict):
        raise GradingError("the sandbox's probe child returned nothing; run the grader on Linux, as root "
                           "or as a user that may create processes (docs/instructors.md, 'Security')")
    if found.get("stdlib") is not True:
        raise GradingError(f"a sandboxed child cannot import Python's standard library "
                           f"({found.get('stdlib')}): install Python where other users can read it "
                           f"(docs/instructors.md, 'Security')")
    parts = [f"user: {found.get('user')}", f"namespaces: {found.get('namespaces')}",
             f"seccomp: {found.get('seccomp')}", "network: " + ("open" if found.get("network") else "closed")]
    readable = found.get("hidden_readable") or []
    if readable:
        parts.append("READABLE by the children although hidden: " + ", ".join(readable))
    return "; ".join(parts)


def _run_sandbox(options, private, cases, checks_of, progress):
    """Runs the sandbox process, judging each check as its child ends; returns the probe's summary."""
    spec = os.path.join(private, "jobs.json")
    with open(spec, "w") as f:
        json.dump({"options": options, "jobs": [job for _, _, job in checks_of.values()]}, f)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": private}
    errors = os.path.join(private, "sandbox.err")
    outputs_limit = options["file_mb"] << 20
    remaining = {}
    for report, _, _ in checks_of.values():
        remaining[id(report)] = remaining.get(id(report), 0) + 1
    summary = None
    with open(errors, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "grading.sandbox", spec], cwd=private, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            for line in process.stdout:
                status = json.loads(line)
                if status["id"] == "probe":
                    summary = _probe_summary(_load_outputs(os.path.join(options["work"], "probe"), outputs_limit),
                                             options)
                    shutil.rmtree(options["work"], ignore_errors=True)
                    continue
                report, check, job = checks_of[status["id"]]
                outputs = _load_outputs(job["scratch"], outputs_limit)
                if outputs is None or status["timed_out"]:
                    passed, message = False, _no_result(status, job["scratch"], options)
                elif job["kind"] == "smoke":
                    passed, message = judge_smoke(cases[SMOKE], outputs)
                else:
                    passed, message = judge_snippet(job["snippet"], check["file"], cases[job["snippet"]], outputs)
                check.update(passed=passed, message=message, seconds=status["seconds"])
                shutil.rmtree(os.path.dirname(job["scratch"]), ignore_errors=True)
                remaining[id(report)] -= 1
                if progress and not remaining[id(report)]:
                    progress(_total(report) or report)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    if process.returncode:
        with open(errors) as f:
            tail = f.read().strip()[-800:]
        raise GradingError(f"the grader's sandbox failed (exit {process.returncode}): {tail}")
    return summary


# ---------------------------------------------------------------- reporting

def format_table(report, width=100):
    """The report as a table: one line per check (long notes wrap under the note column)."""
    lines = [f"Submission {report['submission']} ({report['source']})"]
    lines += [f"  note: {note}" for note in report["notes"]]
    name_width = max(len(check["name"]) for check in report["checks"])
    for check in report["checks"]:
        verdict = "pass" if check["passed"] else "FAIL"
        lead = f"  {check['name']:<{name_width}}  {verdict}  {check['points']:>2}/{check['max_points']}  "
        wrapped = textwrap.wrap(check["message"], max(width - len(lead), 40)) or [""]
        lines.append(lead + wrapped[0])
        lines += [" " * len(lead) + more for more in wrapped[1:]]
    lines.append(f"  {'total':<{name_width}}        {report['total']:>2}/{report['max_total']}")
    return "\n".join(lines)


def _write(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, text)


def write_json_reports(reports, folder):
    for report in reports:
        _write(os.path.join(folder, report["submission"] + ".json"), json.dumps(report, indent=2) + "\n")


def write_csv(reports, path):
    names = [check["name"] for check in reports[0]["checks"]]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["submission"] + names + ["total", "first_failure"])
    for report in reports:
        failures = [f"{c['name']}: {c['message']}" for c in report["checks"] if not c["passed"]]
        writer.writerow([report["submission"]] + [c["points"] for c in report["checks"]]
                        + [report["total"], failures[0] if failures else ""])
    _write(path, buffer.getvalue())
