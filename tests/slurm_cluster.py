"""A throwaway two-node SLURM cluster on this host, for the SLURM template tests.

Debian's slurmctld, slurmd and munge packages (installed by .ci/install_slurm.sh) are started from a
private directory: our own munge key and socket, a slurm.conf with free ports, state and spool
directories, and two `slurmd -N <name>` daemons that both live on 127.0.0.1. Nothing under /etc is
read or written; every client call gets `SLURM_CONF` through `SlurmCluster.env`.

Why the details look the way they do:
- munged refuses a socket whose parent directories are not world-executable, and pytest's tmp dirs
  are 0700, so the cluster lives in its own `tempfile.mkdtemp` directory (chmod 755), removed on stop.
- Every daemon and every job carries the marker variable `LTGBERT_SLURM_TEST_ROOT`, so `stop()` can
  find whatever the cluster left behind (slurmstepd double-forks away from slurmd, so a process tree
  walk would miss it) and `leftover_processes()` can prove nothing remains.
- `cred_expire` is how long a requeued job waits before it may start again (default 120 s); the tests
  cannot wait that long, so it is set to the minimum.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MARKER = "LTGBERT_SLURM_TEST_ROOT"
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
SLURM_BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "squeue", "scancel")


def slurm_available() -> bool:
    """True when every daemon and client the cluster needs is on PATH (or in /usr/sbin)."""
    return all(_which(name) for name in SLURM_BINARIES)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_ports(count: int) -> list[int]:
    # Hold every socket open until all are chosen so the ports are distinct.
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    """Controller + `num_nodes` compute daemons on localhost; `start()`, submit with `sbatch()`, `stop()`."""

    def __init__(self, num_nodes: int = 2, cpus_per_node: int = 4, memory_mb: int = 4000):
        # Job scripts are executed from the spool directory in here: on a noexec /tmp, point
        # LTGBERT_SLURM_TMPDIR elsewhere.
        self.root = Path(tempfile.mkdtemp(prefix="ltgslurm-", dir=os.environ.get("LTGBERT_SLURM_TMPDIR")))
        # munged insists on world-executable parent directories for its socket.
        self.root.chmod(0o755)
        self.nodes = [f"ltgnode{i + 1}" for i in range(num_nodes)]
        self.cpus_per_node = cpus_per_node
        self.memory_mb = memory_mb
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._daemons: dict[str, subprocess.Popen] = {}

    # ----------------------------------------------------------------------------- environment
    @property
    def env(self) -> dict[str, str]:
        """Environment for clients and jobs: our slurm.conf plus the cleanup marker."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env[MARKER] = str(self.root)
        # Client tools live in /usr/bin, daemons in /usr/sbin; root's PATH may lack the latter.
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        return env

    def _write_config(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        for sub in ("state", "log", "spool", "munge"):
            (self.root / sub).mkdir(exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(exist_ok=True)
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={p} CPUs={self.cpus_per_node} "
            f"RealMemory={self.memory_mb} State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports)
        )
        r = self.root
        self.conf.write_text(f"""\
ClusterName=ltgtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobRequeue=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    # ----------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60.0) -> None:
        self._write_config()
        key = self.munge_socket.parent / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        m = self.munge_socket.parent
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        # -i: ignore any saved state (there is none, but a stale dir must not resurrect jobs).
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(
            lambda: self._run(["scontrol", "ping"], check=False).returncode == 0,
            timeout,
            "slurmctld did not answer `scontrol ping`",
        )
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._nodes_idle, timeout, "the slurmd nodes did not become idle")

    def stop(self) -> None:
        """Cancel jobs, stop daemons, kill whatever the jobs left behind, remove the directory."""
        if self._daemons.get("slurmctld") and self._daemons["slurmctld"].poll() is None:
            self._run(["scancel", "--full", "--partition=debug"], check=False)
            self._wait(lambda: not self._run(["squeue", "-h"], check=False).stdout.strip(), 20, None)
        for name in sorted(self._daemons, key=lambda n: n == "munged"):  # munged last
            proc = self._daemons[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for pid in self.leftover_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._wait(lambda: not self.leftover_processes(), 10, None)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftover_processes(self) -> list[int]:
        """PIDs of live processes that belong to this cluster (daemons, steps, job processes)."""
        needle = f"{MARKER}={self.root}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and needle in environ.split(b"\0"):
                found.append(int(entry))
        found += [p.pid for p in self._daemons.values() if p.poll() is None and p.pid not in found]
        return found

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        self._daemons[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def _nodes_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[0::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    @staticmethod
    def _wait(predicate, timeout: float, message: str | None) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.2)
        if message is not None:
            raise TimeoutError(message)
        return False

    def _run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, **kwargs)

    # ----------------------------------------------------------------------------- jobs
    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit `sbatch --parsable <args>` from `cwd`; returns the job id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (for an array: the first record); {} once SLURM forgot it."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False).stdout
        line = out.strip().splitlines()[0] if out.strip() else ""
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def array_jobs(self, job_id: int) -> list[dict[str, str]]:
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.strip().splitlines() if line]

    def wait_state(self, job_id: int | str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job's JobState is in `states`; returns the job record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.3)
        raise TimeoutError(
            f"job {job_id} did not reach {sorted(states)} in {timeout:.0f}s: {info}\n" + self.tail_logs()
        )

    def wait_finished(self, job_id: int, timeout: float) -> dict[str, str]:
        return self.wait_state(job_id, FINISHED_STATES, timeout)

    def wait_array(self, job_id: int, timeout: float) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        jobs: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            jobs = self.array_jobs(job_id)
            if jobs and all(j.get("JobState") in FINISHED_STATES for j in jobs):
                return jobs
            time.sleep(0.5)
        raise TimeoutError(f"array {job_id} unfinished: {[j.get('JobState') for j in jobs]}\n" + self.tail_logs())

    def scontrol(self, *args: str) -> str:
        return self._run(["scontrol", *args]).stdout

    def scancel(self, *args: str) -> None:
        self._run(["scancel", *args])

    def tail_logs(self, lines: int = 30) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"==> {log.name} <==\n" + "\n".join(text))
        return "\n".join(parts)
