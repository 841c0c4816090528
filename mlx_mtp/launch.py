"""Run a program as several processes of MLX's ring backend on this machine:

    python -m mlx_mtp.launch -n 2 -- -m mlx_mtp.lora --train --model M --data DIR ...

It does what ``mlx.launch -n N --backend ring`` does for one host (each
process gets ``MLX_RANK`` and an ``MLX_HOSTFILE`` of 127.0.0.1 ports, so
``mx.distributed.init()`` joins the ring), but the processes write to this
process's stdout and stderr directly. ``mlx.launch`` relays their output
through threads that poll without waiting, which keeps most of a core busy;
on a machine of few cores that core is taken from the training
(docs/training.md, "Two processes on one machine"). For several hosts, use
``mlx.launch``.

The exit status is 0 when every process ends with 0, otherwise the first
failing process's status; a process that fails stops the others. Each
process runs in its own session, and this one passes every SIGINT (Ctrl-C)
and SIGTERM it gets on to each of them, once: the first asks the trainer to
save a checkpoint and stop, a second to stop at once, as for a lone trainer.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional

from .errors import MTPError, cli_main

POLL_SECONDS = 0.2  # how often the processes' exit is checked: nothing else runs here


def free_ports(n: int) -> List[int]:
    """``n`` distinct TCP ports of 127.0.0.1 that nothing listens on now."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def hostfile(ports: List[int]) -> str:
    """The ring backend's hostfile: one list of ``ip:port`` per rank."""
    return json.dumps([[f"127.0.0.1:{p}"] for p in ports])


class Ranks:
    """The running processes of one ring, and the signals passed on to them."""

    def __init__(self):
        self.procs: List[subprocess.Popen] = []
        self.signalled = False

    def forward(self, signum, frame=None):
        self.signalled = True
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def wait(self) -> int:
        """Wait for every process. After a signal they all stop by themselves;
        otherwise the first that fails stops the others, which would wait on
        the ring forever. Returns the exit status."""
        status, running = 0, list(self.procs)
        while running:
            for p in list(running):
                rc = p.poll()
                if rc is None:
                    continue
                running.remove(p)
                if rc != 0 and status == 0:
                    status = rc
                    if not self.signalled:
                        stop(running)
            time.sleep(POLL_SECONDS)
        return status


def stop(procs: List[subprocess.Popen], grace: float = 10.0):
    """Terminate ``procs``, then kill those still running after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(args: List[str], num_processes: int, python: str = sys.executable, ports: Optional[List[int]] = None) -> int:
    """Run ``python ARGS`` as ``num_processes`` ranks of one ring.

    Args:
        args: the arguments after the interpreter (``["-m", "mlx_mtp.lora", ...]``).
        num_processes: how many ranks.
        python: the interpreter each rank runs.
        ports: one port per rank (default: free ports of 127.0.0.1).

    Returns:
        The exit status: 0, or the first failing rank's.
    """
    ports = ports or free_ports(num_processes)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mlx_mtp_hosts_", delete=False) as f:
        f.write(hostfile(ports))
    ranks = Ranks()
    old = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        old = {s: signal.signal(s, ranks.forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(num_processes):
            env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=f.name)
            ranks.procs.append(
                subprocess.Popen([python, *args], env=env, stdin=subprocess.DEVNULL, start_new_session=True)
            )
        return ranks.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        stop(ranks.procs)
        os.unlink(f.name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_mtp.launch",
        description="Run `python ARGS` as N processes of MLX's ring backend on this machine.",
    )
    p.add_argument("-n", "--num-processes", type=int, default=2, help="how many processes (default: 2)")
    p.add_argument("--python", default=sys.executable, help="the interpreter (default: this one)")
    p.add_argument(
        "--starting-port", type=int, default=None, help="rank i listens on this port + i (default: free ports)"
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="the interpreter's arguments, after --")
    return p


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not rest:
        parser.print_usage(sys.stderr)
        raise MTPError("nothing to run: give the interpreter's arguments after --")
    if args.num_processes < 1:
        raise MTPError(f"-n {args.num_processes}: at least 1 process")
    ports = None
    if args.starting_port is not None:
        if not 0 < args.starting_port <= 65535 - args.num_processes:
            raise MTPError(f"--starting-port {args.starting_port}: not a port for {args.num_processes} ranks")
        ports = list(range(args.starting_port, args.starting_port + args.num_processes))
    return launch(rest, args.num_processes, args.python, ports)


if __name__ == "__main__":
    sys.exit(main())
