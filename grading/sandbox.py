"""Runs the submissions' code: each grading job in a forked child, confined.

    python -m grading.sandbox JOBS.json      # started by grading.grader, with a clean environment

JOBS.json: {"options": {...}, "jobs": [{"id", "kind": "snippet" | "smoke", "snippet", "project",
"inputs", "scratch"}]}. This process imports torch and the handout's packages once (never a
submission's file, never an expected value) and forks one child per job, so a job starts in
milliseconds; up to options["jobs"] run at once. A child, before it runs anything of the student's:

- takes stdin from /dev/null and writes stdout and stderr to log.txt in its scratch folder;
- as root: gets its own mount and network namespaces (no network; the paths in options["hide"],
  e.g. the full project with the solution, covered by empty folders; private /tmp, /var/tmp and
  /dev/shm that vanish with it) and drops to an unprivileged user of its own (UID_BASE + its slot)
  that owns only the scratch folder; without root it tries a user namespace for the network;
- gets limits: address space, CPU seconds, processes, file size, open files, no core dumps;
- gets a seccomp filter (x86-64, aarch64) that refuses sockets other than Unix ones, new
  processes and threads (a fork bomb stays one busy process), io_uring, ptrace and reading other
  processes' memory;
- runs in the scratch folder with HOME and TMPDIR there and an environment of five variables,
  imports the submission's packages from the job's project copy, and saves what it computed there.

This process prints one JSON line per event: {"sandbox": what the probe child found} first, then
{"id", "exit", "signal", "timed_out", "seconds"} for each job. When a child ends, every process of
its user is killed (as root), or its process group (without root).
"""
import ctypes
import ctypes.util
import errno
import importlib
import json
import os
import platform
import resource
import signal
import stat
import struct
import sys
import time
import traceback

LOG = "log.txt"
UID_BASE = 64100  # the children's users, one per parallel slot: UID_BASE + slot (no login, no files)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4  # variadic in C: the kernel reads full words
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2


def _check(result, what):
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                       data and data.encode()), f"mount {target}")


# ---------------------------------------------------------------- the filesystem a child sees

def _inside(path, folder):
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _cover(folder, keep, mode="0755"):
    """Covers ``folder`` with an empty tmpfs, then binds the paths in ``keep`` (inside it) back."""
    handles = [(path, os.open(path, os.O_PATH)) for path in keep]
    try:
        _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size=16m")
        for path, handle in handles:
            if stat.S_ISDIR(os.fstat(handle).st_mode):
                os.makedirs(path, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "a").close()
            _mount(f"/proc/self/fd/{handle}", path, None, MS_BIND | MS_REC)
    finally:
        for _, handle in handles:
            os.close(handle)


def _reachable(path):
    """Lets an unprivileged user reach ``path``: every folder above it without search permission for
    others (e.g. /root, holding a pyenv Python) is covered, with the way to ``path`` bound back."""
    parts = os.path.realpath(path).strip("/").split("/")
    for depth in range(len(parts) - 1):
        folder = "/" + "/".join(parts[:depth + 1])
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            _cover(folder, ["/" + "/".join(parts[:depth + 2])])


def _private_view(options, keep):
    """The child's own mount namespace: hidden paths, a reachable Python, private temporary folders."""
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    python = [p for p in {sys.prefix, sys.base_prefix, sys.exec_prefix} if os.path.isdir(p)]
    for path in options["hide"]:
        if not os.path.exists(path):
            continue
        if os.path.isdir(path):
            _cover(path, [p for p in python + keep if _inside(p, path) and p != path])
        else:
            _mount("/dev/null", path, None, MS_BIND)
    for path in python + keep:
        _reachable(path)
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):  # private, but a Python (e.g. a venv) inside stays reachable
        if os.path.isdir(folder):
            _cover(folder, [p for p in python + keep if _inside(p, folder)], mode="1777")


# ---------------------------------------------------------------- the seccomp filter

# audit architecture, socket(), the calls refused outright (io_uring_setup, ptrace, process_vm_readv,
# process_vm_writev, clone, clone3, and fork and vfork where they exist), the first number of a foreign ABI.
_ARCH = {"x86_64": (0xC000003E, 41, (425, 101, 310, 311, 56, 435, 57, 58), 0x40000000),
         "aarch64": (0xC00000B7, 198, (425, 117, 270, 271, 220, 435), None)}


def _seccomp_program():
    """A BPF program: foreign ABIs and the refused calls get EPERM; socket() only for AF_UNIX."""
    arch, sock, refused, foreign = _ARCH[platform.machine()]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM
    program = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, deny), (ld, 0, 0, 0)]
    if foreign is not None:
        program += [(jge, 0, 1, foreign), (ret, 0, 0, deny)]
    for number in refused:
        program += [(jeq, 0, 1, number), (ret, 0, 0, deny)]
    program += [(jeq, 1, 0, sock), (ret, 0, 0, allow),
                (ld, 0, 0, 16), (jeq, 0, 1, 1), (ret, 0, 0, allow), (ret, 0, 0, deny)]  # args[0] == AF_UNIX
    return b"".join(struct.pack("HBBI", *instruction) for instruction in program), len(program)


def _install_seccomp():
    code, count = _seccomp_program()
    program = ctypes.create_string_buffer(code)
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", count, ctypes.addressof(program)))
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp")


# ---------------------------------------------------------------- confining a child

def _virtual_memory():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _tasks_of(uid):
    """Processes and threads of ``uid`` now (RLIMIT_NPROC counts them all)."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as status:
                    fields = dict(line.split(":", 1) for line in status if ":" in line)
                if int(fields["Uid"].split()[0]) == uid:
                    count += int(fields["Threads"])
            except (OSError, KeyError, ValueError):
                continue
    return count


def _limits(options, uid):
    memory = _virtual_memory() + (options["memory_mb"] << 20)  # on top of what torch already maps
    processes = options["processes"] + (0 if os.getuid() == 0 else _tasks_of(uid))
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_NPROC, processes),
                         (resource.RLIMIT_FSIZE, options["file_mb"] << 20), (resource.RLIMIT_NOFILE, 256),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    cpu = int(options["timeout"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))


def confine(job, options, slot):
    """Everything a child does before the submission's code runs; returns the features it got."""
    root = os.getuid() == 0
    uid = UID_BASE + slot if root else os.getuid()
    scratch = job["scratch"]
    got = {"user": "own unprivileged user" if root else "the grader's user"}
    if root:
        os.chown(scratch, uid, uid)
        try:
            _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
            _private_view(options, [job[key] for key in ("project", "scratch", "inputs") if job.get(key)])
            got["namespaces"] = "mount and network"
        except OSError as error:
            got["namespaces"] = f"none ({error.strerror})"
    else:
        try:
            _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNET), "unshare")
            got["namespaces"] = "network"
        except OSError as error:
            got["namespaces"] = f"none ({error.strerror})"
    _limits(options, uid)
    if root:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    try:
        _install_seccomp()
        got["seccomp"] = "network sockets, new processes and threads, ptrace, io_uring refused"
    except (KeyError, OSError) as error:
        got["seccomp"] = f"none ({error})"
    os.chdir(scratch)
    os.environ.clear()
    os.environ.update({"HOME": scratch, "TMPDIR": scratch, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                       "OMP_NUM_THREADS": "1"})
    # The submission's packages come from the project copy, and only from there.
    sys.path[:] = [job["project"]] + [p for p in sys.path if p and any(
        _inside(p, prefix) for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix))]
    for name in [n for n in sys.modules if n.split(".")[0] in ("models", "utils")]:
        del sys.modules[name]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    return got


def _child(job, options, slot):
    """The forked child: never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        os.makedirs(job["scratch"], mode=0o700)
        log = os.open(os.path.join(job["scratch"], LOG), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, 1 << 16)
        sys.stdin = open(os.devnull)
        got = confine(job, options, slot)
        from grading import child

        child.run({**job, "sandbox": got})
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# ---------------------------------------------------------------- scheduling

def _warm(options):
    """Imports torch and the handout's packages (from the template, never a submission), so children
    start with them loaded; children import the submission's packages afresh."""
    import torch

    torch.set_num_threads(1)
    # The first optimiser step imports and initialises much of torch (seconds): done once here. One
    # thread, so no thread pool is running when children are forked.
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    sys.path.insert(0, options["template"])
    for name in ("models.captioner", "models.training", "utils.utils", "grading.child"):
        importlib.import_module(name)
    sys.path.remove(options["template"])


def _stop_user(uid):
    """Kills every process of ``uid`` (a child's user), from a helper that becomes that user."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


class Running:
    def __init__(self, job, options, slot):
        self.job, self.slot, self.started = job, slot, time.monotonic()
        self.pid = os.fork()
        if self.pid == 0:
            _child(job, options, slot)
        try:
            os.setpgid(self.pid, self.pid)  # also here: either side may run first
        except OSError:
            pass

    def kill(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass


def run_all(jobs, options, report):
    pending, running, free = list(jobs), [], list(range(options["jobs"]))
    while pending or running:
        while pending and free:
            running.append(Running(pending.pop(0), options, free.pop(0)))
        time.sleep(0.02)
        for child in list(running):
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            elapsed = time.monotonic() - child.started
            timed_out = pid == 0 and elapsed > options["timeout"]
            if pid == 0 and not timed_out:
                continue
            if timed_out:
                child.kill()
                _, status = os.waitpid(child.pid, 0)
            child.kill()  # what it left behind in its group
            if os.getuid() == 0:
                _stop_user(UID_BASE + child.slot)
            running.remove(child)
            free.append(child.slot)
            code = os.waitstatus_to_exitcode(status)
            report({"id": child.job["id"], "exit": code if code >= 0 else None,
                    "signal": signal.Signals(-code).name if code < 0 and not timed_out else None,
                    "timed_out": timed_out, "seconds": round(elapsed, 2)})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as handle:
        spec = json.load(handle)
    options = spec["options"]
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    _warm(options)

    def report(line):
        print(json.dumps(line), flush=True)

    probe = {"id": "probe", "kind": "probe", "hidden": options["hide"], "project": options["template"],
             "scratch": os.path.join(options["work"], "probe")}
    run_all([probe], {**options, "jobs": 1}, report)
    run_all(spec["jobs"], options, report)


if __name__ == "__main__":
    main()
