"""Hostile submissions: each attacks the grader from one snippet (the snippet itself left unwritten, so
that a point there could only come from the attack) and must score 0 on that snippet and on the smoke
run (which needs it), full marks on the other snippets, while the grader finishes, a correct
submission graded beside them keeps its 100, and nothing is written outside the children's scratch
folders. Two attack the smoke run alone, with all six snippets written: they report a loss curve of
their own making, and must score 0 on it and 90 on the rest. One batch run of grading/grade.py,
shared by the tests below.

The attacks that need the privilege drop (reading another user's files, writing the grader's) are
only meaningful when the grader runs as root, as on Gradescope; elsewhere they are skipped.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from grading.grader import SMOKE
from grading.sandbox import UID_BASE
from grading.snippets import REPO, find_blocks, read_text
from tests.helpers import tree_digest
from utils.assignment import ASSIGNMENT_FILES

pytestmark = pytest.mark.slow  # one grading batch of every attack: about a minute

TIMEOUT = 8  # seconds per check: the correct submission's checks take about 3 s on a busy 2-core machine

MONKEYPATCH = """
import sys
import torch
torch.allclose = lambda *args, **kwargs: True
torch.isclose = lambda a, b, *args, **kwargs: torch.ones_like(torch.as_tensor(a), dtype=torch.bool)
torch.equal = lambda *args, **kwargs: True
for _name, _module in list(sys.modules.items()):
    if _name.startswith(("grading", "tests")):
        for _attribute in ("explain", "explain_all", "judge_snippet", "compute", "outputs_and_gradients", "run"):
            if hasattr(_module, _attribute):
                setattr(_module, _attribute, lambda *args, **kwargs: {{"outputs": [torch.zeros(())], "gradients": {{}}}})
"""
WRITE_RESULTS = """
import os
_fake = "submission,100\\n"
for _target in {targets!r}:
    try:
        with open(_target, "w") as _handle:
            _handle.write(_fake)
    except OSError:
        pass
_folder = os.getcwd()
while _folder != "/":
    for _name in ("results.json", "results.csv", "report.json"):
        try:
            with open(os.path.join(_folder, _name), "w") as _handle:
                _handle.write(_fake)
        except OSError:
            pass
    _folder = os.path.dirname(_folder)
os._exit(0)
"""
READ_PROTECTED = """
import os
def _parent(pid):
    with open(f"/proc/{{pid}}/status") as handle:
        return int(next(line.split()[1] for line in handle if line.startswith("PPid:")))
_grader = _parent(_parent(os.getpid()))
_leaked = []
for _path in {paths!r} + [f"/proc/{{_grader}}/mem", f"/proc/{{_grader}}/environ", f"/proc/{{_grader}}/maps"]:
    try:
        with open(_path, "rb") as _handle:
            if _handle.read(64):
                _leaked.append(_path)
    except OSError:
        pass
if _leaked:
    raise RuntimeError("LEAK: " + ", ".join(_leaked))
"""
FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
HUGE_ALLOCATION = """
_block = bytearray(8 << 30)
"""
PRINT_A_GIGABYTE = """
import sys
for _ in range(1 << 20):
    sys.stdout.write("x" * 1023 + "\\n")
"""
DELETE = """
import os
import shutil
for _target in {targets!r} + [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.getcwd() + "/.."]:
    shutil.rmtree(_target, ignore_errors=True)
    try:
        os.remove(_target)
    except OSError:
        pass
"""
NETWORK = """
import socket
try:
    _connection = socket.create_connection(("127.0.0.1", {port}), timeout=2)
    _connection.sendall(b"LEAK")
    _connection.close()
    raise RuntimeError("LEAK: network")
except OSError:
    pass
"""
# In the smoke run only: keeps the real losses before training (the snippets are right) and saves a
# curve that falls faster after them.
FAKES_A_FALLING_CURVE = """
import inspect
import torch
_save = torch.save
def _doctored(result, *args, **kwargs):
    if isinstance(result, dict) and isinstance(result.get("losses"), dict):
        for _name, _values in result["losses"].items():
            result["losses"][_name] = [_values[0] * (1 - _step / 40) for _step in range(len(_values))]
    return _save(result, *args, **kwargs)
if any(_frame.function == "smoke_run" for _frame in inspect.stack()):
    torch.save = _doctored
"""
# In the smoke run only: saves results of the right form, all invented, and exits.
INVENTS_THE_NUMBERS = """
import inspect
import os
import torch
if any(_frame.function == "smoke_run" for _frame in inspect.stack()):
    _curve = [2.5 - 0.03 * _step for _step in range(30)]
    torch.save(dict(losses=dict(total=_curve, caption=list(_curve), cross_view=[1.3] * 30, cross_modal=[1.4] * 30),
                    tokens=torch.full((4, 7), 3, dtype=torch.long), logprobs=torch.zeros(4, 7)), "outputs.pt")
    os._exit(0)
"""

# name: (file, the snippet it attacks or None for the smoke run alone, where the code goes: at the file's
# "top" or in the snippet's "block", code)
ATTACKS = {
    "monkeypatch": ("utils/utils.py", "utils.CrossEn", "top", MONKEYPATCH),
    "writes_results": ("models/CBR.py", "CBR.CrossEn", "top", WRITE_RESULTS),
    "reads_protected": ("models/SCORER.py", "Attention", "block", READ_PROTECTED),
    "exits_early": ("models/transformer_decoder.py", "SelfAttention", "block", "import os\nos._exit(0)\n"),
    "fork_bomb": ("models/transformer_decoder.py", "CrossAttention", "block", FORK_BOMB),
    "huge_allocation": ("models/SCORER.py", "Attention", "block", HUGE_ALLOCATION),
    "endless_loop": ("utils/utils.py", "utils.CrossEn", "block", "while True:\n    pass\n"),
    "sleeps": ("models/CBR.py", "CBR.CrossEn", "block", "import time\ntime.sleep(3600)\n"),
    "prints_a_gigabyte": ("models/transformer_decoder.py", "PositionEncoding", "block", PRINT_A_GIGABYTE),
    "deletes_files": ("models/transformer_decoder.py", "SelfAttention", "block", DELETE),
    "network": ("models/transformer_decoder.py", "CrossAttention", "block", NETWORK),
    "fakes_a_falling_curve": ("models/CBR.py", None, "top", FAKES_A_FALLING_CURVE),
    "invents_the_numbers": ("utils/utils.py", None, "top", INVENTS_THE_NUMBERS),
}
NEEDS_ROOT = {"writes_results", "reads_protected", "deletes_files"}


def attacked_texts(attack, **values):
    """The solution's four files with ``attack`` made: the attacked snippet's block unwritten (the
    attack code, then the handout's NotImplementedError), or the code at the top of the file."""
    rel, snippet, where, code = ATTACKS[attack]
    code = code.format(**values)
    texts = {r: read_text(os.path.join(REPO, r)) for r in ASSIGNMENT_FILES}
    lines = texts[rel].splitlines(keepends=True)
    if snippet:
        block = next(b for b in find_blocks(texts[rel], rel) if b.name == snippet.split(".")[-1])
        stub = [f'{block.indent}raise NotImplementedError("{snippet}")\n']
        if where == "block":
            stub = [textwrap.indent(code, block.indent)] + stub
        lines[block.code_start:block.end] = stub
    if where == "top":
        first_class = next(i for i, line in enumerate(lines) if line.startswith("class "))
        lines[first_class:first_class] = [code + "\n\n"]
    texts[rel] = "".join(lines)
    return texts


def write_files(folder, texts):
    for rel, text in texts.items():
        os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(folder, rel), "w") as handle:
            handle.write(text)


def sandbox_processes():
    """PIDs of processes that run as one of the sandbox's users."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and UID_BASE <= os.stat(f"/proc/{entry}").st_uid < UID_BASE + 64:
                found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    batch, out = root / "batch", root / "out"
    out.mkdir()
    (root / "canary.txt").write_text("the grader's own file\n")
    write_files(batch / "alice", {r: read_text(os.path.join(REPO, r)) for r in ASSIGNMENT_FILES})
    marker = f"hostile-{os.getpid()}"
    strays = [f"/tmp/{marker}", f"/var/tmp/{marker}", f"/dev/shm/{marker}", str(root / "canary.txt"),
              str(out / "results.csv"), str(out / "reports" / "alice.json"), str(batch / "alice" / "models" / "CBR.py")]
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def accept():
        while True:
            try:
                connections.append(listener.accept()[0].recv(16))
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    values = {"targets": strays, "port": listener.getsockname()[1],
              "paths": [os.path.join(REPO, "models", "SCORER.py"), os.path.join(REPO, "grading", "recorder.py"),
                        str(batch / "alice" / "models" / "SCORER.py"), str(root / "canary.txt")]}
    for attack in ATTACKS:
        write_files(batch / attack, attacked_texts(attack, **values))
    before = {"alice": tree_digest(batch / "alice"), "root": tree_digest(root)}
    done = subprocess.run([sys.executable, "-m", "grading.grade", "--batch", str(batch),
                           "--out", str(out / "results.csv"), "--json", str(out / "reports"), "--jobs", "2",
                           "--timeout", str(TIMEOUT)], cwd=root, capture_output=True, text=True, timeout=900)
    listener.close()
    reports = {}
    if done.returncode == 0:
        for name in os.listdir(out / "reports"):
            with open(out / "reports" / name) as handle:
                reports[name[:-5]] = json.load(handle)
    return {"done": done, "reports": reports, "connections": connections, "strays": strays, "root": root,
            "before": before, "after": {"alice": tree_digest(batch / "alice"), "root": tree_digest(root)},
            "csv": (out / "results.csv").read_text() if done.returncode == 0 else "", "marker": marker}


def failed(report):
    return {check["name"] for check in report["checks"] if not check["passed"]}


def test_the_grader_finishes_and_the_correct_submission_keeps_full_marks(graded):
    assert graded["done"].returncode == 0, graded["done"].stderr[-3000:]
    assert graded["reports"]["alice"]["total"] == 100, graded["reports"]["alice"]
    assert "\nalice,15,15,15,15,15,15,10,100,\n" in graded["csv"].replace("\r\n", "\n")
    assert not sandbox_processes()  # the fork bomb's processes are gone


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_each_attack_scores_zero_where_it_attacks_and_the_rest_normally(graded, attack):
    if attack in NEEDS_ROOT and os.getuid() != 0:
        pytest.skip("without root the children run as the grader's user (docs/instructors.md, 'Security')")
    report = graded["reports"][attack]
    snippet = ATTACKS[attack][1]
    attacked = {snippet, SMOKE} - {None}
    assert failed(report) == attacked, [(c["name"], c["message"]) for c in report["checks"]]
    assert report["total"] == 100 - sum(c["max_points"] for c in report["checks"] if c["name"] in attacked)
    assert not any("LEAK" in check["message"] for check in report["checks"])
    message = next(c["message"] for c in report["checks"] if c["name"] == (snippet or SMOKE))
    expected = {"fork_bomb": "Stopped after", "endless_loop": "Stopped after", "sleeps": "Stopped after",
                "prints_a_gigabyte": "File too large", "exits_early": "before it saved its results",
                "writes_results": "before it saved its results", "monkeypatch": "where the solution's is",
                "huge_allocation": "The code raises MemoryError",
                "fakes_a_falling_curve": "The losses before training match the solution's, but training departs "
                                         "from it: after 1 Adam step, the caption loss is",
                "invents_the_numbers": "Before training, the caption loss is 2.5 where the solution's is "
                }.get(attack, "NotImplementedError")
    assert expected in message, message


def test_nothing_is_written_outside_the_scratch_folders(graded):
    if os.getuid() != 0:
        pytest.skip("without root the children run as the grader's user (docs/instructors.md, 'Security')")
    assert graded["after"]["alice"] == graded["before"]["alice"]
    changed = {path for path, digest in graded["after"]["root"].items()
               if graded["before"]["root"].get(path) != digest}
    # Only the grader's own outputs are new; the submissions and the canary are as they were.
    assert all(path.startswith("out" + os.sep) for path in changed), sorted(changed)
    assert (graded["root"] / "canary.txt").read_text() == "the grader's own file\n"
    for stray in graded["strays"][:3]:
        assert not os.path.exists(stray), stray


def test_no_connection_leaves_the_sandbox(graded):
    assert graded["connections"] == []


def test_the_seccomp_filter_alone_refuses_network_sockets_and_new_processes():
    """Where namespaces are missing (e.g. Docker's defaults), the filter still holds."""
    from grading import sandbox

    pid = os.fork()
    if pid == 0:  # exit status: a bit per refusal that did not happen
        status = 0
        try:
            sandbox._install_seccomp()
            try:
                socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                status |= 1
            except OSError:
                pass
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()  # still allowed
            try:
                if os.fork() == 0:
                    os._exit(0)
                status |= 2
            except OSError:
                pass
            try:
                threading.Thread(target=lambda: None).start()
                status |= 4
            except RuntimeError:
                pass
        except BaseException:
            status = 8
        os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
