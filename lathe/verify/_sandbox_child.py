"""The sandboxed interpreter's own code: lock the process down, then run the untrusted program.

lathe.verify.sandbox starts `python -I -S -B -X utf8 _sandbox_child.py CONFIG_JSON` in a fresh
session; this file is that script and is never imported by lathe. It uses only the standard library.

Two stages, two interpreters. Stage "setup" makes the namespaces and mounts, which need root and
need libc through ctypes, then execs a fresh interpreter for stage "run": ctypes must not be loaded
in the interpreter that runs the program, since its already-built function pointers (memmove and
friends) can be called without any audit event. Stage "run" sets resource limits, switches to an
unprivileged uid (after which nothing can be undone) and installs the audit hook last, just before
the program, so that our own setup is not refused by it. Each layer that takes effect is written as
`layer NAME` to the report pipe, and a refused action as `reason ...`, so the parent can tell the
caller in plain words what happened.
"""

import json
import os
import resource
import stat
import sys
import types

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
BLOCKED_EXIT = 97
PYTHON_FLAGS = ["-I", "-S", "-B", "-X", "utf8"]


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg.get("stage", "setup") == "setup":
        setup(cfg)
    else:
        lock_down_and_run(cfg)


def note(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())


# --- stage "setup": namespaces and mounts (root, or a user namespace) --------------------------


def setup(cfg: dict) -> None:
    libc = load_libc()
    if cfg["isolate_network"] and unshare_network(libc):
        note(cfg["report_fd"], "layer netns")
    if cfg["uid"] is not None:  # root: mounts are ours to make, in a namespace of our own
        private = private_mount_namespace(libc)
        if private and mount_tmpfs(libc, cfg["work"], cfg["disk_mb"], cfg["uid"]):
            note(cfg["report_fd"], "layer tmpfs")
        cfg["moved"] = make_stdlib_reachable(libc, cfg["base"], private)
        if cfg["moved"] is None:
            cfg["uid"] = None  # the program could not import anything as that uid: stay, degraded
    cfg["stage"] = "run"
    os.execv(sys.executable, [sys.executable, *PYTHON_FLAGS, __file__, json.dumps(cfg)])


def load_libc():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


def unshare_network(libc) -> bool:
    """A fresh network namespace has only a loopback device, and it is down: nothing is reachable.

    Root may unshare one directly; other users may get one inside a new user namespace, where the
    system allows. Not root via a user namespace: that would cost it access to the folder it made
    for nobody, while it may still become nobody without one."""
    if libc is None:
        return False
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    return libc.unshare(flags) == 0


def private_mount_namespace(libc) -> bool:
    """Mounts made after this are seen by this process alone and vanish when it ends."""
    if libc is None or libc.unshare(CLONE_NEWNS) != 0:
        return False
    # Without this, mounts below could propagate back to the host's (shared) mount tree.
    return libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0


def mount_tmpfs(libc, work: str, size_mb: int, uid: int) -> bool:
    """The program's folder becomes a size-capped tmpfs: a disk quota, since RLIMIT_FSIZE only caps
    each file, and a program could otherwise fill the host's disk with many."""
    options = f"size={size_mb}m,mode=0700,uid={uid},gid={uid}".encode()
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    return libc.mount(b"tmpfs", os.fsencode(work), b"tmpfs", flags, options) == 0


def make_stdlib_reachable(libc, base: str, private: bool) -> dict | None:
    """After the switch to nobody, imports still need the standard library. Where it sits out of
    that uid's reach (say /root/.pyenv, /root being mode 700), bind-mount it read-only into the
    sandbox folder, which needs the private mount namespace.

    Returns {original path: mounted copy} (empty when nothing is hidden), or None on failure."""
    hidden = [p for p in sys.path if os.path.isdir(p) and not reachable_by_others(p)]
    if not hidden:
        return {}
    if not private:
        return None
    moved = {}
    for i, path in enumerate(hidden):
        moved[path] = os.path.join(base, f"lib{i}")
        os.mkdir(moved[path], 0o755)
        if not bind_read_only(libc, path, moved[path]):
            return None
    return moved


def bind_read_only(libc, source: str, target: str) -> bool:
    src, dst = os.fsencode(source), os.fsencode(target)
    if libc.mount(src, dst, None, MS_BIND | MS_REC, None) != 0:
        return False
    return libc.mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_REC, None) == 0


def reachable_by_others(path: str) -> bool:
    path = os.path.realpath(path)
    if not os.stat(path).st_mode & stat.S_IROTH:
        return False
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


# --- stage "run": limits, privileges, audit hook, program -------------------------------------


def lock_down_and_run(cfg: dict) -> None:
    report_fd = cfg["report_fd"]
    with open(cfg["program"], encoding="utf-8") as f:  # read while still privileged: it is root-only
        source = f.read()
    limit_resources(cfg["limits"])
    note(report_fd, "layer rlimits")
    if cfg["uid"] is not None:
        repoint_imports(cfg["moved"])
        if drop_privileges(cfg["uid"]):
            note(report_fd, "layer setuid")
    os.chdir(cfg["work"])
    if cfg["audit_hook"]:
        sys.addaudithook(make_hook(os.path.realpath(cfg["work"]), report_fd))
        note(report_fd, "layer audit")
    run_program(source, report_fd)


def limit_resources(limits: dict) -> None:
    for name, value in limits.items():
        which = getattr(resource, name)
        # CPU: SIGXCPU at the soft limit, SIGKILL a second later should the program ignore it.
        hard = value + 1 if name == "RLIMIT_CPU" else value
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            value, hard = min(value, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (value, hard))


def repoint_imports(moved: dict[str, str]) -> None:
    """Send future imports to the mounted copies: sys.path, and the __path__ of packages already
    imported (collections.abc is looked up through collections.__path__)."""

    def repoint(entry: str) -> str:
        for old, new in moved.items():
            if entry == old or entry.startswith(old + os.sep):
                return new + entry[len(old):]
        return entry

    sys.path[:] = [repoint(entry) for entry in sys.path]
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if isinstance(search, list):
            search[:] = [repoint(entry) for entry in search]
    sys.path_importer_cache.clear()


def drop_privileges(uid: int) -> bool:
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    except OSError:
        return False
    return os.getuid() == uid and os.geteuid() == uid


def run_program(source: str, report_fd: int) -> None:
    import builtins
    import linecache
    import traceback

    # -S skips site, which is what defines exit() and quit(); programs do call them.
    builtins.exit = builtins.quit = sys.exit
    main_module = types.ModuleType("__main__")
    main_module.__builtins__ = builtins
    sys.modules["__main__"] = main_module
    sys.argv = ["main.py"]
    # Tracebacks then quote the program's lines (the file itself is not readable from here).
    linecache.cache["main.py"] = (len(source), None, source.splitlines(True), "main.py")
    try:
        exec(compile(source, "main.py", "exec"), main_module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        if isinstance(exc, MemoryError):
            note(report_fd, "reason memory limit")
        # Print the traceback from the program's first frame on, without this script's frames.
        traceback.print_exception(exc.with_traceback(exc.__traceback__.tb_next))
        sys.exit(1)
    finally:
        sys.stdout.flush()


# --- the audit hook --------------------------------------------------------------------------
#
# Audit hooks see every socket, process, ctypes and file-open event of this interpreter. They are a
# second wall, not a sandbox on their own: CPython's own docs say a determined program can get
# around them. So the hook is written not to make that easy: every name it uses is bound as a
# default argument (builtins and module globals could be patched; the hook's defaults may not be,
# see check_tamper), nothing references it once installed, and gc's object walkers are refused.
# On a refused event it does not raise (a program could catch that) but reports and exits.
#
# Paths are checked as strings, without following symlinks. That is sound because the program's
# folder starts empty and nothing in it can lead out: symlinks must point inside without "..",
# the working directory must stay inside, relative paths that change things may not contain "..",
# and directories outside may not be opened (an fd of one, as dir_fd, would be invisible here).

PROCESS_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn",
})
# event -> ((index of a path argument, index of its dir_fd argument or -1), ...)
PATH_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, -1),),
    "os.chflags": ((0, -1),), "os.lchflags": ((0, -1),), "os.setxattr": ((0, -1),),
    "os.removexattr": ((0, -1),), "sqlite3.connect": ((0, -1),), "os.chdir": ((0, -1),),
}
TAMPER_NAMES = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
NATIVE_MODULES = frozenset({"ctypes", "_ctypes"})
INTROSPECTION_EVENTS = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents"})
HARMLESS_WRITES = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
OUTSIDE = "blocked: write outside sandbox"


def make_hook(root: str, report_fd: int):
    def fd_path(fd, _readlink=os.readlink):
        try:
            return _readlink("/proc/self/fd/%d" % fd)
        except (OSError, TypeError, OverflowError):
            return None

    def as_text(path, _bytes=bytes, _isinstance=isinstance):
        return path.decode("utf-8", "surrogateescape") if _isinstance(path, _bytes) else path

    def resolve(path, dir_fd=-1, _str=str, _int=int, _bool=bool, _isinstance=isinstance,
                _getcwd=os.getcwd, _fd_path=fd_path, _as_text=as_text):
        """Absolute, normalized path of a str/bytes path or an fd; None when it cannot be told."""
        if _isinstance(path, _int) and not _isinstance(path, _bool):
            return _fd_path(path)
        path = _as_text(path)
        if not _isinstance(path, _str):
            return None
        if not path.startswith("/"):
            base = _getcwd() if dir_fd is None or dir_fd == -1 else _fd_path(dir_fd)
            if base is None:
                return None
            path = base + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def climbs(path, _str=str, _isinstance=isinstance, _as_text=as_text):
        # A relative path with "..": against a directory we cannot see (a dir_fd, or a cwd changed
        # by another thread between check and use) it could lead out, so it may not change things.
        path = _as_text(path)
        return _isinstance(path, _str) and not path.startswith("/") and ".." in path.split("/")

    def inside(path, _root=root):
        return path is not None and (path == _root or path.startswith(_root + "/"))

    def outside_dir(path, _stat=os.stat, _isdir=stat.S_ISDIR, _inside=inside):
        try:
            return not _inside(path) and _isdir(_stat(path).st_mode)
        except (OSError, ValueError, TypeError):
            return False  # the open itself will fail the same way

    def check_open(args, _resolve=resolve, _climbs=climbs, _inside=inside, _outside_dir=outside_dir,
                   _write_flags=WRITE_FLAGS, _harmless=HARMLESS_WRITES, _int=int, _isinstance=isinstance):
        path, _, flags = args
        if _isinstance(path, _int):
            return None  # an fd the program already holds: its access mode was checked when opened
        full = _resolve(path)
        if flags & _write_flags and (_climbs(path) or not (_inside(full) or full in _harmless)):
            return OUTSIDE
        if _outside_dir(full):
            return OUTSIDE + " (directory handle)"
        return None

    def check_paths(event, args, _resolve=resolve, _climbs=climbs, _inside=inside, _table=PATH_EVENTS):
        if event == "sqlite3.connect" and args[0] in (":memory:", "", b":memory:", b""):
            return None
        for path_at, dir_fd_at in _table[event]:
            path = args[path_at]
            if _climbs(path) or not _inside(_resolve(path, args[dir_fd_at] if dir_fd_at >= 0 else -1)):
                return "blocked: leaving the sandbox folder" if event == "os.chdir" else OUTSIDE
        return None

    def check_symlink(args, _resolve=resolve, _inside=inside, _str=str, _isinstance=isinstance, _as_text=as_text):
        # No ".." in the target even when it resolves inside: moved elsewhere, the link would not.
        target, link, dir_fd = _as_text(args[0]), args[1], args[2]
        link_path = _resolve(link, dir_fd)
        if link_path is None or not _isinstance(target, _str) or ".." in target.split("/"):
            return OUTSIDE + " (symlink)"
        if not target.startswith("/"):
            target = link_path.rsplit("/", 1)[0] + "/" + target
        return None if _inside(link_path) and _inside(_resolve(target)) else OUTSIDE + " (symlink)"

    def check_signal(event, args, _pid=os.getpid()):
        target = args[0]
        ok = target in (0, _pid) if event == "os.kill" else target == _pid
        return None if ok else "blocked: signal to another process"

    def check_tamper(target, _function=types.FunctionType, _type=type, _ours=__file__):
        # The standard library itself sets __defaults__ and __code__ (namedtuple, asyncio): only
        # the hook's own functions, compiled from this file, are off limits.
        if _type(target) is _function and target.__code__.co_filename == _ours:
            return "blocked: tampering with the sandbox"
        return None

    def reason_for(event, args, _process=PROCESS_EVENTS, _paths=PATH_EVENTS,
                   _tamper=TAMPER_NAMES, _introspect=INTROSPECTION_EVENTS, _native=NATIVE_MODULES, _unix=1,
                   _check_open=check_open, _check_paths=check_paths,
                   _check_symlink=check_symlink, _check_signal=check_signal, _check_tamper=check_tamper):
        if event == "open":
            return _check_open(args)
        if event in _paths:
            return _check_paths(event, args)
        if event.startswith("socket."):
            # Unix socket pairs are local plumbing (asyncio makes one); anything else is network.
            return None if event == "socket.__new__" and args[1] == _unix else "blocked: network"
        if event in _process:
            return "blocked: process creation"
        if event.startswith("ctypes.") or event == "sqlite3.enable_load_extension":
            return "blocked: native code"
        if event == "import" and args[0] in _native:
            return "blocked: native code"
        if event == "os.symlink":
            return _check_symlink(args)
        if event in ("os.kill", "os.killpg"):
            return _check_signal(event, args)
        if event in _introspect:
            return "blocked: tampering with the sandbox"
        if event in ("object.__setattr__", "object.__delattr__") and args[1] in _tamper:
            return _check_tamper(args[0])
        return None

    def hook(event, args, _reason_for=reason_for, _report=report_fd, _write=os.write,
             _exit=os._exit, _flush=(sys.stdout.flush, sys.stderr.flush), _code=BLOCKED_EXIT):
        try:
            reason = _reason_for(event, args)
        except Exception:  # an argument shape we did not foresee: refuse rather than guess
            reason = "blocked: " + event
        if reason is None:
            return
        for flush in _flush:
            try:
                flush()
            except Exception:
                pass
        _write(2, ("sandbox: %s (%s)\n" % (reason, event)).encode())
        _write(_report, ("reason %s\n" % reason).encode())
        _exit(_code)

    return hook


if __name__ == "__main__":
    main()
