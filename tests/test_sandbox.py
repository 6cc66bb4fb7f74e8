"""The code sandbox: programs run, and what they must not do is stopped, reported, and without effect.

Every hostile program here is bounded on its own (a fork loop of at most 60, a listener on
loopback only, targets inside tmp_path), so a broken sandbox fails a test without harming the host.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lathe.verify.sandbox import run_python


@pytest.fixture(scope="module")
def layers() -> tuple[str, ...]:
    """The layers this machine grants (unshare and setuid need root and a permissive container)."""
    return run_python("pass").layers


def needs(layers, layer):
    if layer not in layers:
        pytest.skip(f"the {layer} layer is not available here")


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield server
    server.close()


def connect_code(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"


def assert_no_connection(server: socket.socket):
    time.sleep(0.05)
    with pytest.raises(BlockingIOError):
        server.accept()


@pytest.fixture
def host_file(tmp_path):
    path = tmp_path / "host.txt"
    path.write_text("original")
    return path


def test_program_reads_stdin_and_prints():
    code = "import sys, json\nnums = [int(x) for x in sys.stdin.read().split()]\nprint(json.dumps(sum(nums)))"
    result = run_python(code, stdin="1 2 3\n")
    assert result.ok and result.killed_reason is None
    assert result.stdout == "6\n" and result.returncode == 0
    assert {"rlimits", "audit"} <= set(result.layers)


def test_failing_program_is_not_ok_but_not_stopped():
    result = run_python("import sys\nprint('partial')\nsys.exit(3)")
    assert (result.ok, result.returncode, result.killed_reason, result.stdout) == (False, 3, None, "partial\n")
    crashed = run_python("x = 1\ny = x / 0")
    assert crashed.returncode == 1 and crashed.killed_reason is None
    assert "ZeroDivisionError" in crashed.stderr and "y = x / 0" in crashed.stderr
    assert "_sandbox_child" not in crashed.stderr  # the traceback shows the program, not our setup


def test_writing_inside_own_folder_works_and_folder_is_removed():
    result = run_python(
        "import os, tempfile\nos.mkdir('d')\nwith open('d/f.txt', 'w') as f: f.write('hi')\n"
        "with tempfile.NamedTemporaryFile('w') as t: t.write('x')\n"
        "print(open('d/f.txt').read(), os.getcwd())"
    )
    assert result.ok, result.stderr
    text, folder = result.stdout.split()
    assert text == "hi" and not os.path.exists(folder)


def test_socket_to_loopback_is_blocked(listener):
    port = listener.getsockname()[1]
    result = run_python(connect_code(port))
    assert not result.ok and result.killed_reason == "blocked: network"
    assert "connected" not in result.stdout
    assert_no_connection(listener)


def test_network_namespace_alone_stops_connections(layers, listener):
    needs(layers, "netns")
    port = listener.getsockname()[1]
    result = run_python(connect_code(port), audit_hook=False)
    assert "connected" not in result.stdout and "unreachable" in result.stderr
    assert_no_connection(listener)


@pytest.mark.parametrize("action", [
    "open({path!r}, 'w').write('changed')",
    "open({path!r}, 'a').write('changed')",
    "import os; os.remove({path!r})",
    "import os; os.rename({path!r}, 'stolen.txt')",
    "import os; os.symlink({path!r}, 'link'); open('link', 'w').write('changed')",
    "import os; os.mkdir('a'); os.symlink('../x', 'a/link')",  # inside here, outside once moved up
    "import os; os.chdir('/'); open({path!r}[1:], 'w').write('changed')",
])
def test_writes_outside_the_folder_are_blocked(host_file, action):
    result = run_python(action.format(path=str(host_file)))
    assert not result.ok
    assert result.killed_reason.startswith(("blocked: write outside sandbox", "blocked: leaving the sandbox folder"))
    assert host_file.read_text() == "original"


def test_directory_handles_outside_are_refused(host_file):
    # An fd of an outside directory would let os.open(name, dir_fd=fd) write there unseen by the
    # audit hook. Without the uid switch, so that only the hook stands in the way.
    code = (f"import os\nfd = os.open({str(host_file.parent)!r}, os.O_RDONLY)\n"
            "os.open('host.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=fd)")
    result = run_python(code, drop_privileges=False)
    assert result.killed_reason.startswith("blocked: write outside sandbox")
    assert host_file.read_text() == "original"


def test_dropped_privileges_alone_protect_host_files(layers, host_file):
    needs(layers, "setuid")
    result = run_python(f"open({str(host_file)!r}, 'w').write('changed')", audit_hook=False)
    assert "PermissionError" in result.stderr
    assert host_file.read_text() == "original"


def test_audit_layer_alone_still_blocks(listener, host_file):
    # What is left where unshare and setuid are denied (no root, a strict container).
    port = listener.getsockname()[1]
    net = run_python(connect_code(port), isolate_network=False, drop_privileges=False)
    write = run_python(f"open({str(host_file)!r}, 'w').write('changed')", isolate_network=False, drop_privileges=False)
    assert net.killed_reason == "blocked: network" and "netns" not in net.layers and "setuid" not in net.layers
    assert write.killed_reason == "blocked: write outside sandbox"
    assert_no_connection(listener)
    assert host_file.read_text() == "original"


def test_fork_bomb_is_stopped():
    result = run_python("import os\nwhile True:\n    os.fork()", timeout_s=5)
    assert result.killed_reason == "blocked: process creation" and result.duration_s < 5
    spawn = run_python("import subprocess\nsubprocess.run(['echo', 'hi'])")
    assert spawn.killed_reason == "blocked: process creation" and "hi" not in spawn.stdout
    assert not _leftover_sandbox_processes()


def test_process_limit_alone_bounds_forks(layers):
    needs(layers, "setuid")  # RLIMIT_NPROC does not bind root
    code = (
        "import os, time\nn = 0\nfor _ in range(60):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
        "    n += 1\nprint(n)"
    )
    result = run_python(code, audit_hook=False, max_processes=8, timeout_s=20)
    assert 0 <= int(result.stdout) < 8
    assert result.duration_s < 15  # the children (asleep for 30 s) were killed with the group
    assert not _leftover_sandbox_processes()


def _leftover_sandbox_processes() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"_sandbox_child" in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def test_huge_allocation_is_stopped():
    result = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')")
    assert result.killed_reason == "memory limit" and "allocated" not in result.stdout


def test_busy_loop_is_stopped_by_cpu_limit():
    # One CPU-second; the wall-clock allowance is generous because CI cores are shared.
    result = run_python("while True: pass", cpu_s=1, timeout_s=15)
    assert result.killed_reason == "cpu limit" and result.returncode < 0


def test_sleeping_program_is_stopped_by_wall_clock():
    result = run_python("import time\ntime.sleep(30)", timeout_s=1)
    assert result.killed_reason == "timeout" and result.duration_s < 3


def test_output_is_capped():
    result = run_python("while True: print('x' * 1000)", max_output_bytes=10_000)
    assert result.killed_reason == "output limit" and len(result.stdout) == 10_000


def test_file_size_is_capped():
    result = run_python("open('big', 'wb').write(b'x' * (4 << 20))", max_file_mb=1)
    assert result.killed_reason == "file size limit"


@pytest.mark.parametrize("code, reason", [
    ("import ctypes", "blocked: native code"),
    ("import os; os.kill(1, 0)", "blocked: signal to another process"),
    ("import gc; gc.get_objects()", "blocked: tampering with the sandbox"),
])
def test_other_escapes_are_blocked(code, reason):
    assert run_python(code).killed_reason == reason


def test_common_standard_library_still_works():
    code = "import asyncio, collections.abc, dataclasses, decimal, fractions, json, re, statistics\n" \
           "async def f(): return statistics.mean([1, 2, 3])\nprint(asyncio.run(f()))"
    result = run_python(code)
    assert result.ok, result.stderr
    assert result.stdout == "2\n"


def test_folder_is_a_size_capped_tmpfs(layers):
    needs(layers, "tmpfs")
    result = run_python("for i in range(8):\n    open(f'f{i}', 'wb').write(b'x' * (3 << 20))", max_disk_mb=8)
    assert result.killed_reason == "disk limit"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_degrades_when_namespaces_are_denied(listener):
    # Without CAP_SYS_ADMIN unshare fails, as in a default Docker container: no netns, no mounts,
    # so (the standard library being unreachable for nobody here, or not) fewer layers, never a crash.
    port = listener.getsockname()[1]
    script = (
        "from lathe.verify.sandbox import run_python\n"
        "ok = run_python('print(6 * 7)')\n"
        f"net = run_python(\"import socket; socket.create_connection(('127.0.0.1', {port}))\")\n"
        "print(ok.stdout.strip(), ok.ok, net.killed_reason, 'netns' in ok.layers, 'audit' in net.layers, sep='|')"
    )
    command = ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", sys.executable, "-c", script]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "42|True|blocked: network|False|True", out.stderr
    assert_no_connection(listener)
