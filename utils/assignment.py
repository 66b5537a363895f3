"""The assignment's six snippets: the files they live in, and which of them are still to be written.

Each snippet is a block between a comment line with `== To Implement ==` and one with `== End ==`
in one of ASSIGNMENT_FILES. In the student handout (grading/make_handout.py) a block's solution is
replaced by `raise NotImplementedError("<snippet name>")`, so a name in such a line is a snippet
still to write.
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The files students hand in; every snippet lives in one of them.
ASSIGNMENT_FILES = ("models/SCORER.py", "models/CBR.py", "models/transformer_decoder.py", "utils/utils.py")
# The snippets in the assignment's order; a class name found in two files carries the file's stem.
SNIPPETS = ("CBR.CrossEn", "utils.CrossEn", "PositionEncoding", "SelfAttention", "CrossAttention", "Attention")
START_MARK = "== To Implement =="
END_MARK = "== End =="
_STUB = re.compile(r'^\s*raise NotImplementedError\("([\w.]+)"\)', re.MULTILINE)


def missing_snippets(root=ROOT):
    """[(snippet name, file)] of the blocks that still raise NotImplementedError, in file order."""
    missing = []
    for rel in ASSIGNMENT_FILES:
        with open(os.path.join(root, rel), encoding="utf-8") as handle:
            missing += [(name, rel) for name in _STUB.findall(handle.read()) if name in SNIPPETS]
    return missing
