"""A throwaway one-node Slurm cluster on localhost, for tests that run the workflow through profiles/slurm.

The `slurm_cluster` fixture (module scope; import `slurm_cluster_fixture` into the test module) installs slurm-wlm
and munge when they are absent (apt, about 20 s), writes a slurm.conf and gres.conf into a temporary directory,
starts munged (unless one already answers), slurmctld and slurmd in the foreground, waits until the node is idle,
and on teardown cancels what is still queued and stops exactly the daemons it started, by PID. Everything
machine-specific (CPUs, sockets, memory) comes from `slurmd -C`. The node advertises four GPUs (`Gres=gpu:4`, their
"devices" links to /dev/null), so jobs that ask for GPUs are accepted and scheduled on a machine without any. Its
one partition, the default, is named "gpu" as in profiles/slurm's example. Without slurmdbd there is no accounting:
the profile's `slurm-status-command: squeue` works because MinJobAge keeps finished jobs in squeue for five minutes.

Daemons and the cluster need root; elsewhere the fixture skips, saying why.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PARTITION = "gpu"  # the partition profiles/slurm names as its example; the default one, for a profile naming none
NODE = "localhost"
GPUS = 4
MUNGE_USER = "munge"
PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
# The slurm-jobstep plugin drops every SLURM_* variable, SLURM_CONF included, from the environment of the `srun`
# it runs inside each job, so that srun finds the configuration only at Slurm's default path: the fixture links its
# slurm.conf there while the cluster runs (and skips on a machine that has a configuration of its own).
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")

# Chosen for a container or VM without systemd or a usable cgroup hierarchy: processes are tracked through
# /proc, tasks are not bound, no accounting is gathered or stored. cons_tres makes GPUs a schedulable resource
# (sbatch --gpus); CR_Core_Memory makes memory one, so a job asking for more than the node has is refused at
# submission instead of pending forever. MinJobAge=300 keeps finished jobs visible to squeue, the only status
# source without slurmdbd.
SLURM_CONF = """\
ClusterName=asfttest
SlurmctldHost={node}
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
MinJobAge=300
ReturnToService=2
KillWait=5
{node_line} Gres=gpu:{gpus} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""

# Slurm 22.05's gres/gpu drops GPUs without a File= ("Removing file-less GPU", even with Flags=CountOnly) and
# rejects a File= that is not a character device, so each GPU is a symlink to /dev/null: the node offers the count
# and jobs are scheduled on it, with no /dev/nvidia* anywhere (task/none constrains no devices).
GRES_CONF = "AutoDetect=off\nNodeName={node} Name=gpu File={devices}\n"


@dataclass
class SlurmCluster:
    """A running cluster: `env` is os.environ with SLURM_CONF pointing to its slurm.conf."""

    root: Path
    conf: Path
    env: dict[str, str]
    started: dict[str, subprocess.Popen] = field(default_factory=dict)
    linked_default_conf: bool = False

    def run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (finished ones for MinJobAge): id, name, state, comment."""
        result = self.run("squeue", "--states=all", "--noheader", "--format=%i|%j|%T|%k")
        assert result.returncode == 0, result.stderr
        keys = ("id", "name", "state", "comment")
        return [dict(zip(keys, line.split("|", 3), strict=True)) for line in result.stdout.splitlines() if line]

    def active_jobs(self) -> list[dict[str, str]]:
        return [job for job in self.jobs() if job["state"] in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")]

    def logs(self) -> str:
        tails = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / name
            if path.exists():
                tails.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(tails)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _install() -> str | None:
    """Installs what is missing; returns why it could not, or None."""
    if all(shutil.which(daemon, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") for daemon in DAEMONS):
        return None
    if not shutil.which("apt-get"):
        return f"Slurm is not installed and there is no apt-get to install {' and '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:  # a fresh image has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        return f"`{' '.join(install)}` failed: {(result.stderr or result.stdout).strip()[-500:]}"
    return None


def _sbin(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert found, f"{name} not found after installing {PACKAGES}"
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition, what: str, timeout: float, cluster: SlurmCluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if cluster is not None:
            for name, process in cluster.started.items():
                assert process.poll() is None, f"{name} exited ({process.returncode})\n{cluster.logs()}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}\n{cluster.logs() if cluster else ''}")
        time.sleep(0.2)


def _munge_works() -> bool:
    munge = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    if munge.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=munge.stdout, capture_output=True, timeout=10).returncode == 0


def _start_munged(cluster: SlurmCluster) -> None:
    """munged as the munge user, on its default socket, unless one already answers there (then it is left alone)."""
    if _munge_works():
        return
    user = pwd.getpwnam(MUNGE_USER)
    for directory, mode in (("/run/munge", 0o755), ("/var/log/munge", 0o700), ("/var/lib/munge", 0o711)):
        os.makedirs(directory, exist_ok=True)
        os.chown(directory, user.pw_uid, user.pw_gid)
        os.chmod(directory, mode)
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run([_sbin("mungekey"), "--create", "--keyfile", str(key)], check=True, timeout=60)
        os.chown(key, user.pw_uid, user.pw_gid)
        key.chmod(0o600)
    cluster.started["munged"] = subprocess.Popen(
        [_sbin("munged"), "--foreground", "--log-file", str(cluster.root / "munged.log")],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait(_munge_works, "munged", 30, cluster)


def _node_idle(cluster: SlurmCluster) -> bool:
    result = cluster.run("sinfo", "--noheader", "--nodes", NODE, "--format=%T", timeout=20)
    return result.returncode == 0 and result.stdout.strip() == "idle"


def _start(cluster: SlurmCluster) -> None:
    _start_munged(cluster)
    hardware = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, timeout=60, check=True)
    node_line = hardware.stdout.splitlines()[0]  # NodeName=<host> CPUs=... RealMemory=...
    assert node_line.startswith("NodeName="), hardware.stdout
    node_line = f"NodeName={NODE} " + node_line.split(" ", 1)[1]
    for directory in ("state", "spool"):
        (cluster.root / directory).mkdir()
    cluster.conf.write_text(
        SLURM_CONF.format(
            node=NODE,
            node_line=node_line,
            gpus=GPUS,
            partition=PARTITION,
            root=cluster.root,
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
        )
    )
    for index in range(GPUS):
        (cluster.root / f"gpu{index}").symlink_to("/dev/null")
    devices = f"{cluster.root}/gpu[0-{GPUS - 1}]"
    (cluster.root / "gres.conf").write_text(GRES_CONF.format(node=NODE, devices=devices))
    DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
    DEFAULT_CONF.symlink_to(cluster.conf)
    cluster.linked_default_conf = True
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": cluster.env}
    # -D: in the foreground, so the PID is the daemon's own; -i: no state from an earlier cluster.
    cluster.started["slurmctld"] = subprocess.Popen([_sbin("slurmctld"), "-D", "-i", "-f", str(cluster.conf)], **quiet)
    # -N: the node is "localhost" whatever this machine's hostname is.
    cluster.started["slurmd"] = subprocess.Popen([_sbin("slurmd"), "-D", "-N", NODE, "-f", str(cluster.conf)], **quiet)
    _wait(lambda: _node_idle(cluster), f"node {NODE} to be idle", 90, cluster)


def _stop(cluster: SlurmCluster) -> None:
    """Cancels what is still queued or running (slurmstepd outlives slurmd), then stops the started daemons in
    reverse order: SIGTERM, and SIGKILL after a grace period."""
    if cluster.started.get("slurmctld") and cluster.started["slurmctld"].poll() is None:
        try:
            if cluster.active_jobs():
                cluster.run("scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name, timeout=30)
                _wait(lambda: not cluster.active_jobs(), "jobs to end", 60)
        except (AssertionError, TimeoutError, subprocess.TimeoutExpired):
            pass  # the daemons go anyway
    for name in reversed(list(cluster.started)):
        process = cluster.started[name]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if cluster.linked_default_conf:
        DEFAULT_CONF.unlink(missing_ok=True)


@pytest.fixture(scope="module", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    if not _is_root():
        pytest.skip("a local Slurm cluster needs root (to install slurm-wlm/munge and run munged, slurmctld, slurmd)")
    reason = _install()
    if reason:
        pytest.skip(reason)
    if DEFAULT_CONF.is_symlink() and not DEFAULT_CONF.exists():
        DEFAULT_CONF.unlink()  # the link of a test session that was killed: its temporary directory is gone
    if DEFAULT_CONF.exists():
        pytest.skip(
            f"{DEFAULT_CONF} exists: this machine has its own Slurm configuration, which the jobs' srun would use "
            "(the slurm-jobstep plugin drops SLURM_CONF)"
        )
    root = tmp_path_factory.mktemp("slurm")
    conf = root / "slurm.conf"
    cluster = SlurmCluster(root=root, conf=conf, env=dict(os.environ, SLURM_CONF=str(conf)))
    try:
        _start(cluster)
        yield cluster
    finally:
        _stop(cluster)
