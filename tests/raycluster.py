"""A two-raylet Ray cluster on this machine for tests and benchmarks: a head (``ray start --head``) and a second node
(``ray start --address``), each with one CPU, its own object store and a custom resource (``head`` / ``node2``).

Both run as ``ray start --block`` in their own process groups and are ended through those groups (never
``ray stop``, which would stop every Ray on the machine). Every port is chosen free, the session lives in a short
private temp dir, and the cluster authenticates with its own random token passed in the environment
(``RayCluster.env``): drivers must run in a process started with that environment (Ray reads it when imported).
"""

from __future__ import annotations

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


class ClusterStartError(RuntimeError):
    """The cluster did not come up (the nodes' logs are in the message)."""


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _node_args(ports: list[int]) -> list[str]:
    nm, om, agent, agent_grpc, metrics, rtenv, wlo = ports
    return [f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={rtenv}", f"--min-worker-port={wlo}", f"--max-worker-port={wlo + 40}",
            "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End one ``ray start --block`` and everything it started (its own process group)."""
    # a `ray start --block` head often outlives SIGTERM by more than half a minute (its GCS shuts down slowly); the
    # cluster is private (own temp dir, own ports), so after a short grace period its group is killed
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the group may still hold workers the raylet left behind
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


_WAIT_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)
t0 = time.monotonic()
while sum(n["Alive"] for n in ray.nodes()) < 2:
    if time.monotonic() - t0 > float(sys.argv[2]):
        sys.exit(1)
    time.sleep(0.5)
"""


class RayCluster:
    """``with RayCluster() as c:`` starts the two nodes (``c.address``, ``c.env``) and always stops them."""

    def __init__(self, timeout_s: float = 180.0) -> None:
        self.timeout_s = timeout_s
        self.temp = Path(tempfile.mkdtemp(prefix="tvr", dir="/tmp"))  # Ray's socket paths must fit 107 bytes
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
        self.address = ""
        self.start_s = 0.0

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n" + f.read_text(errors="replace")[-1500:] for f in sorted(self.temp.glob("*.log")))

    def _wait(self, cond, what: str) -> None:
        t0 = time.monotonic()
        while not cond():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() - t0 > self.timeout_s:
                raise ClusterStartError(f"could not start a two-node Ray cluster ({what}):\n{self.logs()}")
            time.sleep(0.5)

    def start(self) -> RayCluster:
        t0 = time.perf_counter()
        ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        ports = _free_ports(1 + 2 * 7)
        gcs = ports[0]
        self.address = f"127.0.0.1:{gcs}"
        head = [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                f"--temp-dir={self.temp}", "--include-dashboard=false", '--resources={"head": 1}',
                *_node_args(ports[1:8])]
        node2 = [ray_bin, "start", "--block", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                 '--resources={"node2": 1}', *_node_args(ports[8:15])]
        try:
            for cmd, name in ((head, "head"), (node2, "node2")):
                with open(self.temp / f"{name}.log", "wb") as log:
                    self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                       start_new_session=True))
                if name == "head":
                    self._wait(lambda: _port_open(gcs), "the head's GCS")
            waiter = subprocess.Popen([sys.executable, "-c", _WAIT_NODES, self.address, str(self.timeout_s)],
                                      env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._wait(lambda: waiter.poll() is not None, "two alive nodes")
            if waiter.returncode != 0:
                raise ClusterStartError(f"the second raylet did not join:\n{self.logs()}")
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):
            _stop(p)
        self.procs.clear()
        shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_GRAM_RECORDS = """
import dataclasses, json, sys, time
import ray
from tvbasis.engine import RunOptions
from tvbasis.engine.ray import RayEngine
from tvbasis.passes.gram import compute_gram
from tvbasis.taskset import TaskSet
address, pre, *fts = sys.argv[1:]
eng = RayEngine(address=address, workers=2, progress=False)
try:
    nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k in ("head", "node2")) for n in ray.nodes() if n["Alive"]}
    taskset = TaskSet.open(pre, dict(f.split("=", 1) for f in fts))
    t0 = time.perf_counter()
    compute_gram(taskset, RunOptions(engine=eng))
    wall = time.perf_counter() - t0
    print(json.dumps({"nodes": nodes, "wall_s": wall, "records": [dataclasses.asdict(r) for r in eng.records]}))
finally:
    eng.close()
"""


def gram_records(cluster: RayCluster, pretrained: Path, finetuned: dict[str, Path]) -> dict[str, object]:
    """Run a Gram pass on the cluster through ``RayEngine(address=...)`` in a driver process of the cluster's
    environment; returns the alive nodes (id -> custom resources), the pass's wall time and ``RayEngine.records``."""
    import json

    out = subprocess.run([sys.executable, "-c", _GRAM_RECORDS, cluster.address, str(pretrained),
                          *[f"{n}={p}" for n, p in finetuned.items()]],
                         env=cluster.env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"gram pass on the cluster failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
