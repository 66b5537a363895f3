"""Cut the student handout: a complete student repository with the six snippets blanked.

    python scripts/make_handout.py --output DIR [--tar FILE.tar.gz]
    python scripts/make_handout.py --positions      # file:line of each block in the handout

The handout holds the tracked files minus the instructor tools and docs and the tests that spell
the snippets out (grading.snippets.HANDOUT_EXCLUDE). Inside each `== To Implement ==` block the
marker and hint comments stay and the solution lines become `raise NotImplementedError("<snippet>")`.
The README loses its parts for instructors and maintainers (between `<!-- not in the handout -->`
and `<!-- end not in the handout -->`). tests/snippet_cases.pt gets the solution's outputs on
recorded inputs, which tests/test_snippets.py (`make snippets`) compares the students' snippets with.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from grading import GradingError
from grading.snippets import (REPO, assignment_blocks, blank_text, blanked_positions, handout_readme,
                              is_excluded, project_files, read_text)
from utils.assignment import ASSIGNMENT_FILES

CASES = "tests/snippet_cases.pt"  # written by tests/snippet_cases.py, read by tests/test_snippets.py


def handout_positions(root=REPO):
    """[(relative path, 1-based line of the marker in the handout, snippet name)] in file order."""
    result = []
    for rel, blocks in assignment_blocks(root).items():
        result += [(rel, line, block.name) for block, line in blanked_positions(blocks)]
    return result


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
        recorded = subprocess.run([sys.executable, "-m", "tests.snippet_cases", "--record",
                                   os.path.join(staging, CASES)], cwd=root, capture_output=True, text=True)
        if recorded.returncode:
            raise GradingError(f"recording the snippet cases failed: {recorded.stderr.strip()[-1000:]}")
        written.append(CASES)
        missing = [rel for rel in ASSIGNMENT_FILES if rel not in written]
        if missing:
            raise GradingError(f"{', '.join(missing)} not tracked by git in {root}; `git add` them first")
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="folder to create for the handout (must not exist)")
    parser.add_argument("--tar", help="also pack the handout into this .tar.gz")
    parser.add_argument("--positions", action="store_true",
                        help="print FILE:LINE SNIPPET for each block as it sits in the handout")
    args = parser.parse_args(argv)
    if not args.output and not args.positions:
        parser.error("give --output DIR (and optionally --tar FILE.tar.gz), or --positions")
    if args.tar and not args.output:
        parser.error("--tar packs the handout folder, so it needs --output DIR as well")
    try:
        if args.positions:
            for rel, line, name in handout_positions():
                print(f"{rel}:{line} {name}")
        if args.output:
            files = write_handout(args.output)
            print(f"wrote {len(files)} files to {args.output}")
            if args.tar:
                write_tar(args.output, args.tar)
                print(f"packed {args.tar}")
    except GradingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
