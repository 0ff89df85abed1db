"""A real SLURM cluster for tests: slurmctld + one slurmd per node, each in its own network namespace.

Layout (all addresses live only inside namespaces this harness creates and deletes)::

    host netns (the test process)         nothing added here but named netns handles
      |
      +-- netns <prefix>c   "controller": bridge br0 10.213.0.1/24, slurmctld, munge traffic
      |      veth vn1 ----------- eth0  netns <prefix>n1  node1 10.213.0.11  slurmd (hostname node1)
      |      veth vn2 ----------- eth0  netns <prefix>n2  node2 10.213.0.12  slurmd (hostname node2)

Each daemon runs under ``nsenter --net=<netns> unshare --uts --mount``: its own hostname and a
private mount namespace in which ``/etc/hosts`` (every node name) is bind-mounted. Not
``ip netns exec``, which remounts ``/sys`` and hides ``/sys/fs/cgroup`` from slurmd. One munged
(own key, own socket, all in the scratch dir) serves every daemon and client.

Client commands (``sbatch``, ``squeue``, ``scontrol``, ``scancel``, ``sinfo``) from the test process
go through small wrappers in ``<workdir>/bin`` that enter the controller's netns; put
:attr:`SlurmCluster.env` into a subprocess's environment (``PATH`` and ``SLURM_CONF``) and plain
``sbatch`` works there, ``tome_train.slurm.submit`` included. Inside a job the wrappers call the
real commands directly (the nodes reach the controller over the bridge).

Usage::

    with SlurmCluster(tmp_path / "slurm", nodes=2, cpus=2) as cluster:
        job = cluster.submit(script)
        cluster.wait_state(job, {"RUNNING"}, timeout=30)
        cluster.signal(job, "USR1")
        cluster.wait_state(job, {"COMPLETED"}, timeout=60)
        assert cluster.restart_count(job) == 1

When SLURM cannot run here (not root, packages missing, no network namespaces)
:class:`SlurmUnavailable` is raised with the reason; tests turn it into ``pytest.skip``.
"""
from __future__ import annotations

import atexit
import itertools
import os
import re
import secrets
import shutil
import signal as _signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "sacct", "srun", "salloc", "munge", "unmunge")
WRAPPED = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "sacct")
TOOLS = ("ip", "nsenter", "unshare", "mount", "hostname")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
SETUP_HINT = "run `bash scripts/ci_slurm_setup.sh` as root to install slurmctld slurmd slurm-client munge"

_counter = itertools.count()


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run on this machine; the message says why (tests skip with it)."""


class SlurmClusterError(RuntimeError):
    """The cluster was available but did not behave (a real failure, not a skip)."""


def _which(prog: str) -> Optional[str]:
    return shutil.which(prog) or next(
        (p for p in (f"/usr/sbin/{prog}", f"/usr/bin/{prog}", f"/sbin/{prog}") if os.access(p, os.X_OK)), None
    )


def unavailable_reason() -> Optional[str]:
    """Why a cluster cannot start here, or None. Cheap: no daemon is started."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "SLURM tests need Linux"
    if os.geteuid() != 0:
        return "SLURM tests need root (network namespaces, daemons as SlurmUser=root)"
    missing = [p for p in DAEMONS + ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo") if not _which(p)]
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)}); {SETUP_HINT}"
    missing = [p for p in TOOLS if not _which(p)]
    if missing:
        return f"missing {', '.join(missing)} (iproute2, util-linux) for the network namespaces"
    if not Path("/sys/fs/cgroup").is_dir() or not any(Path("/sys/fs/cgroup").iterdir()):
        return "slurmd needs the cgroup filesystem mounted at /sys/fs/cgroup"
    return None


def _run(cmd: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise SlurmClusterError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class SlurmCluster:
    """A real SLURM with ``nodes`` compute nodes (1 or more), each ``cpus`` CPUs.

    ``workdir`` holds the config, state, logs and the munge key; it should be fresh (job ids
    restart at 1). ``start()``/``stop()`` or use it as a context manager.
    """

    def __init__(
        self,
        workdir: Path | str,
        nodes: int = 2,
        cpus: int = 2,
        real_memory_mb: int = 4000,
        subnet: str = "10.213.0",
        partition: str = "debug",
        node_prefix: str = "node",
        extra_conf: Iterable[str] = (),
    ):
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.workdir = Path(workdir).resolve()
        self.nodes = nodes
        self.cpus = cpus
        self.real_memory_mb = real_memory_mb
        self.subnet = subnet
        self.partition = partition
        self.extra_conf = list(extra_conf)
        self.node_names = [f"{node_prefix}{i + 1}" for i in range(nodes)]
        self.node_addrs = [f"{subnet}.{11 + i}" for i in range(nodes)]
        self.ctl_name, self.ctl_addr = "slurmctl", f"{subnet}.1"
        tag = f"tt{os.getpid() % 100000}{secrets.token_hex(2)}{next(_counter)}"
        self.ctl_ns = f"{tag}c"
        self.node_ns = [f"{tag}n{i + 1}" for i in range(nodes)]
        self.conf = self.workdir / "etc" / "slurm.conf"
        self.bin_dir = self.workdir / "bin"
        self.log_dir = self.workdir / "log"
        self._procs: dict[str, subprocess.Popen] = {}
        self._made_ns: list[str] = []
        self._started = False
        # unix socket paths are limited to 107 bytes: munge's socket and slurmd's spool, where each job step
        # makes one, go in a short folder, whatever the length of ``workdir`` (pytest-xdist's are long)
        self._socket_dir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        self.munge_socket = self._socket_dir / "munge.sock"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses that talk to this cluster (plain ``sbatch`` etc. work)."""
        env = dict(os.environ)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["SLURM_CONF"] = str(self.conf)
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del env[key]  # a test run inside a SLURM job must not leak that job's settings
        return env

    def start(self, timeout: float = 60) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason:
            raise SlurmUnavailable(reason)
        if self.workdir.exists() and any(self.workdir.iterdir()):
            raise SlurmClusterError(f"{self.workdir} is not empty: use a fresh directory (job ids, state)")
        try:
            atexit.register(self.stop)  # daemons never outlive the test process, even on an error
            self._write_files()
            self._make_network()
            self._start_munge()
            self._start_daemon("slurmctld", self.ctl_ns, self.ctl_name,
                               ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") > 0,
                       timeout, "slurmctld to answer `scontrol ping`")
            for name, ns in zip(self.node_names, self.node_ns):
                self._start_daemon(f"slurmd-{name}", ns, name, ["slurmd", "-D", "-f", str(self.conf), "-N", name])
            self._started = True
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job, stop each daemon by its pid, delete the namespaces. Idempotent."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            try:
                self.run(["scancel", "--partition", self.partition], check=False, timeout=10)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    out = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.strip()
                    if not out:
                        break
                    time.sleep(0.3)
            except Exception:
                pass
        # slurmd first (it owns slurmstepd children), the controller, munged last
        order = [k for k in self._procs if k.startswith("slurmd-")] + ["slurmctld", "munged"]
        for key in order:
            proc = self._procs.get(key)
            if proc is not None:
                self._terminate(proc)
        self._kill_leftovers()
        self._procs.clear()
        for ns in reversed(self._made_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made_ns.clear()
        shutil.rmtree(self._socket_dir, ignore_errors=True)
        self._started = False
        atexit.unregister(self.stop)

    @staticmethod
    def _terminate(proc: subprocess.Popen, timeout: float = 10) -> None:
        if proc.poll() is not None:
            return
        proc.send_signal(_signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _kill_leftovers(self) -> None:
        """Any process still inside one of our network namespaces (slurmstepd, job tasks) is ours."""
        inodes = set()
        for ns in self._made_ns:
            try:
                inodes.add(os.stat(f"/run/netns/{ns}").st_ino)
            except OSError:
                pass
        if not inodes:
            return
        for _ in range(3):
            found = []
            for pid_dir in Path("/proc").iterdir():
                if not pid_dir.name.isdigit():
                    continue
                try:
                    if os.stat(pid_dir / "ns" / "net").st_ino in inodes:
                        found.append(int(pid_dir.name))
                except OSError:
                    continue
            if not found:
                return
            for pid in found:
                try:
                    os.kill(pid, _signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.3)

    # ------------------------------------------------------------------ setup pieces
    def _write_files(self) -> None:
        for sub in ("etc", "bin", "log", "state", "run"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        for name in self.node_names:
            (self._socket_dir / "spool" / name).mkdir(parents=True)
        hosts = ["127.0.0.1 localhost", "::1 localhost", f"{self.ctl_addr} {self.ctl_name}"]
        hosts += [f"{a} {n}" for a, n in zip(self.node_addrs, self.node_names)]
        (self.workdir / "etc" / "hosts").write_text("\n".join(hosts) + "\n")
        w = self.workdir
        conf = [
            "ClusterName=tometest",
            f"SlurmctldHost={self.ctl_name}({self.ctl_addr})",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "SlurmctldPort=6817",
            "SlurmdPort=6818",
            f"StateSaveLocation={w}/state",
            f"SlurmdSpoolDir={self._socket_dir}/spool/%n",
            f"SlurmctldPidFile={w}/run/slurmctld.pid",
            f"SlurmdPidFile={w}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={w}/log/slurmctld.log",
            f"SlurmdLogFile={w}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "SlurmdParameters=config_overrides",  # declared CPUs/memory need not match this machine
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SlurmdTimeout=60",
            "SlurmctldTimeout=60",
            "MessageTimeout=10",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job`
            "JobRequeue=1",
            *self.extra_conf,
        ]
        for name, addr in zip(self.node_names, self.node_addrs):
            conf.append(
                f"NodeName={name} NodeAddr={addr} NodeHostname={name} CPUs={self.cpus} "
                f"RealMemory={self.real_memory_mb} State=UNKNOWN"
            )
        conf.append(f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO")
        self.conf.write_text("\n".join(conf) + "\n")
        host_net = os.readlink("/proc/self/ns/net")
        for prog in WRAPPED:
            real = _which(prog)
            if not real:
                continue
            wrapper = self.bin_dir / prog
            wrapper.write_text(
                "#!/bin/sh\n"
                f"# {prog} for the test SLURM in {self.workdir}: from outside its namespaces, enter the controller's\n"
                f"export SLURM_CONF=\"${{SLURM_CONF:-{self.conf}}}\"\n"
                f"if [ \"$(readlink /proc/self/ns/net)\" = '{host_net}' ]; then\n"
                f"  exec nsenter --net=/run/netns/{self.ctl_ns} -- {real} \"$@\"\n"
                "fi\n"
                f"exec {real} \"$@\"\n"
            )
            wrapper.chmod(0o755)

    def _ip(self, *args: str, ns: Optional[str] = None) -> None:
        _run(["ip", *(["-n", ns] if ns else []), *args])

    def _make_network(self) -> None:
        for ns in [self.ctl_ns, *self.node_ns]:
            proc = _run(["ip", "netns", "add", ns], check=False)
            if proc.returncode != 0:
                raise SlurmUnavailable(f"cannot create a network namespace ({proc.stderr.strip()})")
            self._made_ns.append(ns)
            self._ip("link", "set", "lo", "up", ns=ns)
        c = self.ctl_ns
        try:
            self._ip("link", "add", "br0", "type", "bridge", ns=c)
        except SlurmClusterError as e:
            raise SlurmUnavailable(f"cannot create a bridge in a network namespace ({e})") from None
        self._ip("addr", "add", f"{self.ctl_addr}/24", "dev", "br0", ns=c)
        self._ip("link", "set", "br0", "up", ns=c)
        for i, (ns, addr) in enumerate(zip(self.node_ns, self.node_addrs), start=1):
            try:
                self._ip("link", "add", f"vn{i}", "type", "veth", "peer", "name", "eth0", "netns", ns, ns=c)
            except SlurmClusterError as e:
                raise SlurmUnavailable(f"cannot create a veth pair ({e})") from None
            self._ip("link", "set", f"vn{i}", "master", "br0", ns=c)
            self._ip("link", "set", f"vn{i}", "up", ns=c)
            self._ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
            self._ip("link", "set", "eth0", "up", ns=ns)

    def _start_munge(self) -> None:
        d = self._socket_dir
        os.chmod(d, 0o755)  # the key inside stays 0400; clients need to reach the socket
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        log = self.log_dir / "munged.log"
        cmd = [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
               f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed", f"--log-file={log}",
               "--num-threads=4"]
        self._procs["munged"] = subprocess.Popen(
            cmd, stdout=open(self.log_dir / "munged.out", "w"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )

        def ok() -> bool:
            if self._procs["munged"].poll() is not None:
                raise SlurmClusterError(f"munged exited: {_tail(self.log_dir / 'munged.out')} {_tail(log)}")
            if not self.munge_socket.exists():
                return False
            cred = subprocess.run([_which("munge"), "-n", "-S", str(self.munge_socket)], capture_output=True)
            if cred.returncode != 0:
                return False
            back = subprocess.run([_which("unmunge"), "-S", str(self.munge_socket)], input=cred.stdout,
                                  capture_output=True)
            return back.returncode == 0 and b"Success" in back.stdout

        self._wait(ok, 15, "munged (`munge -n | unmunge` to say Success)")

    def _start_daemon(self, key: str, ns: str, hostname: str, argv: list[str]) -> None:
        """Run a daemon in the foreground inside netns ``ns`` with its own hostname and /etc/hosts."""
        hosts = self.workdir / "etc" / "hosts"
        exe = _which(argv[0])
        inner = (
            f"hostname {hostname} && mount --bind {hosts} /etc/hosts && "
            f"exec {exe} {' '.join(argv[1:])}"
        )
        cmd = [_which("nsenter"), f"--net=/run/netns/{ns}", "--", _which("unshare"), "--uts", "--mount",
               "--propagation", "private", "/bin/sh", "-c", inner]
        env = dict(self.env)
        self._procs[key] = subprocess.Popen(
            cmd, stdout=open(self.log_dir / f"{key}.out", "w"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=str(self.workdir),
        )
        time.sleep(0.2)
        if self._procs[key].poll() is not None:
            raise SlurmClusterError(f"{key} exited at once:\n{self.logs()}")

    def _wait(self, cond, timeout: float, what: str, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            for key, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmClusterError(f"{key} died (exit {proc.returncode}) while waiting for {what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.logs()}")
            time.sleep(interval)

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until every node is idle (``sinfo``)."""
        def idle() -> bool:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split("\n")
            states = dict(line.split() for line in out if len(line.split()) == 2)
            return all(states.get(n) == "idle" for n in self.node_names)
        self._wait(idle, timeout, f"{self.nodes} idle node(s) in sinfo")

    # ------------------------------------------------------------------ clients
    def run(self, cmd: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, scontrol, ...) against this cluster."""
        kw.setdefault("env", self.env)
        if cmd[0] in WRAPPED:
            cmd = [str(self.bin_dir / cmd[0]), *cmd[1:]]
        return _run(cmd, check=check, timeout=timeout, **kw)

    def submit(self, script: Path | str, *sbatch_args: str, cwd: Optional[Path] = None) -> str:
        """``sbatch --parsable [args] script``; returns the job id."""
        proc = self.run(["sbatch", "--parsable", *sbatch_args, str(script)], cwd=str(cwd) if cwd else None)
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, NodeList, ExitCode, ...)."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_state(self, job_id: str, states: Iterable[str] | str, timeout: float = 60) -> str:
        """Wait until the job is in one of ``states``; fail early if it ends in another final state."""
        want = {states} if isinstance(states, str) else set(states)

        def reached():
            s = self.state(job_id)
            if s in want:
                return s
            if s in FINAL_STATES:
                raise SlurmClusterError(f"job {job_id} ended {s}, expected {sorted(want)}: {self.job_info(job_id)}\n{self.logs()}")
            return None
        return self._wait(reached, timeout, f"job {job_id} to reach {sorted(want)}", interval=0.3)

    def signal(self, job_id: str, sig: str = "USR1") -> None:
        """``scancel -s SIG JOB``: reaches the job's srun tasks (Lightning's handler), not the batch shell."""
        self.run(["scancel", "-s", sig, str(job_id)])

    def signal_batch(self, job_id: str, sig: str = "USR1") -> None:
        """``scancel -b -s SIG JOB``: the batch shell only."""
        self.run(["scancel", "-b", "-s", sig, str(job_id)])

    def requeue(self, job_id: str) -> None:
        self.run(["scontrol", "requeue", str(job_id)])

    def cancel(self, job_id: str) -> None:
        self.run(["scancel", str(job_id)], check=False)

    def restart_count(self, job_id: str) -> int:
        return int(self.job_info(job_id).get("Restarts", "0") or 0)

    def job_nodes(self, job_id: str) -> list[str]:
        """Host names the job runs (or ran) on."""
        nodelist = self.job_info(job_id).get("NodeList", "")
        if not nodelist or nodelist == "(null)":
            return []
        return self.run(["scontrol", "show", "hostnames", nodelist]).stdout.split()

    def wait_for(self, cond, timeout: float = 60, what: str = "a condition"):
        """Poll ``cond()`` until truthy; on timeout the error carries the daemon logs."""
        return self._wait(cond, timeout, what, interval=0.3)

    def logs(self, n: int = 15) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            parts.append(f"--- {path.name}\n{_tail(path, n)}")
        return "\n".join(parts)
