"""A real single-host SLURM cluster for tests: one slurmctld and two slurmd "nodes", all in a temp dir.

Debian's ``slurm-wlm`` daemons run with their own ``slurm.conf`` (``SLURM_CONF`` for the client commands,
``-f`` for the daemons), their own state/spool/log directories and free ports; no munge (``auth/none``),
no cgroups (``proctrack/linuxproc``), no GPUs (CPU nodes, like a CPU partition). The daemons run in the
foreground (``-D``) as children of this process and are stopped by pid in :meth:`LocalSlurm.stop`, after
every job of this cluster was cancelled. Node names must resolve (the templates use them as MASTER_ADDR):
if they do not, a marked ``/etc/hosts`` line maps them to 127.0.0.1 and is removed again on stop.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
HOSTS_MARK = "# mimscale-tests-slurm"


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None)
        return True
    except socket.gaierror:
        return False


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _die_with_parent() -> None:
    """In the daemon child: get SIGTERM when the test process dies, even if it is killed (no finalizer ran)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalSlurm:
    """Start/stop the cluster, submit jobs and wait for their states.

    Args:
        root: an empty directory for config, state, spool and logs.
        nodes: node names (one slurmd each).
        cpus: CPUs per node (this host's core count: both nodes share it, like any oversubscribed test box).
    """

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("msn1", "msn2"), cpus: int | None = None):
        self.root, self.nodes = Path(root), nodes
        self.cpus = cpus or os.cpu_count() or 2
        self.conf = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.procs: dict[str, subprocess.Popen] = {}
        self.hosts_line: str | None = None
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del self.env[k]

    # ------------------------------------------------------------------ lifecycle
    def write_config(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        user = getpass.getuser()
        for d in ("etc", "state", "log", "run", *[f"spool-{n}" for n in self.nodes]):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=mimscaletest",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/none",
            "CredType=cred/none",
            # a requeued job may start once its old credential expired (default 120 s); starting it earlier
            # (scontrol update StartTime=now) gets it killed as "Job credential revoked"
            "AuthInfo=cred_expire=10",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/log/jobcomp.log",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=600",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "FirstJobId=7000",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname={socket.gethostname().split('.')[0]} NodeAddr=127.0.0.1 "
                f"Port={port} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"
            )
        lines.append(f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _map_node_names(self) -> None:
        todo = [n for n in self.nodes if not _resolves(n)]
        if not todo:
            stale = [ln for ln in Path("/etc/hosts").read_text().splitlines() if ln.endswith(HOSTS_MARK)]
            self.hosts_line = stale[0] if stale else None  # left by a killed session: removed on stop
            return
        self.hosts_line = f"127.0.0.1 {' '.join(todo)} {HOSTS_MARK}"
        try:
            with open("/etc/hosts", "a") as f:  # append in place: /etc/hosts is often a bind mount
                f.write(self.hosts_line + "\n")
        except OSError as e:
            self.hosts_line = None
            raise RuntimeError(
                f"node names {todo} do not resolve and /etc/hosts is not writable ({e}): "
                f"add '127.0.0.1 {' '.join(todo)}' to /etc/hosts"
            ) from None

    def _unmap_node_names(self) -> None:
        if self.hosts_line is None:
            return
        with open("/etc/hosts", "r+") as f:
            kept = [line for line in f.read().splitlines(keepends=True) if line.rstrip("\n") != self.hosts_line]
            f.seek(0)
            f.write("".join(kept))
            f.truncate()
        self.hosts_line = None

    def start(self, timeout: float = 30) -> None:
        self.write_config()
        self._map_node_names()
        with open(self.log_dir / "slurmctld.stdout", "w") as out:
            self.procs["slurmctld"] = subprocess.Popen(
                [_daemon("slurmctld"), "-D", "-i", "-f", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=_die_with_parent,
            )
        for n in self.nodes:
            with open(self.log_dir / f"slurmd-{n}.stdout", "w") as out:
                self.procs[n] = subprocess.Popen(
                    [_daemon("slurmd"), "-D", "-N", n, "-f", str(self.conf)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    preexec_fn=_die_with_parent,
                )
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; logs in {self.log_dir}")
            states = self.cmd(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
            if states.count("idle") == len(self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout}s: {states}; logs in {self.log_dir}")

    def stop(self) -> None:
        """Cancel this cluster's jobs, wait for their processes to go, then stop the daemons by pid."""
        try:
            if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                self.cmd(["scancel", "--full", "--quiet", "--user", getpass.getuser()], check=False)
                deadline = time.time() + 20
                while time.time() < deadline and self.cmd(["squeue", "-h", "-t", "R,CG"], check=False).stdout.strip():
                    time.sleep(0.3)
        finally:
            for name in [n for n in self.procs if n != "slurmctld"] + ["slurmctld"]:
                p = self.procs.get(name)
                if p is None or p.poll() is not None:
                    continue
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
            self._unmap_node_names()

    # ------------------------------------------------------------------ jobs
    def cmd(self, argv: list[str], check: bool = True, env: dict | None = None, timeout: float = 30):
        p = subprocess.run(argv, capture_output=True, text=True, env={**self.env, **(env or {})}, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{argv} exited {p.returncode}: {p.stderr.strip()}")
        return p

    def sbatch(self, argv: list[str], env: dict, cwd: Path) -> int:
        """``sbatch --parsable ARGV`` with the job's environment ``env`` (exported to the job); returns the id."""
        p = subprocess.run(
            ["sbatch", "--parsable", *argv],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=30,
            env={**env, "SLURM_CONF": str(self.conf)},
        )
        if p.returncode != 0:
            raise RuntimeError(f"sbatch {argv} exited {p.returncode}: {p.stderr.strip()}")
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.cmd(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id: int, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info.get('JobState')} {info}")
