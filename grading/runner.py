"""Runs grading checks, each in its own child process with a time limit.

    python -m grading.runner JOBS.json --parallel N --timeout SECONDS
    python -m grading.runner --smoke          # in a project copy: its smoke run, as one JSON line

JOBS.json lists jobs ({"kind": "snippet" or "smoke", "snippet", "rel", "project", "result", "log"}).
This process imports torch and the reference modules once and forks a child per check, so a check
starts in milliseconds (hence Linux or macOS: os.fork is needed). Student code only
ever runs in a child: a crash, an endless loop or a stray sys.exit costs that check alone. Each
child writes {"passed", "message", "seconds"} to its job's result file; the runner writes the
result of a child that timed out or died without one. The smoke run needs the submission's whole
model, so its child starts a fresh interpreter inside the project copy (--smoke).
"""
import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback

from utils.fileio import write_json_atomic


def _where(error, files):
    """' at models/CBR.py, line 16' for the innermost traceback frame in one of files {path: rel}."""
    if isinstance(error, SyntaxError) and error.filename in files:
        return f" at {files[error.filename]}, line {error.lineno}"
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename in files:
            return f" at {files[frame.filename]}, line {frame.lineno}"
    return ""


def describe(error, files):
    if isinstance(error, NotImplementedError):
        return "not implemented: raises NotImplementedError" + _where(error, files)
    text = str(error.msg if isinstance(error, SyntaxError) else error).strip().splitlines()
    detail = f": {text[0][:300]}" if text else ""
    return f"raises {type(error).__name__}{detail}{_where(error, files)}"


def _student_files(project):
    """{path: relative name} of the four student files in the project copy (for error locations)."""
    from grading import checks

    files = {os.path.join(project, rel): rel for rel in checks.REFERENCE_MODULES}
    files.update({os.path.realpath(path): rel for path, rel in files.items()})
    return files


def smoke_here():
    """The smoke run of the project in the current folder, as a result dict (python -m grading.runner --smoke)."""
    from grading import checks

    try:
        return {"passed": True, "message": checks.smoke_run()}
    except checks.Mismatch as mismatch:
        return {"passed": False, "message": str(mismatch)}
    except BaseException as error:  # anything the student's code throws, SystemExit included
        return {"passed": False, "message": describe(error, _student_files(os.getcwd()))}


def _smoke_in(project):
    """Runs the smoke run in a fresh interpreter in ``project``: there models/ and utils/ are the student's."""
    # One thread, as every check runs: checks run side by side, one per core.
    done = subprocess.run([sys.executable, "-m", "grading.runner", "--smoke"], cwd=project, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"passed": False, "message": f"the smoke run ended (exit status {done.returncode}) without a "
                                            f"result; its last output: {done.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def run_job(job):
    """Runs one check in this (child) process; returns its result dict."""
    from grading import checks

    started = time.monotonic()
    project = job["project"]
    files = _student_files(project)
    try:
        if job["kind"] == "smoke":
            result = _smoke_in(project)
            passed, message = result["passed"], result["message"]
        else:
            rel = job["rel"]
            try:
                module = checks.load_student_module(os.path.join(project, rel), rel)
            except BaseException as error:
                raise checks.Mismatch(f"{rel} could not be imported: {describe(error, files)}") from None
            reference = importlib.import_module(checks.REFERENCE_MODULES[rel])
            message = checks.SNIPPET_CHECKS[job["snippet"]](module, rel, reference)
            passed = True
    except checks.Mismatch as mismatch:
        passed, message = False, str(mismatch)
    except BaseException as error:  # anything the student's code throws, SystemExit included
        passed, message = False, describe(error, files)
    return {"passed": passed, "message": message, "seconds": round(time.monotonic() - started, 2)}


def _child_main(job):
    """Body of a forked child: logs to the job's log file, never returns."""
    code = 1
    try:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        import torch
        torch.set_num_threads(1)
        write_json_atomic(job["result"], run_job(job))
        code = 0
    except BaseException:
        traceback.print_exc()  # into the log; the runner reports its tail
    finally:
        sys.stdout.flush()
        os._exit(code)  # skip the parent's atexit handlers and buffered output


class Child:
    """One running check in a forked child, in its own process group."""

    def __init__(self, job):
        self.job = job
        self.started = time.monotonic()
        self.pid = os.fork()
        if self.pid == 0:
            os.setpgid(0, 0)
            _child_main(job)
        try:
            os.setpgid(self.pid, self.pid)  # also here: either side may run first
        except OSError:
            pass

    def poll(self):
        """The exit status, or None while running."""
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def kill(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def _log_tail(path, limit=300):
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip()
    except OSError:
        return ""
    return text[-limit:]


def run_all(jobs, parallel, timeout):
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            running.append(Child(pending.pop(0)))
        time.sleep(0.02)
        for child in list(running):
            status = child.poll()
            elapsed = time.monotonic() - child.started
            if status is None and elapsed <= timeout:
                continue
            running.remove(child)
            result_file = child.job["result"]
            if status is None:
                child.kill()
                write_json_atomic(result_file, {"passed": False, "seconds": round(elapsed, 2), "message":
                                         f"stopped after {timeout:g} s: an endless loop, or far too slow"})
            elif not os.path.exists(result_file):
                tail = _log_tail(child.job["log"])
                write_json_atomic(result_file, {"passed": False, "seconds": round(elapsed, 2), "message":
                                         f"the check process ended (exit status {status}) without a "
                                         f"result" + (f"; its last output: {tail}" if tail else "")})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", nargs="?", help="JSON list of jobs")
    parser.add_argument("--smoke", action="store_true", help="print the smoke run of the project in this folder")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.smoke:
        print(json.dumps(smoke_here()))
        return
    with open(args.jobs) as f:
        jobs = json.load(f)
    # Imported once here so every forked child starts with them loaded; no tensor is computed
    # in this process, so the children inherit no thread pool.
    import torch  # noqa: F401
    for name in ("grading.checks", "configs.defaults", "models.SCORER", "models.CBR",
                 "models.transformer_decoder", "utils.utils"):
        importlib.import_module(name)
    run_all(jobs, max(1, args.parallel), args.timeout)


if __name__ == "__main__":
    main()
