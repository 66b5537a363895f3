"""Grading submissions: find the student's four files, build a project copy, run the checks, report.

This process never runs student code and never imports torch; grading.runner does both in
children with time limits.
"""
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile

from grading import GradingError
from grading.snippets import REPO, assignment_blocks, blank_text, project_files, read_text
from utils.assignment import ASSIGNMENT_FILES, SNIPPETS

SNIPPET_POINTS = 15
SMOKE_POINTS = 10
SMOKE = "smoke run"

_SKIP_DIRS = {"__MACOSX", "__pycache__", ".git", ".venv", "venv", "site-packages", "node_modules"}


def reference_snippets():
    """[(snippet name, file)] in assignment order; refuses a project whose blocks are blanked."""
    found = []
    for rel, blocks in assignment_blocks(REPO).items():
        lines = read_text(os.path.join(REPO, rel)).splitlines()
        for block in blocks:
            code = lines[block.code_start:block.end]
            if not code or any("raise NotImplementedError" in line for line in code):
                raise GradingError(f"{rel}: the {block.name} block holds no solution; the grader must "
                                   f"run from the full project, not from the handout")
            found.append((block.name, rel))
    order = list(SNIPPETS)
    from_checks = set(order)
    if {name for name, _ in found} != from_checks:
        raise GradingError(f"the project's blocks are {sorted(n for n, _ in found)} but the grader "
                           f"has checks for {sorted(from_checks)}; update grading/checks.py")
    return sorted(found, key=lambda item: order.index(item[0]))


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


def build_project(target, student_files):
    """A copy of the project's tracked files with the student's files in place.

    A missing student file is replaced by its blanked handout version, so nothing of the
    solution runs in its place.
    """
    blocks = assignment_blocks(REPO)
    for rel in project_files(REPO):
        destination = os.path.join(target, rel)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        if rel in student_files:
            shutil.copyfile(student_files[rel], destination)
        elif rel in blocks:
            with open(destination, "w", encoding="utf-8", newline="") as f:
                f.write(blank_text(read_text(os.path.join(REPO, rel)), blocks[rel]))
        else:
            shutil.copyfile(os.path.join(REPO, rel), destination)
    for rel in ASSIGNMENT_FILES:  # untracked in a fresh checkout: still needed
        if not os.path.exists(os.path.join(target, rel)):
            raise GradingError(f"{rel} is not tracked by git in {REPO}; `git add` it first")


# ---------------------------------------------------------------- grading

def _unique_names(paths):
    names, seen = [], {}
    for path in paths:
        name = re.sub(r"[^\w.-]+", "_", submission_name(path)) or "submission"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def grade(paths, timeout=60.0, parallel=None, work_dir=None):
    """Grades each submission path (folder or .zip); returns one report dict per submission."""
    if not hasattr(os, "fork"):
        raise GradingError("the grader forks a process per check: run it on Linux or macOS (or WSL)")
    check_paths(paths)
    snippets = reference_snippets()
    if not parallel:
        parallel = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    owned = work_dir is None
    work_dir = work_dir or tempfile.mkdtemp(prefix="grading-")
    try:
        reports, jobs = [], []
        for path, name in zip(paths, _unique_names(paths)):
            root = os.path.join(work_dir, name)
            os.makedirs(os.path.join(root, "results"))
            report = {"submission": name, "source": os.path.abspath(path), "notes": [], "checks": []}
            reports.append(report)
            unreadable = None
            try:
                folder = unpack(path, os.path.join(root, "unpacked"))
                found, report["notes"] = locate_files(folder)
                project = os.path.join(root, "project")
                build_project(project, found)
            except (OSError, zipfile.BadZipFile) as error:
                unreadable = f"could not read the submission: {error}"
                report["notes"].append(unreadable)
                found, project = {}, None
            for snippet, rel in snippets + [(SMOKE, None)]:
                check = {"name": snippet, "file": rel, "max_points": SMOKE_POINTS if rel is None else SNIPPET_POINTS}
                report["checks"].append(check)
                slug = re.sub(r"\W+", "_", snippet)
                check["result"] = os.path.join(root, "results", slug + ".json")
                if unreadable or (rel is not None and rel not in found):
                    # Scored without running anything: the reason is known now.
                    check["reason"] = unreadable or f"{rel} is missing from the submission"
                    continue
                jobs.append({"kind": "smoke" if rel is None else "snippet", "snippet": snippet, "rel": rel,
                             "project": project, "result": check["result"],
                             "log": os.path.join(root, "results", slug + ".log")})
        _run(jobs, work_dir, parallel, timeout)
        for report in reports:
            _collect(report)
        return reports
    finally:
        if owned:
            shutil.rmtree(work_dir, ignore_errors=True)


def _run(jobs, work_dir, parallel, timeout):
    if not jobs:
        return
    jobs_file = os.path.join(work_dir, "jobs.json")
    with open(jobs_file, "w") as f:
        json.dump(jobs, f)
    rounds = math.ceil(len(jobs) / parallel)
    limit = rounds * (timeout + 10) + 120
    command = [sys.executable, "-m", "grading.runner", jobs_file, "--parallel", str(parallel),
               "--timeout", str(timeout)]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return  # every check without a result fails below
    if done.returncode != 0:
        print(f"warning: the check runner failed (exit {done.returncode}): {done.stderr.strip()[-500:]}",
              file=sys.stderr)


def _collect(report):
    for check in report["checks"]:
        result_file = check.pop("result")
        if "reason" in check:
            result = {"passed": False, "message": check.pop("reason")}
        elif os.path.exists(result_file):
            with open(result_file) as f:
                result = json.load(f)
        else:
            result = {"passed": False, "message": "no result: the grader's check runner stopped"}
        check.update(result)
        check["points"] = check["max_points"] if result["passed"] else 0
    report["total"] = sum(check["points"] for check in report["checks"])
    report["max_total"] = sum(check["max_points"] for check in report["checks"])


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


def _atomic_write(path, text):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=".grading-", dir=folder)
    try:
        with os.fdopen(handle, "w", newline="") as f:
            f.write(text)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def write_json_reports(reports, folder):
    for report in reports:
        _atomic_write(os.path.join(folder, report["submission"] + ".json"), json.dumps(report, indent=2) + "\n")


def write_csv(reports, path):
    names = [check["name"] for check in reports[0]["checks"]]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["submission"] + names + ["total", "first_failure"])
    for report in reports:
        failures = [f"{c['name']}: {c['message']}" for c in report["checks"] if not c["passed"]]
        writer.writerow([report["submission"]] + [c["points"] for c in report["checks"]]
                        + [report["total"], failures[0] if failures else ""])
    _atomic_write(path, buffer.getvalue())
