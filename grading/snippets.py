"""Finding the `== To Implement ==` blocks, blanking them, and listing the project's files."""
import os
import re
import subprocess
from dataclasses import dataclass

from grading import REPO, GradingError
from utils.assignment import ASSIGNMENT_FILES, END_MARK, START_MARK

# Paths that never go into the handout: the tools that hold or compute the solution, the tests
# that spell the snippets out or need the grading tools, and the instructors' and maintainers'
# documentation.
# An entry ending in "/" excludes a whole folder.
HANDOUT_EXCLUDE = ("grading/", "tests/test_handout.py",
                   "tests/test_grader.py", "tests/test_snippet_formulas.py", "tests/test_snippet_feedback.py",
                   "tests/test_autograder.py", "tests/test_hostile_submissions.py", "docs/instructors.md",
                   "docs/development.md")

# Folders skipped when the project is not a git checkout.
_WALK_SKIP = {".git", ".venv", "data", "experiments", "__pycache__", ".pytest_cache"}


@dataclass
class Block:
    """One snippet: lines are 0-based indices into the file's lines."""
    path: str  # relative to the project root, with "/" separators
    name: str  # e.g. "SelfAttention" or "CBR.CrossEn"
    start: int  # the `== To Implement ==` line
    code_start: int  # first line after the hint comments (the solution starts here)
    end: int  # the `== End ==` line
    indent: str


def _is_comment(line):
    return line.strip().startswith("#")


def _enclosing_class(lines, index):
    for line in reversed(lines[:index]):
        match = re.match(r"class (\w+)", line)
        if match:
            return match.group(1)
    return None


def find_blocks(text, path):
    """The blocks of one file's text, in file order; malformed markers raise GradingError."""
    lines = text.splitlines(keepends=True)
    blocks, open_at = [], None
    for index, line in enumerate(lines):
        if not _is_comment(line):
            continue
        if START_MARK in line:
            if open_at is not None:
                raise GradingError(f"{path}, line {index + 1}: a second '{START_MARK}' before the "
                                   f"'{END_MARK}' of the block at line {open_at + 1}")
            open_at = index
        elif END_MARK in line:
            if open_at is None:
                raise GradingError(f"{path}, line {index + 1}: '{END_MARK}' without a '{START_MARK}' above it")
            code_start = open_at + 1
            while code_start < index and _is_comment(lines[code_start]):
                code_start += 1
            owner = _enclosing_class(lines, open_at)
            if owner is None:
                raise GradingError(f"{path}, line {open_at + 1}: the block is not inside a class, so it "
                                   f"has no snippet name")
            indent = re.match(r"\s*", lines[open_at]).group(0)
            blocks.append(Block(path, owner, open_at, code_start, index, indent))
            open_at = None
    if open_at is not None:
        raise GradingError(f"{path}, line {open_at + 1}: '{START_MARK}' has no '{END_MARK}' below it")
    return blocks


def read_text(path):
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def assignment_blocks(root=REPO, texts=None):
    """{relative path: [Block]} for the assignment files under root (or the given texts).

    Names are the enclosing class; a class name that occurs in two files gets the file's stem
    in front ("CBR.CrossEn", "utils.CrossEn").
    """
    found = {}
    for rel in ASSIGNMENT_FILES:
        text = texts[rel] if texts is not None else read_text(os.path.join(root, rel))
        found[rel] = find_blocks(text, rel)
    owners = [block.name for blocks in found.values() for block in blocks]
    for rel, blocks in found.items():
        stem = os.path.splitext(os.path.basename(rel))[0]
        for block in blocks:
            if owners.count(block.name) > 1:
                block.name = f"{stem}.{block.name}"
    names = [block.name for blocks in found.values() for block in blocks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise GradingError(f"two blocks share the snippet name(s) {', '.join(duplicates)}; give each "
                           f"its own class")
    return found


def blank_text(text, blocks):
    """The text with each block's solution lines replaced by one `raise NotImplementedError`."""
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    for block in sorted(blocks, key=lambda b: b.start, reverse=True):
        stub = f'{block.indent}raise NotImplementedError("{block.name}"){newline}'
        lines[block.code_start:block.end] = [stub]
    return "".join(lines)


HANDOUT_DROP = ("<!-- not in the handout -->", "<!-- end not in the handout -->")


def handout_readme(text):
    """The README without its parts for instructors and maintainers (between the HANDOUT_DROP markers)."""
    begin, end = HANDOUT_DROP
    kept = []
    while begin in text:
        head, rest = text.split(begin, 1)
        if end not in rest:
            raise GradingError(f"README.md: '{begin}' has no '{end}' after it")
        kept.append(head)
        text = rest.split(end, 1)[1].lstrip("\n")
    return "".join(kept) + text


def blanked_positions(blocks):
    """1-based line of each block's `== To Implement ==` marker once the file is blanked."""
    positions, removed = [], 0
    for block in sorted(blocks, key=lambda b: b.start):
        positions.append((block, block.start + 1 - removed))
        removed += (block.end - block.code_start) - 1
    return positions


def is_excluded(rel):
    return any(rel == entry or (entry.endswith("/") and rel.startswith(entry)) for entry in HANDOUT_EXCLUDE)


def project_files(root=REPO):
    """Relative paths of the project's tracked files (git ls-files), or a filtered walk without git."""
    try:
        listed = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True, check=True)
        files = [name for name in listed.stdout.decode("utf-8").split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _WALK_SKIP)
            for name in names:
                if not name.endswith((".pyc", ".tmp")):
                    files.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    # A file deleted from the working tree but still in the index is not part of the project now.
    return sorted(rel for rel in files if os.path.isfile(os.path.join(root, rel)))


def solution_lines(root=REPO, shortest=20):
    """The solution lines of the six blocks (comments removed) long enough to be telling: none of them
    may appear in anything given to students or put on a grading machine."""
    lines = []
    for rel, blocks in assignment_blocks(root).items():
        text = read_text(os.path.join(root, rel)).splitlines()
        for block in blocks:
            lines += [line.split("#")[0].strip() for line in text[block.code_start:block.end]]
    return [line for line in lines if len(line) >= shortest]
