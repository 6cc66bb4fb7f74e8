"""Run untrusted Python (model-written programs) in a locked-down child process.

Layers, each independent, so one that is unavailable leaves the others standing:
  - rlimits: address space, CPU seconds, processes, file size, open files, no core dumps;
  - a wall-clock timeout that kills the whole process group, and a cap on captured output;
  - netns: a fresh, empty network namespace (unshare), where the kernel allows one;
  - setuid: as root, the program runs as nobody (65534), so host files are unwritable by OS
    permission; its fresh temporary folder (removed afterwards) is the one place it owns;
  - tmpfs: as root, that folder is a size-capped tmpfs in a private mount namespace (a disk quota);
  - audit: an audit hook in the child that ends the program on sockets, process creation, ctypes,
    and writes outside its folder. It is the only wall when the others are missing, and a weak one
    against a determined attacker: treat the kernel layers as the real ones.

The child is `python -I -S -B`: isolated (no PYTHON* variables, no user site, no cwd on sys.path),
no site-packages (a program gets the standard library only, not lathe's heavy dependencies), and no
bytecode writes. The setup itself runs in the child (_sandbox_child.py), not in a preexec_fn: that
avoids running Python between fork and exec in a parent that has threads (torch does), and lets the
child tell which layers took effect.
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lathe.errors import LatheError

log = logging.getLogger(__name__)

NOBODY = 65534
CHILD_SCRIPT = Path(__file__).with_name("_sandbox_child.py")


@dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exited 0 and was not stopped
    returncode: int | None  # negative: killed by that signal
    stdout: str
    stderr: str
    killed_reason: str | None  # "timeout", "memory limit", "blocked: network", ... in plain words
    duration_s: float
    layers: tuple[str, ...] = ()  # the layers that took effect: netns, tmpfs, rlimits, setuid, audit


def run_python(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5,
    memory_mb: int = 256,
    cpu_s: float = 5,
    max_output_bytes: int = 64_000,
    max_processes: int = 16,
    max_file_mb: int = 16,
    max_disk_mb: int = 64,
    isolate_network: bool = True,
    drop_privileges: bool = True,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run `code` as a program with `stdin`, under every layer available here (see the module doc).

    The last three switches exist to test the kernel layers on their own; leave them on otherwise."""
    if timeout_s <= 0 or cpu_s <= 0 or memory_mb <= 0 or max_output_bytes <= 0:
        raise ValueError("sandbox limits must be positive")
    uid = NOBODY if drop_privileges and os.geteuid() == 0 else None
    limits = {
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_CPU": math.ceil(cpu_s),
        # Counted per user: nobody is ours alone, but a normal user's other processes count too.
        "RLIMIT_NPROC": max_processes + (0 if uid is not None else _tasks_of(os.getuid())),
        "RLIMIT_FSIZE": max_file_mb << 20,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
    }
    if not sys.executable:
        raise LatheError("the sandbox needs a Python interpreter, but sys.executable is empty")
    with _sandbox_dir(uid) as (base, work):
        program = _write_private(os.path.join(base, "program.py"), code)
        config = dict(program=program, base=base, work=work, uid=uid, limits=limits, disk_mb=max_disk_mb,
                      isolate_network=isolate_network, audit_hook=audit_hook)
        return _run_child(config, stdin, base, timeout_s, max_output_bytes)


def _write_private(path: str, text: str) -> str:
    # 0600: the child reads it before giving up root; as nobody, the program cannot.
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _tasks_of(uid: int) -> int:
    """How many processes and threads `uid` runs now (RLIMIT_NPROC counts threads too)."""
    count = 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, ValueError, KeyError):  # not a process, or it just ended
            continue
    return count


@contextmanager
def _sandbox_dir(uid: int | None):
    """base/ (ours, traversable) holds the program and stdin; base/work/ is the program's own folder."""
    base = os.path.realpath(tempfile.mkdtemp(prefix="lathe-sandbox-"))
    try:
        os.chmod(base, 0o711)
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        if uid is not None:
            os.chown(work, uid, uid)
        yield base, work
    finally:
        _remove_tree(base)


def _remove_tree(base: str) -> None:
    # The child's bind mounts live in its private mount namespace and die with it. Should one ever
    # show here, removing the tree would delete what it mounts (the standard library): refuse.
    for entry in os.scandir(base):
        if entry.is_dir(follow_symlinks=False) and os.path.ismount(entry.path):
            log.warning("sandbox folder %s still has a mount at %s; left in place", base, entry.path)
            return

    def make_writable_and_retry(func, path, _exc_info):
        # A program may chmod its own folders to 000; as a non-root owner we must undo that first.
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
        func(path)

    shutil.rmtree(base, onerror=make_writable_and_retry)


def _run_child(config: dict, stdin: str, base: str, timeout_s: float, max_output: int) -> SandboxResult:
    stdin_path = _write_private(os.path.join(base, "stdin"), stdin)
    report_r, report_w = os.pipe()
    with open(report_r, "rb", buffering=0) as report:
        start = time.monotonic()
        try:
            proc = _start(config | {"report_fd": report_w}, stdin_path)
        finally:
            os.close(report_w)  # the child holds the only write end now: EOF when it is gone
        streams, stopped = _collect(proc, report, start + timeout_s, max_output)
        returncode, cpu_used, timed_out = _reap(proc, start + timeout_s)
        duration = time.monotonic() - start
    stdout, stderr, notes = (streams[k].decode("utf-8", "replace") for k in ("stdout", "stderr", "report"))
    layers = tuple(line[6:] for line in notes.splitlines() if line.startswith("layer "))
    reported = [line[7:] for line in notes.splitlines() if line.startswith("reason ")]
    reason = (
        stopped
        or ("timeout" if timed_out else None)
        or (reported[0] if reported else None)
        or _signal_reason(returncode, cpu_used, config["limits"]["RLIMIT_CPU"], stderr)
    )
    return SandboxResult(returncode == 0 and reason is None, returncode, stdout, stderr, reason, duration, layers)


def _start(config: dict, stdin_path: str) -> subprocess.Popen:
    command = [sys.executable, "-I", "-S", "-B", "-X", "utf8", str(CHILD_SCRIPT), json.dumps(config)]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": config["work"],
        "TMPDIR": config["work"],  # tempfile lands in the program's own folder
        "LANG": "C.UTF-8",
        "MALLOC_ARENA_MAX": "2",  # each glibc arena reserves 64 MB of the address-space limit
    }
    with open(stdin_path, "rb") as stdin_file:
        # A new session: the program and anything it starts share one process group to kill.
        return subprocess.Popen(command, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(config["report_fd"],), cwd=config["work"], env=env,
                                start_new_session=True)


def _collect(proc: subprocess.Popen, report, deadline: float, max_output: int) -> tuple[dict, str | None]:
    """Read stdout, stderr and the report pipe until they close; stop the process group at the
    deadline or when a stream passes max_output bytes. Returns (bytes per stream, why we stopped it)."""
    chunks = {"stdout": bytearray(), "stderr": bytearray(), "report": bytearray()}
    selector = selectors.DefaultSelector()
    for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr), ("report", report)):
        selector.register(stream, selectors.EVENT_READ, name)
    stopped = None
    with selector:
        while selector.get_map() and not stopped:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "timeout"
                break
            ready = selector.select(timeout=min(remaining, 0.1))
            for key, _ in ready:
                if not _read_into(chunks, key, selector) and key.data != "report":
                    stopped = stopped or _over_limit(chunks[key.data], max_output)
            if _exited(proc.pid):
                _kill_group(proc.pid)  # leftovers of an exited program would hold the pipes open
    if stopped:
        _kill_group(proc.pid)
    proc.stdout.close()
    proc.stderr.close()
    return chunks, stopped


def _read_into(chunks: dict, key: selectors.SelectorKey, selector: selectors.BaseSelector) -> bool:
    """Append what is ready on one pipe; True once it has closed."""
    data = os.read(key.fd, 65536)
    if not data:
        selector.unregister(key.fileobj)
        return True
    chunks[key.data] += data
    return False


def _over_limit(buffer: bytearray, max_output: int) -> str | None:
    if len(buffer) <= max_output:
        return None
    del buffer[max_output:]
    return "output limit"


def _exited(pid: int) -> bool:
    # WNOWAIT: look without reaping, so the group id cannot be reused before the group is swept.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _reap(proc: subprocess.Popen, deadline: float) -> tuple[int, float, bool]:
    """Wait for the child until the deadline, sweep its process group, and reap it.

    Returns its exit code, the CPU seconds it used, and whether the deadline stopped it."""
    timed_out = True
    while time.monotonic() < deadline:
        if _exited(proc.pid):
            timed_out = False
            break
        time.sleep(0.01)
    _kill_group(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime, timed_out


def _kill_group(pid: int) -> None:
    """SIGKILL the child's process group (its id is the child's pid, a session leader), and the
    child itself should it have left the group."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_reason(returncode: int, cpu_used: float, cpu_limit: int, stderr: str) -> str | None:
    if returncode >= 0:
        last = (stderr.strip().splitlines() or [""])[-1]
        if returncode and "MemoryError" in last:  # raised outside the main program: a thread, exit
            return "memory limit"
        if returncode and "[Errno 27]" in last:  # Python ignores SIGXFSZ, so the limit is an EFBIG error
            return "file size limit"
        if returncode and "[Errno 28]" in last:  # ENOSPC: the folder's tmpfs is full
            return "disk limit"
        return None
    sig = -returncode
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= cpu_limit):
        return "cpu limit"
    if sig == signal.SIGXFSZ:
        return "file size limit"
    if sig == signal.SIGKILL:
        return "killed (SIGKILL; out of memory?)"
    try:
        return f"killed by {signal.Signals(sig).name}"
    except ValueError:
        return f"killed by signal {sig}"
