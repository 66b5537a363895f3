"""Cutting the student handout: the project's tracked files minus HANDOUT_EXCLUDE, the six snippets
blanked, the README without its parts for instructors, and the public recorded cases."""
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from grading import REPO, GradingError
from grading.snippets import assignment_blocks, blank_text, blanked_positions, handout_readme, is_excluded, \
    project_files, read_text
from utils.assignment import ASSIGNMENT_FILES

CASES = "tests/snippet_cases.pt"  # written by grading.recorder, read by tests/test_snippets.py


def handout_positions(root=REPO):
    """[(relative path, 1-based line of the marker in the handout, snippet name)] in file order."""
    result = []
    for rel, blocks in assignment_blocks(root).items():
        result += [(rel, line, block.name) for block, line in blanked_positions(blocks)]
    return result


def record_cases(kind, path, root=REPO):
    """Records the public or hidden snippet cases from the solution in ``root`` into ``path``."""
    done = subprocess.run([sys.executable, "-m", "grading.recorder", kind, path], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise GradingError(f"recording the {kind} snippet cases failed: {done.stderr.strip()[-1000:]}")


def write_handout(output, root=REPO):
    """Writes the handout folder; it must not exist yet. Returns the list of files written."""
    output = os.path.abspath(output)
    if os.path.exists(output):
        raise GradingError(f"{output} already exists; remove it or choose another --output")
    blocks = assignment_blocks(root)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    # Built beside the target and renamed at the end, so a failure leaves no half handout.
    staging = tempfile.mkdtemp(prefix=".handout-", dir=parent)
    try:
        written = []
        for rel in project_files(root):
            if is_excluded(rel):
                continue
            source, target = os.path.join(root, rel), os.path.join(staging, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if rel in blocks or rel == "README.md":
                text = read_text(source)
                with open(target, "w", encoding="utf-8", newline="") as f:
                    f.write(blank_text(text, blocks[rel]) if rel in blocks else handout_readme(text))
                shutil.copymode(source, target)
            else:
                shutil.copy2(source, target)
            written.append(rel)
        record_cases("public", os.path.join(staging, CASES), root)
        written.append(CASES)
        missing = [rel for rel in ASSIGNMENT_FILES if rel not in written]
        if missing:
            raise GradingError(f"{', '.join(missing)} not tracked by git in {root}; `git add` them first")
        os.chmod(staging, 0o755)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def write_tar(folder, tar_path):
    tar_path = os.path.abspath(tar_path)
    os.makedirs(os.path.dirname(tar_path), exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=".handout-", suffix=".tar.gz", dir=os.path.dirname(tar_path))
    os.close(handle)
    try:
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(folder, arcname=os.path.basename(os.path.abspath(folder)))
        os.replace(partial, tar_path)
    except BaseException:
        os.remove(partial)
        raise
