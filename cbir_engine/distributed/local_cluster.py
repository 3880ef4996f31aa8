"""A throwaway Ray cluster on this machine: a head and worker nodes on loopback addresses, for
tests, benchmarks and trying `cbir index --ray` without a real cluster.

    with LocalRayCluster(nodes=2, cpus_per_node=1) as cluster:
        cluster.connect()            # this process becomes the driver
        ...

Each node is a `ray start --block` process in a session of its own; stopping kills exactly the
processes of those sessions (the node daemons and the workers they spawned) and nothing else.
Every address is on 127.0.0.0/8: the head gets 127.0.0.2, worker nodes 127.0.0.3, ... (Ray rewrites
127.0.0.1 itself into the machine's outward address). The dashboard UI and usage statistics are
off, and token authentication is on with one random token given to every node and the driver.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cbir_engine.errors import CbirError


class ClusterStartError(CbirError, RuntimeError):
    """The local Ray cluster did not come up (its logs are named in the message)."""


def _free_ports(host: str, count: int, taken: set[int]) -> list[int]:
    """`count` distinct free ports on `host`, none in `taken` (which they are added to). The
    sockets stay bound until all are chosen: one at a time, the kernel may hand out a port it just
    released again, and a Ray node refuses to start when two of its components share a port."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            held.append(s)
            s.bind((host, 0))
            port = int(s.getsockname()[1])
            if port not in taken:
                taken.add(port)
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    if beside.is_file():
        return os.fspath(beside)
    found = shutil.which("ray")
    if found is None:
        raise ClusterStartError("the `ray` command is not installed: pip install 'cbir-engine[distributed]'")
    return found


def _session_members(sids: set[int]) -> list[int]:
    """Pids of live processes whose session id is one of `sids` (read from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        # Fields after the command name (which may hold spaces and parentheses): state ppid pgrp sid
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[3]) in sids and fields[0] != "Z":
            out.append(int(entry))
    return out


class LocalRayCluster:
    """A head node plus `nodes - 1` worker nodes, each with `cpus_per_node` logical CPUs."""

    def __init__(self, nodes: int = 2, cpus_per_node: float = 1, object_store_mb: int = 256,
                 start_timeout: float = 180.0) -> None:
        if nodes < 1 or nodes > 250:
            raise ValueError(f"nodes must be in [1, 250], got {nodes}")
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.object_store_mb = object_store_mb
        self.start_timeout = start_timeout
        self.token = secrets.token_hex(32)
        self.head_ip = "127.0.0.2"
        self.port = 0
        # Short: Ray puts unix sockets under it (108-byte path limit).
        self.temp_dir = tempfile.mkdtemp(prefix="cbray_", dir="/tmp")
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[Path] = []
        self._ports: set[int] = set()  # every port given to a node of this cluster

    # ------------------------------------------------------------------ environment
    def env(self) -> dict[str, str]:
        """The variables every node and the driver need: usage stats off, the same auth token."""
        return {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    def init_kwargs(self) -> dict[str, Any]:
        """Arguments for `ray.init` in this process (call `apply_env` first)."""
        return {"address": self.address, "_node_ip_address": self.head_ip, "log_to_driver": False}

    def apply_env(self) -> None:
        """Puts `env()` into this process's environment (the driver's side of the auth setting).

        Ray reads the auth mode and token when its core module loads; if that already happened
        in this process, its cached settings are read again (as Ray's own auth tests do)."""
        os.environ.update(self.env())
        if "ray._raylet" in sys.modules:
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()

    # ------------------------------------------------------------------ start and stop
    def _node_args(self, ip: str) -> list[str]:
        ports = [str(p) for p in _free_ports(ip, 6, self._ports)]
        return ["--node-ip-address", ip, "--num-cpus", str(self.cpus_per_node),
                "--object-store-memory", str(self.object_store_mb << 20), "--disable-usage-stats", "--block",
                "--object-manager-port", ports[0], "--node-manager-port", ports[1],
                "--dashboard-agent-listen-port", ports[2], "--dashboard-agent-grpc-port", ports[3],
                "--runtime-env-agent-port", ports[4], "--metrics-export-port", ports[5]]

    @staticmethod
    def _die_with_parent() -> None:
        """Runs in the child before exec: SIGTERM when the process that started the cluster dies
        (a test run killed before its teardown), which `ray start --block` answers by stopping
        its node's processes. Linux only; elsewhere nothing is set."""
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)

    def _spawn(self, args: list[str], name: str) -> None:
        log = Path(self.temp_dir) / f"{name}.log"
        self._logs.append(log)
        env = {**os.environ, **self.env()}
        with open(log, "wb") as out:
            self._procs.append(subprocess.Popen([_ray_executable(), "start", *args], env=env, stdout=out,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True, preexec_fn=self._die_with_parent))

    def start(self) -> LocalRayCluster:
        ray_bin = _ray_executable()  # fail before starting anything
        del ray_bin
        try:
            self.port, dashboard, client = _free_ports(self.head_ip, 3, self._ports)
            self._spawn(["--head", "--port", str(self.port), "--temp-dir", self.temp_dir,
                         "--include-dashboard=false", "--dashboard-port", str(dashboard),
                         "--ray-client-server-port", str(client), *self._node_args(self.head_ip)], "head")
            self._wait_for_port(self.head_ip, self.port)
            for i in range(1, self.nodes):
                ip = f"127.0.0.{2 + i}"
                self._spawn(["--address", self.address, *self._node_args(ip)], f"worker{i}")
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self

    def _wait_for_port(self, host: str, port: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._procs[0].poll() is not None:
                raise ClusterStartError(f"the Ray head exited with status {self._procs[0].returncode}; "
                                        f"see {self._logs[0]}")
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
                return
            time.sleep(0.2)
        raise ClusterStartError(f"the Ray head did not listen on {host}:{port} within "
                                f"{self.start_timeout:.0f} s; see {self._logs[0]}")

    def connect(self) -> None:
        """Connects this process to the cluster as its driver (`apply_env`, then `ray.init`) and
        waits for every node. The head's GCS port opens before its node has registered, and
        `ray.init` refuses a cluster without that node: retried until `start_timeout`."""
        import ray

        self.apply_env()
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                ray.init(**self.init_kwargs())
                break
            except (ConnectionError, RuntimeError) as e:
                if time.monotonic() > deadline or self._procs[0].poll() is not None:
                    raise ClusterStartError(f"cannot connect to the Ray head at {self.address}: {e}; see "
                                            f"the logs in {self.temp_dir}") from e
                if ray.is_initialized():
                    ray.shutdown()
                time.sleep(1.0)
        try:
            self.wait_for_nodes()
        except BaseException:
            # Disconnect before the caller stops the cluster: a driver left connected to a
            # stopped head is ended by Ray (exit status 1) once the GCS has been gone for 60 s.
            ray.shutdown()
            raise

    def wait_for_nodes(self) -> None:
        """Blocks until every node has joined (needs `ray.init` done in this process)."""
        import ray

        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if sum(1 for n in ray.nodes() if n["Alive"]) >= self.nodes:
                return
            dead = [p for p in self._procs if p.poll() is not None]
            if dead:
                raise ClusterStartError(f"a Ray node exited; see the logs in {self.temp_dir}")
            time.sleep(0.2)
        raise ClusterStartError(f"not all {self.nodes} Ray nodes joined within {self.start_timeout:.0f} s; "
                                f"see the logs in {self.temp_dir}")

    def pids(self) -> list[int]:
        """Every live process this cluster started (nodes, daemons, workers)."""
        return _session_members({p.pid for p in self._procs})

    def stop(self, keep_logs: bool = False) -> None:
        """Kills exactly the processes in the sessions this cluster started, then removes its files
        (`keep_logs` leaves them, for a start that failed)."""
        sids = {p.pid for p in self._procs}
        for _ in range(3):  # workers may be forked while the first ones go
            members = _session_members(sids)
            if not members:
                break
            for pid in members:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        self._procs.clear()
        if not keep_logs:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
