"""The README's Quickstart commands are the ones CI and the Makefile really run."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as handle:
        return handle.read()


def quickstart_commands():
    section = read("README.md").split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def make_recipe(target):
    match = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", read("Makefile"), re.M)
    assert match, f"no '{target}' target in the Makefile"
    return match.group(1)


def test_quickstart_is_make_demo_and_make_test():
    assert quickstart_commands() == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    ci_commands = [line.strip() for line in read(".ci/run").splitlines()
                   if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci_commands[0] == "make test"


def test_make_targets_run_the_demo_and_pytest():
    assert "scripts/demo.py" in make_recipe("demo")
    assert "-m pytest" in make_recipe("test")
    # Both set the environment up first.
    assert re.search(r"^demo: setup", read("Makefile"), re.M) and re.search(r"^test: setup", read("Makefile"), re.M)
