"""The sandbox on hostile programs: each is refused or contained, and the test process is unaffected."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from asft.evaluation.sandbox import (
    SandboxLimits,
    _readable_by_others,
    _seccomp_program,
    _verdict,
    run_program,
    run_programs,
)

FAST = SandboxLimits(timeout_s=3.0, memory_bytes=1 << 30)


def _run(source: str, limits: SandboxLimits = FAST, python: str | None = None):
    return run_program(textwrap.dedent(source), limits, python)


def test_correct_and_wrong_solutions() -> None:
    tests = "\nassert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
    good = _run("def add(a, b):\n    return a + b\n" + tests)
    bad = _run("def add(a, b):\n    return a - b\n" + tests)
    assert (good.status, good.detail) == ("passed", "")
    assert bad.status == "failed" and bad.detail == "AssertionError"
    assert "rlimits" in good.layers and "python_guard" in good.layers
    broken = _run("def add(a, b) return a\n")
    assert broken.status == "failed" and broken.detail.startswith("SyntaxError")


def test_fork_and_subprocess_are_refused() -> None:
    """os.fork and subprocess are refused at Python level; posix.fork and libc's fork (through ctypes), which skip
    the Python guard, are refused by the OS layers (seccomp, or RLIMIT_NPROC for a non-root user)."""
    result = _run(
        """
        import ctypes, os, posix, subprocess
        refused = []
        for name, attempt in [
            ("os.fork", os.fork),
            ("subprocess", lambda: subprocess.Popen(["sleep", "30"])),
            ("posix.fork", posix.fork),
        ]:
            try:
                pid = attempt()
            except OSError:
                refused.append(name)
            else:
                if pid == 0:
                    posix._exit(0)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fork() == -1:
            refused.append("libc.fork")
        print(",".join(refused))
        """
    )
    assert result.status == "passed", result.stderr
    assert result.stdout.split() == ["os.fork,subprocess,posix.fork,libc.fork"]


def test_an_infinite_loop_times_out_and_its_process_group_is_gone() -> None:
    limits = SandboxLimits(timeout_s=1.0, memory_bytes=1 << 30)
    started = time.monotonic()
    result = _run("import os, sys\nprint(os.getpgid(0), flush=True)\nwhile True:\n    pass\n", limits)
    assert result.status == "timeout" and "wall-clock" in result.detail
    assert time.monotonic() - started < 3.0
    group = int(result.stdout.split()[0])
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


def test_verdicts() -> None:
    """The CPU limit's SIGXCPU is a timeout; other signals fail; no layer report means the sandbox never started."""
    armed = ['{"layers": []}']
    assert _verdict(-signal.SIGXCPU, armed, "")[0] == "timeout"
    assert _verdict(-signal.SIGSEGV, armed, "") == ("failed", "killed by SIGSEGV")
    assert _verdict(0, [*armed, "done"], "") == ("passed", "")
    assert _verdict(0, armed, "") == ("failed", "exited before the program finished")
    assert _verdict(1, [], "ImportError: no ctypes")[0] == "error"


def test_eight_gigabytes_fail_under_the_memory_cap() -> None:
    result = _run("buffer = bytearray(8 << 30)\nprint('allocated')\n")
    assert result.status == "failed" and result.detail == "MemoryError"
    assert "allocated" not in result.stdout
    assert bytearray(1 << 20)  # this process still allocates


def test_no_connection_reaches_a_local_server() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted: list[object] = []
    finished = threading.Event()

    def accept() -> None:
        while not finished.is_set() and not accepted:
            try:
                accepted.append(server.accept())
            except TimeoutError:
                continue

    listener = threading.Thread(target=accept)
    listener.start()
    try:
        result = _run(
            f"""
            import _socket, ctypes, socket
            outcomes = []
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
                outcomes.append("python:connected")
            except OSError as error:
                outcomes.append("python:" + type(error).__name__)
            # past the Python guard: libc's socket and connect, through ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.socket(2, 1, 0)
            if fd < 0:
                outcomes.append("libc:no-socket")
            else:
                address = (2).to_bytes(2, "little") + ({port}).to_bytes(2, "big") + bytes([127, 0, 0, 1]) + bytes(8)
                connected = libc.connect(fd, address, len(address)) == 0
                outcomes.append("libc:" + ("connected" if connected else "no-connection"))
            print(" ".join(outcomes))
            """
        )
    finally:
        finished.set()
        listener.join()
        server.close()
    assert accepted == []
    assert result.status == "passed", result.stderr
    python, libc = result.stdout.split()
    assert python == "python:PermissionError" and libc in ("libc:no-socket", "libc:no-connection")
    assert "netns" in result.layers or "seccomp" in result.layers
    if "seccomp" in result.layers:
        assert libc == "libc:no-socket"


def test_the_program_runs_in_a_temporary_directory_that_is_removed() -> None:
    result = _run("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\n")
    assert result.status == "passed"
    work = Path(result.stdout.strip())
    assert work.name.startswith("asft-sandbox-") and not work.exists()


def test_writing_a_huge_file_is_cut_by_the_file_size_limit() -> None:
    limits = SandboxLimits(timeout_s=3.0, memory_bytes=1 << 30, file_bytes=1 << 20)
    result = _run("open('big', 'wb').write(b'x' * (4 << 20))\n", limits)
    assert result.status == "failed" and "File too large" in result.detail


def test_output_is_captured_with_a_cap() -> None:
    limits = SandboxLimits(timeout_s=3.0, memory_bytes=1 << 30, output_bytes=1000)
    result = _run("print('y' * 100_000)\n", limits)
    assert result.status == "passed"
    assert result.stdout.startswith("y" * 1000) and result.stdout.endswith("[output truncated]")
    assert len(result.stdout) < 1100


def test_a_secret_in_the_parents_environment_is_not_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASFT_TEST_SECRET", "hunter2")
    result = _run(
        """
        import os
        print(sorted(os.environ))
        print(os.environ.get("ASFT_TEST_SECRET"))
        """
    )
    assert result.status == "passed"
    assert "hunter2" not in result.stdout and "ASFT_TEST_SECRET" not in result.stdout
    assert result.stdout.splitlines()[1] == "None"


def test_an_early_exit_does_not_count_as_passing() -> None:
    """The program must run to its end: os._exit(0) before the tests is refused, sys.exit(1) is a failure."""
    early = _run("import os\nos._exit(0)\nassert False\n")
    assert early.status == "failed"
    assert _run("import sys\nsys.exit(1)\n").status == "failed"
    assert _run("import sys\nsys.exit(0)\n").status == "passed"


def test_a_missing_interpreter_is_an_error_not_a_failure() -> None:
    result = run_program("print(1)", FAST, python="/nonexistent/python3")
    assert result.status == "error" and "could not start" in result.detail


def test_many_programs_keep_their_order() -> None:
    programs = [f"assert {i} % 2 == 0\n" for i in range(6)]
    results = run_programs(programs, FAST, workers=2)
    assert [r.status for r in results] == ["passed", "failed"] * 3


def _system_python() -> str | None:
    """An interpreter whose files `nobody` can read, which the privilege drop needs."""
    for candidate in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
        if candidate and _readable_by_others(Path(candidate)):
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="the switch to nobody happens only when started as root")
def test_as_root_files_outside_the_work_directory_stay_unwritten(tmp_path: Path) -> None:
    """Started as root, the program runs as nobody: a root-owned directory outside its own is not writable.
    (As an ordinary user, the program can write where that user can; only its cwd is a fresh directory.)"""
    python = _system_python()
    if python is None:
        pytest.skip("no interpreter here that nobody may read (e.g. one under /root)")
    target = tmp_path / "owned-by-root"
    target.mkdir(mode=0o755)
    result = _run(
        f"""
        import os
        try:
            open({str(target / "escape.txt")!r}, "w").write("x")
            print("written")
        except PermissionError:
            print("refused")
        print(os.getuid())
        """,
        python=python,
    )
    assert result.status == "passed", result.stderr
    if "uid" not in result.layers:
        pytest.skip(f"{python}'s standard library is not readable by nobody")
    assert result.stdout.split() == ["refused", "65534"]
    assert not (target / "escape.txt").exists()


def test_readable_by_others(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "file").write_text("x")
    os.chmod(private / "file", 0o644)
    public = tmp_path / "public.txt"
    public.write_text("x")
    os.chmod(public, 0o644)
    os.chmod(tmp_path, 0o755)
    assert not _readable_by_others(private / "file")
    if _readable_by_others(tmp_path):  # pytest's base directory may itself be private
        assert _readable_by_others(public)


def test_seccomp_filter_jumps_stay_inside_the_program() -> None:
    """Every jump of the BPF filter lands on an instruction, and the filter ends by returning."""
    for machine in ("x86_64", "aarch64"):
        program = _seccomp_program(machine, pid=1234)
        for index, (code, jt, jf, _) in enumerate(program):
            if code & 0x07 == 0x05:  # BPF_JMP
                assert index + 1 + max(jt, jf) < len(program)
        assert program[-1][0] == 0x06


@pytest.mark.skipif(sys.platform != "linux", reason="Linux isolation")
def test_the_sandbox_child_is_killed_with_its_group_on_timeout() -> None:
    """A program that ignores SIGTERM and sleeps still ends at the wall-clock limit: the group gets SIGKILL."""
    limits = SandboxLimits(timeout_s=1.0, memory_bytes=1 << 30)
    result = _run(
        f"import signal, time\nsignal.signal({int(signal.SIGTERM)}, signal.SIG_IGN)\ntime.sleep(30)\n", limits
    )
    assert result.status == "timeout" and result.seconds < 3.0
