"""A real one-node SLURM cluster for tests: munged + slurmctld + slurmd from Debian's slurm-wlm.

Everything lives under a temp dir: the config, state, spool, logs, pid files and a private munge daemon
with its own key and socket, on free ports, so it neither needs nor touches a system-wide SLURM. The
cluster is reached through ``SLURM_CONF``, which must be in the environment of every process that talks
to it (:attr:`SlurmCluster.env`). Known traps it avoids: the munge socket dir must be mode 755;
``CR_Core`` (not ``CR_Core_Memory``) so that jobs do not each take the whole node; job ids start from the
clock, because a fresh cluster restarts them at 1 and a reused ``%j`` folder would return stale results.

:func:`start_multinode_cluster` makes a cluster of several hosts on this one machine: every node (and a
head host running slurmctld and the clients) is a process holding its own network, UTS and mount
namespaces, with its own hostname, a 10.x address on a private bridge and its own ``/etc/hosts``
(bind-mounted inside its mount namespace only). SLURM, Lightning and gloo then see separate hosts: a rank
on node2 reaches node1 only through node1's address. Nothing is added to this machine's own network or
files; the namespaces vanish with their last process. Clients must run inside the head host
(:meth:`SlurmCluster.command`).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scancel", "srun")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NAMESPACE_TOOLS = ("unshare", "nsenter", "ip", "mount", "hostname")  # util-linux, iproute2
# The private network of a multi-node cluster. It exists only inside the cluster's own network namespaces,
# so it cannot collide with this machine's networks nor with another test cluster's.
NETWORK = "10.213.0"
HEAD_ADDRESS = f"{NETWORK}.1"
BRIDGE = "lmexp0"


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
    # Test workers (pytest-xdist) may start clusters at the same time: one installs, the others wait.
    with open(Path(tempfile.gettempdir()) / "lmexp-slurm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if missing_programs():
            _apt_install()


def _apt_install() -> None:
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
class Host:
    """A host of a multi-node cluster: a process that holds its own network, UTS and mount namespaces."""

    name: str
    address: str
    holder: subprocess.Popen

    def enter(self) -> list[str]:
        """The prefix that runs a command on this host (in the caller's working directory)."""
        return [_which("nsenter"), "-t", str(self.holder.pid), "--net", "--uts", "--mount", "--wd=."]


@dataclass
class SlurmCluster:
    """A running cluster (one node, or several hosts in namespaces); stop() tears it down."""

    root: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    nodes: tuple[str, ...] = ("localhost",)
    hosts: dict[str, Host] = field(default_factory=dict)  # head and nodes of a multi-node cluster
    lock: Any = None  # the machine-wide turn of this cluster (_take_turn), released by stop()

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    def command(self, *command: str) -> list[str]:
        """``command`` as a client of this cluster runs it: on the head host when there is one."""
        head = self.hosts.get("head")
        return [*(head.enter() if head else []), *command]

    def log_tail(self, lines: int = 15) -> str:
        texts = []
        for path in sorted((self.root / "log").glob("*.log")):
            texts.append(
                f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            )
        return "\n".join(texts)

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(*command), env=self.env, capture_output=True, text=True, timeout=timeout
        )

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
        for host in self.hosts.values():  # the namespaces go with the last process in them
            _end(host.holder)
        self.hosts.clear()
        if self.lock is not None:
            self.lock.close()  # the next test cluster may start
            self.lock = None
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


def _write_munge_key(root: Path) -> Path:
    """A private munge key and socket dir under ``root``; returns the socket's path."""
    munge = root / "munge"
    (munge / "socket").mkdir(parents=True)
    os.chmod(munge / "socket", 0o755)  # munged refuses a socket dir others cannot enter
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    return munge / "socket" / "munge.socket"


def _munge_command(root: Path) -> tuple[Path, list[str]]:
    munge = root / "munge"
    socket_path = munge / "socket" / "munge.socket"
    command = [
        _which("munged"),
        "--foreground",
        "--force",
        f"--key-file={munge / 'munge.key'}",
        f"--socket={socket_path}",
        f"--pid-file={munge / 'munged.pid'}",
        f"--log-file={root / 'log' / 'munged.log'}",
        f"--seed-file={munge / 'munged.seed'}",
    ]
    return socket_path, command


def _slurm_conf(
    root: Path, munge_socket: Path, controller: str, ports: tuple[int, int], nodes: dict[str, str]
) -> str:
    """slurm.conf: ``controller`` is ``name(address)``; ``nodes`` maps each node's name to its address."""
    cpus = os.cpu_count() or 1
    first_job_id = int(time.time()) % 10_000_000 + 1000  # never reuse an id an earlier cluster handed out
    node_lines = [
        f"NodeName={name} NodeAddr={address} CPUs={cpus} RealMemory=1024 State=UNKNOWN"
        for name, address in nodes.items()
    ]
    return (
        "\n".join(
            [
                "ClusterName=lmexp-test",
                f"SlurmctldHost={controller}",
                f"SlurmctldPort={ports[0]}",
                f"SlurmdPort={ports[1]}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # cred_expire also holds a requeued job back that long (default 120 s): short, for the tests
                f"AuthInfo=socket={munge_socket},cred_expire=15",
                f"StateSaveLocation={root / 'state'}",
                # %n: the node's name, so that several slurmds on this machine keep apart
                f"SlurmdSpoolDir={root / 'spool' / '%n'}",
                f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'run' / 'slurmd-%n.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
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
                *node_lines,
                f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP",
            ]
        )
        + "\n"
    )


def _wait_idle(cluster: SlurmCluster, timeout: float) -> None:
    """Wait until every node of the cluster is up (idle, or already running something)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                raise ClusterUnavailable(
                    f"{name} exited with status {process.returncode}\n{cluster.log_tail()}"
                )
        state = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", timeout=10)
        states = dict(line.split() for line in state.stdout.splitlines() if line.strip())
        up = {name for name, value in states.items() if value in ("idle", "mixed", "allocated")}
        if state.returncode == 0 and up == set(cluster.nodes):
            return
        time.sleep(0.2)
    raise ClusterUnavailable(f"the nodes did not become idle within {timeout:.0f} s\n{cluster.log_tail()}")


def _die_with_parent() -> None:
    """In a child before exec: be killed when the test process dies, however it dies (Linux prctl)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _spawn(cluster: SlurmCluster, name: str, command: list[str]) -> None:
    devnull = subprocess.DEVNULL
    cluster.processes[name] = subprocess.Popen(
        command, env=cluster.env, stdout=devnull, stderr=devnull, preexec_fn=_die_with_parent
    )


def _configure(root: Path, controller: str, ports: tuple[int, int], nodes: dict[str, str]) -> SlurmCluster:
    """Install when needed and allowed; write the munge key and slurm.conf under ``root``."""
    ensure_installed()
    if os.geteuid() != 0:
        raise ClusterUnavailable("the test cluster runs slurmd as root (no cgroups, no slurm user)")
    for name in ("etc", "state", "log", "run", *(f"spool/{node}" for node in nodes)):
        (root / name).mkdir(parents=True, exist_ok=True)
    munge_socket = _write_munge_key(root)
    (root / "etc" / "slurm.conf").write_text(_slurm_conf(root, munge_socket, controller, ports, nodes))
    env = {**os.environ, "SLURM_CONF": str(root / "etc" / "slurm.conf")}
    return SlurmCluster(root=root, env=env, nodes=tuple(nodes))


def _start_munged(cluster: SlurmCluster) -> None:
    socket_path, command = _munge_command(cluster.root)
    _spawn(cluster, "munged", command)
    _wait_for(socket_path, cluster, timeout=10)


def _take_turn(timeout: float = 1200) -> Any:
    """One test cluster at a time on this machine: parallel test workers (pytest-xdist) wait for the running
    cluster to stop (two clusters at once have failed each other's task launches). Returns the held lock."""
    handle = open(Path(tempfile.gettempdir()) / "lmexp-slurm-cluster.lock", "w")  # noqa: SIM115 - held
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise ClusterUnavailable(f"another test cluster ran for over {timeout:.0f} s") from None
            time.sleep(1)


def start_cluster(root: Path, timeout: float = 30, ports: tuple[int, int] | None = None) -> SlurmCluster:
    """A one-node cluster (node ``localhost``) under ``root``, started; returns once the node is idle.

    Installs SLURM when needed and allowed. ``ports`` are (slurmctld, slurmd), free ports by default.
    """
    turn = _take_turn()
    ports = ports or (free_port(), free_port())
    try:
        cluster = _configure(root, "localhost(127.0.0.1)", ports, {"localhost": "127.0.0.1"})
    except BaseException:
        turn.close()
        raise
    cluster.lock = turn
    try:
        _start_munged(cluster)
        _spawn(cluster, "slurmctld", [_which("slurmctld"), "-D", "-f", str(cluster.conf), "-i"])
        _spawn(cluster, "slurmd", [_which("slurmd"), "-D", "-f", str(cluster.conf), "-N", "localhost"])
        _wait_idle(cluster, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def start_multinode_cluster(
    root: Path, nodes: int = 2, timeout: float = 30, ports: tuple[int, int] = (6817, 6818)
) -> SlurmCluster:
    """A cluster of ``nodes`` hosts (node1, node2, ...) and a head host, each in its own namespaces.

    slurmctld runs on the head host (where :meth:`SlurmCluster.command` runs the clients), one slurmd on
    each node. ``ports`` are (slurmctld, slurmd) on the cluster's private network, where nothing else
    listens: SLURM's default ports serve. Returns once every node is idle.
    """
    missing = [tool for tool in NAMESPACE_TOOLS if _which(tool) is None]
    if missing:
        raise ClusterUnavailable(f"a multi-node cluster needs {', '.join(missing)} (util-linux, iproute2)")
    node_addresses = {f"node{i}": f"{NETWORK}.{10 + i}" for i in range(1, nodes + 1)}
    turn = _take_turn()
    try:
        cluster = _configure(root, f"head({HEAD_ADDRESS})", ports, node_addresses)
    except BaseException:
        turn.close()
        raise
    cluster.lock = turn
    try:
        _start_hosts(cluster, {"head": HEAD_ADDRESS, **node_addresses})
        _start_munged(cluster)  # on this machine: its socket is a file, reachable from every host
        slurmctld = [_which("slurmctld"), "-D", "-f", str(cluster.conf), "-i"]
        _spawn(cluster, "slurmctld", cluster.hosts["head"].enter() + slurmctld)
        for node in node_addresses:
            slurmd = [_which("slurmd"), "-D", "-f", str(cluster.conf), "-N", node]
            _spawn(cluster, f"slurmd-{node}", cluster.hosts[node].enter() + slurmd)
        _wait_idle(cluster, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_hosts(cluster: SlurmCluster, addresses: dict[str, str]) -> None:
    """Start one namespace-holding process per host, then wire them up.

    The head host gets a bridge with its address; every other host a veth pair into that bridge. Each
    host gets its hostname and, bind-mounted in its own mount namespace only, one ``/etc/hosts`` naming
    every host (Lightning's MASTER_ADDR is the first node's *name*; gloo binds to the address of the
    hostname).
    """
    hosts_file = cluster.root / "etc" / "hosts"
    hosts_file.write_text(
        "127.0.0.1 localhost\n" + "".join(f"{address} {name}\n" for name, address in addresses.items())
    )
    machine_hosts = os.stat("/etc/hosts")
    for name, address in addresses.items():
        # unshare makes every mount in the new namespace private before it runs sleep: a bind mount
        # made there after that never reaches this machine's mount namespace.
        holder = subprocess.Popen(
            [_which("unshare"), "--net", "--uts", "--mount", "--propagation", "private", "sleep", "infinity"],
            env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent,
        )  # fmt: skip
        cluster.hosts[name] = Host(name, address, holder)
    for host in cluster.hosts.values():
        _wait_unshared(host)
    head = cluster.hosts["head"]
    wiring = [f"ip link add name {BRIDGE} type bridge", f"ip link set {BRIDGE} up"]
    wiring.append(f"ip addr add {head.address}/24 dev {BRIDGE}")
    for host in cluster.hosts.values():
        if host is not head:
            veth = f"v-{host.name}"
            wiring.append(f"ip link add name {veth} type veth peer name eth0 netns {host.holder.pid}")
            wiring.append(f"ip link set {veth} master {BRIDGE} up")
    _on_host(head, wiring)
    for host in cluster.hosts.values():
        own = [] if host is head else [f"ip addr add {host.address}/24 dev eth0", "ip link set eth0 up"]
        naming = [f"hostname {host.name}", f"mount --bind {hosts_file} /etc/hosts"]
        _on_host(host, ["ip link set lo up", *own, *naming])  # lo: W&B's service, gloo on one host
    after = os.stat("/etc/hosts")
    if (after.st_dev, after.st_ino) != (machine_hosts.st_dev, machine_hosts.st_ino):
        raise ClusterUnavailable("a host's /etc/hosts bind mount reached this machine's /etc/hosts")


def _wait_unshared(host: Host, timeout: float = 10) -> None:
    """Wait until the holder runs ``sleep``: its namespaces exist and its mounts are private by then."""
    comm = Path(f"/proc/{host.holder.pid}/comm")
    deadline = time.monotonic() + timeout
    while True:
        if host.holder.poll() is not None:
            error = host.holder.stderr.read().decode(errors="replace").strip()
            raise ClusterUnavailable(f"cannot make namespaces for host {host.name} (unshare): {error}")
        try:
            if comm.read_text().strip() == "sleep":
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ClusterUnavailable(f"host {host.name}: unshare did not start sleep in {timeout:.0f} s")
        time.sleep(0.01)


def _on_host(host: Host, lines: list[str]) -> None:
    script = "\n".join(lines)
    result = subprocess.run([*host.enter(), "sh", "-ec", script], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise ClusterUnavailable(f"setting up host {host.name} failed: {result.stderr.strip()[-300:]}")


def _wait_for(path: Path, cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in cluster.processes.values()):
            raise ClusterUnavailable(f"munged did not start\n{cluster.log_tail()}")
        time.sleep(0.05)
