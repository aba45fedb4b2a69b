"""A real single-node Slurm cluster for tests: munge + slurmctld + slurmd in a temp dir.

Usage (pytest):

    from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

    def test_x(slurm_cluster):
        job = slurm_cluster.sbatch("--wrap", "echo hi")
        slurm_cluster.wait_for_jobs([job], timeout=30)

What it does (facts in ../shared/slurm-notes.md):
- skips with a clear reason when the Slurm/munge binaries are missing (it never installs
  anything: CI runs .ci/slurm-setup.sh first) or when not root (slurmd needs root). With
  BATCHGEN_REQUIRE_SLURM=1 (set by CI after .ci/slurm-setup.sh) a missing Slurm is an
  error instead of a skip.
- reuses a running munged, or starts one (as the munge user, in the foreground, so its pid
  is ours) and stops it at the end;
- writes slurm.conf with free ports, state/spool/logs under the temp dir, CPUs=4 with
  config_overrides so a 4-task array runs all at once on a 2-core machine, and
  AuthInfo=cred_expire=10 so a requeued task is re-run after ~10 s, not ~121 s;
- starts `slurmctld -D -i` and `slurmd -D -N <node>` and waits for the node to be idle;
- at the end: scancel everything, wait for squeue to be empty (slurmstepd outlives slurmd),
  then TERM the daemons by pid and KILL after 10 s.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

NODE = "bgnode"
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munge", "munged")
SETUP_HINT = "run .ci/slurm-setup.sh (apt-get install slurmctld slurmd slurm-client munge)"


def slurm_unavailable_reason() -> str | None:
    """None when a cluster can be started here, else why not."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"Slurm is not installed (missing: {', '.join(missing)}); {SETUP_HINT}"
    if os.geteuid() != 0:
        return "the Slurm tests start slurmd, which needs root"
    if not Path("/etc/munge/munge.key").exists():
        return f"/etc/munge/munge.key is missing; {SETUP_HINT}"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours still "exists": reap it if we can
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _stop_pid(pid: int, grace: float = 10.0) -> None:
    """TERM, then KILL after `grace` seconds."""
    if not _pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)


class SlurmCluster:
    """One node, one partition ("debug"), everything under `root`."""

    def __init__(self, root: Path, cpus: int = 4, cred_expire: int = 10):
        self.root = Path(root)
        self.cpus = cpus
        self.cred_expire = cred_expire
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # a job submitted from inside a test must not think it is itself an array task
        for k in list(self.env):
            if k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")) and k != "SLURM_CONF":
                del self.env[k]
        self._procs: dict[str, subprocess.Popen] = {}
        self._munged_pid: int | None = None
        self.started = False

    # ---- lifecycle -------------------------------------------------------------------
    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        ctl_port, d_port = _free_port(), _free_port()
        while d_port == ctl_port:
            d_port = _free_port()
        mem = max(_mem_total_mib() - 1024, 512)
        self.conf.write_text(
            f"""# written by tests/slurm_cluster.py
ClusterName=batchgen-test
SlurmctldHost=localhost
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire={self.cred_expire}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=300
KillWait=15
InactiveLimit=0
Waittime=0
NodeName={NODE} NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        )

    def _ensure_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # someone else's munged: use it, leave it running
        run_dir = Path("/run/munge")
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "755", str(run_dir)], check=True)
        log = open(self.root / "log" / "munged.out", "ab")
        proc = subprocess.Popen(
            [_which("munged"), "-F"], user="munge", group="munge",
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self._munged_pid = proc.pid
        self._procs["munged"] = proc
        deadline = time.monotonic() + 60  # polled: only a hang waits this long
        while time.monotonic() < deadline:
            if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
                return
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"munged did not start: {(self.root / 'log' / 'munged.out').read_text()[-2000:]}")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self._procs[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def start(self, timeout: float = 120.0) -> "SlurmCluster":  # polled: a loaded box may need long
        self.write_conf()
        self._ensure_munge()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
        self.started = True
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name in ("slurmctld", "slurmd"):
                if self._procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited at start:\n{self.logs()}")
            r = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            last = (r.stdout + r.stderr).strip()
            if r.returncode == 0 and last.split() and last.split()[0].rstrip("*") == "idle":
                return self
            time.sleep(0.2)
        raise RuntimeError(f"node not idle after {timeout} s (sinfo: {last!r}):\n{self.logs()}")

    def stop(self) -> None:
        """scancel all, wait for squeue to empty, then TERM/KILL the daemons by pid."""
        if not self.started:
            return
        try:
            if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
                ids = self.job_ids()
                if ids:
                    self.run("scancel", *ids, check=False, timeout=20)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and self.job_ids():
                    time.sleep(0.5)
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                proc = self._procs.get(name)
                if proc is not None:
                    _stop_pid(proc.pid)
                    try:
                        proc.wait(timeout=1)
                    except subprocess.TimeoutExpired:
                        pass
            self.started = False

    # ---- clients -----------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def sbatch(self, *args: str) -> str:
        """Submit; returns the job id (for an array: the array's job id)."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return out.split(";")[0]

    def job_ids(self) -> list[str]:
        r = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20)
        return r.stdout.split() if r.returncode == 0 else []

    def squeue(self, job: str | None = None) -> dict[str, str]:
        """{'<job>_<task>' or '<job>': STATE} for jobs still known to squeue."""
        argv = ["squeue", "-h", "-r", "-o", "%i %T"]
        if job:
            argv += ["-j", job]
        r = self.run(*argv, check=False, timeout=20)
        out: dict[str, str] = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out

    def job_info(self, job: str) -> list[dict[str, str]]:
        """`scontrol show job -o` as dicts (one per array task); [] once purged."""
        r = self.run("scontrol", "show", "job", "-o", job, check=False, timeout=20)
        recs = []
        for line in r.stdout.splitlines():
            rec = {}
            for tok in line.split():
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    rec[k] = v
            if rec:
                recs.append(rec)
        return recs

    def wait_for_jobs(self, jobs: list[str], timeout: float = 60) -> dict[str, str]:
        """Wait until no task of `jobs` is pending/running; returns {JobId_Task: JobState}."""
        deadline = time.monotonic() + timeout
        active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                  "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
        states: dict[str, str] = {}
        while True:
            states = {}
            for job in jobs:
                for rec in self.job_info(job):
                    key = rec.get("JobId", "?")
                    if rec.get("ArrayTaskId"):
                        key = f"{rec.get('ArrayJobId')}_{rec['ArrayTaskId']}"
                    states[key] = rec.get("JobState", "?")
            if states and not any(s in active for s in states.values()):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {jobs} still active after {timeout} s: {states}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for p in sorted((self.root / "log").glob("*")):
            try:
                parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}")
            except OSError:
                pass
        return "\n".join(parts)


def start_cluster(root: Path, **kw) -> SlurmCluster:
    reason = slurm_unavailable_reason()
    if reason:
        if os.environ.get("BATCHGEN_REQUIRE_SLURM") == "1":
            pytest.fail(f"BATCHGEN_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(root, **kw)
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()
