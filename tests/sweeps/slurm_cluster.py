"""A real one-node SLURM cluster for tests: munged + slurmctld + slurmd from Debian's slurm-wlm.

Everything lives under a temp dir: the config, state, spool, logs, pid files and a private munge daemon
with its own key and socket, on free ports, so it neither needs nor touches a system-wide SLURM. The
cluster is reached through ``SLURM_CONF``, which must be in the environment of every process that talks
to it (:attr:`SlurmCluster.env`). Known traps it avoids: the munge socket dir must be mode 755;
``CR_Core`` (not ``CR_Core_Memory``) so that jobs do not each take the whole node; job ids start from the
clock, because a fresh cluster restarts them at 1 and a reused ``%j`` folder would return stale results.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scancel", "srun")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run on this machine; the message says why."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(Path(d) / name) for d in ("/usr/sbin", "/sbin") if (Path(d) / name).exists()), None
    )


def missing_programs() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]


def install_allowed() -> bool:
    """Install slurm-wlm with apt only as root, with apt-get present, unless LMEXP_SLURM_INSTALL=0."""
    return os.environ.get("LMEXP_SLURM_INSTALL", "1") != "0" and os.geteuid() == 0 and bool(_which("apt-get"))


def ensure_installed() -> None:
    """Install the SLURM daemons and clients when they are missing and installing is allowed."""
    if not missing_programs():
        return
    if not install_allowed():
        raise ClusterUnavailable(
            f"SLURM is not installed ({', '.join(missing_programs())} missing) and "
            "installing it is not allowed here (needs root and apt-get)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(command[:3])} failed: {result.stderr.strip()[-300:]}")
    if missing_programs():
        raise ClusterUnavailable(f"still missing after apt-get install: {', '.join(missing_programs())}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class SlurmCluster:
    """A running one-node cluster; stop() tears it down."""

    root: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    def log_tail(self, lines: int = 15) -> str:
        texts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                texts.append(
                    f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                )
        return "\n".join(texts)

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)

    def drain(self, timeout: float = 15) -> None:
        """Cancel what is still queued and wait until every job has left the queue."""
        queued = self.run("squeue", "-h", "-o", "%i", timeout=10)
        ids = queued.stdout.split() if queued.returncode == 0 else []
        if ids:
            self.run("scancel", *ids, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queued = self.run("squeue", "-h", "-o", "%i", timeout=10)
            if queued.returncode != 0 or not queued.stdout.strip():
                return
            time.sleep(0.2)

    def job_processes(self) -> list[int]:
        """Processes of this cluster: daemons' children and job steps all carry its SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode() + b"\0"
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "environ").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    continue  # gone, or not ours to read
        return found

    def stop(self) -> None:
        """Drain the queue, stop slurmd, slurmctld and munged, then end any job process left behind.

        SIGTERM first, then SIGKILL: slurmd may ignore SIGTERM, and job steps whose slurmd is gone wait
        for it forever.
        """
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            self.drain()
        for name in reversed(list(self.processes)):
            _end(self.processes[name])
        self.processes.clear()
        leftovers = self.job_processes()
        for pid in leftovers:
            _signal(pid, signal.SIGTERM)
        time.sleep(0.5 if leftovers else 0)
        for pid in self.job_processes():
            _signal(pid, signal.SIGKILL)


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _write_munge(root: Path) -> tuple[Path, list[str]]:
    munge = root / "munge"
    (munge / "socket").mkdir(parents=True)
    os.chmod(munge / "socket", 0o755)  # munged refuses a socket dir others cannot enter
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = munge / "socket" / "munge.socket"
    command = [
        _which("munged"),
        "--foreground",
        "--force",
        f"--key-file={key}",
        f"--socket={socket_path}",
        f"--pid-file={munge / 'munged.pid'}",
        f"--log-file={root / 'log' / 'munged.log'}",
        f"--seed-file={munge / 'munged.seed'}",
    ]
    return socket_path, command


def _slurm_conf(root: Path, munge_socket: Path) -> str:
    cpus = os.cpu_count() or 1
    first_job_id = int(time.time()) % 10_000_000 + 1000  # never reuse an id an earlier cluster handed out
    return (
        "\n".join(
            [
                "ClusterName=lmexp-test",
                "SlurmctldHost=localhost(127.0.0.1)",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # cred_expire also holds a requeued job back that long (default 120 s): short, for the tests
                f"AuthInfo=socket={munge_socket},cred_expire=15",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "SchedulerType=sched/backfill",
                "SchedulerParameters=batch_sched_delay=0",
                "AccountingStorageType=accounting_storage/none",
                "JobAcctGatherType=jobacct_gather/none",
                "JobCompType=jobcomp/none",
                "MpiDefault=none",
                "ReturnToService=2",
                "SlurmdTimeout=30",
                f"FirstJobId={first_job_id}",
                f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1024 State=UNKNOWN",
                "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            ]
        )
        + "\n"
    )


def _wait_idle(cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                raise ClusterUnavailable(
                    f"{name} exited with status {process.returncode}\n{cluster.log_tail()}"
                )
        state = cluster.run("sinfo", "-h", "-o", "%T", timeout=10)
        if state.returncode == 0 and state.stdout.strip() in ("idle", "mixed", "allocated"):
            return
        time.sleep(0.2)
    raise ClusterUnavailable(f"the node did not become idle within {timeout:.0f} s\n{cluster.log_tail()}")


def start_cluster(root: Path, timeout: float = 30) -> SlurmCluster:
    """Install when needed and allowed, configure under ``root``, start, wait until the node is idle."""
    ensure_installed()
    if os.geteuid() != 0:
        raise ClusterUnavailable("the test cluster runs slurmd as root (no cgroups, no slurm user)")
    for name in ("etc", "state", "spool", "log", "run"):
        (root / name).mkdir(parents=True, exist_ok=True)
    munge_socket, munged = _write_munge(root)
    (root / "etc" / "slurm.conf").write_text(_slurm_conf(root, munge_socket))
    env = {**os.environ, "SLURM_CONF": str(root / "etc" / "slurm.conf")}
    cluster = SlurmCluster(root=root, env=env)
    devnull = subprocess.DEVNULL
    try:
        cluster.processes["munged"] = subprocess.Popen(munged, env=env, stdout=devnull, stderr=devnull)
        _wait_for(munge_socket, cluster, timeout=10)
        for name, extra in (("slurmctld", ["-i"]), ("slurmd", ["-N", "localhost"])):
            command = [_which(name), "-D", "-f", str(cluster.conf), *extra]
            cluster.processes[name] = subprocess.Popen(command, env=env, stdout=devnull, stderr=devnull)
        _wait_idle(cluster, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(path: Path, cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in cluster.processes.values()):
            raise ClusterUnavailable(f"munged did not start\n{cluster.log_tail()}")
        time.sleep(0.05)
