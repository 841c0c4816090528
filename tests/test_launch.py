"""python -m mlx_mtp.launch: ranks, hostfile, exit status and signals, with
small Python programs as the ranks (the trainer's two-process run is in
test_train_run.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_mtp.errors import USER_ERROR_EXIT
from mlx_mtp.launch import hostfile, main

REPO = Path(__file__).resolve().parents[1]


def _launch(tmp_path, program: str, *options, **kwargs):
    script = tmp_path / "rank.py"
    script.write_text(program)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "mlx_mtp.launch", *options, "--", str(script)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_each_rank_gets_its_rank_and_one_hostfile(tmp_path):
    program = (
        "import json, os, sys\n"
        "hosts = json.load(open(os.environ['MLX_HOSTFILE']))\n"
        "rank, path = int(os.environ['MLX_RANK']), os.environ['MLX_HOSTFILE']\n"
        "row = {'rank': rank, 'hosts': hosts, 'path': path, 'stdin': sys.stdin.read()}\n"
        "sys.stdout.write(json.dumps(row) + '\\n')\n"
    )
    proc = _launch(tmp_path, program, "-n", "3", "--starting-port", "40100")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    rows = sorted((json.loads(line) for line in out.splitlines()), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1, 2]
    expected = [["127.0.0.1:40100"], ["127.0.0.1:40101"], ["127.0.0.1:40102"]]
    assert all(r["hosts"] == expected for r in rows)
    assert all(r["stdin"] == "" for r in rows)
    assert len({r["path"] for r in rows}) == 1 and not Path(rows[0]["path"]).exists()


def test_free_ports_are_distinct():
    hosts = json.loads(hostfile([5, 6]))
    assert hosts == [["127.0.0.1:5"], ["127.0.0.1:6"]]
    from mlx_mtp.launch import free_ports

    ports = free_ports(4)
    assert len(set(ports)) == 4 and all(0 < p < 65536 for p in ports)


def test_a_failing_rank_stops_the_others_with_its_status(tmp_path):
    program = "import os, sys, time\nif os.environ['MLX_RANK'] == '1':\n    sys.exit(5)\ntime.sleep(120)\n"
    start = time.monotonic()
    proc = _launch(tmp_path, program)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 5, err
    assert time.monotonic() - start < 30


def test_every_signal_reaches_each_rank_once(tmp_path):
    """The first SIGINT to the launcher reaches each rank once; each exits
    with 10 + the number of SIGINTs it got, and the launcher with the first
    failing status."""
    program = (
        "import os, signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGINT, lambda *a: got.append(1))\n"
        "sys.stdout.write('ready\\n')\n"
        "sys.stdout.flush()\n"
        "while not got:\n"
        "    time.sleep(0.05)\n"
        "time.sleep(1.0)\n"
        "sys.exit(10 + len(got))\n"
    )
    proc = _launch(tmp_path, program)
    try:
        assert [proc.stdout.readline() for _ in range(2)] == ["ready\n", "ready\n"]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 11, err


def test_usage_errors(capsys):
    assert main([]) == USER_ERROR_EXIT
    assert "error: nothing to run: give the interpreter's arguments after --" in capsys.readouterr().err
    assert main(["-n", "0", "--", "x.py"]) == USER_ERROR_EXIT
    assert capsys.readouterr().err.strip() == "error: -n 0: at least 1 process"
    assert main(["-n", "2", "--starting-port", "65535", "--", "x.py"]) == USER_ERROR_EXIT
    assert capsys.readouterr().err.strip() == "error: --starting-port 65535: not a port for 2 ranks"


@pytest.mark.parametrize("status", [0, 3])
def test_one_rank_is_the_program_itself(tmp_path, status):
    proc = _launch(tmp_path, f"import sys\nprint('hi')\nsys.exit({status})\n", "-n", "1")
    out, _ = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (status, "hi\n")


def test_launch_from_a_worker_thread(tmp_path):
    """Outside the main thread no signal handler can be set: it runs without."""
    import threading

    from mlx_mtp.launch import launch

    script = tmp_path / "rank.py"
    script.write_text("import os, sys\nsys.exit(20 + int(os.environ['MLX_RANK']))\n")
    result = []
    worker = threading.Thread(target=lambda: result.append(launch([str(script)], 2)))
    worker.start()
    worker.join(60)
    assert result in ([20], [21])
