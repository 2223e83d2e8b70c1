"""Nodes die with their supervisor, and no Python runs between fork and exec.

The supervisor (demo, tests, benchmarks) holds live gRPC threads, so it starts
nodes with a plain fork+exec; each node ties its life to the supervisor itself
(parent-death signal checked against ``--parent-pid``, and end of file on its
standard input). These tests SIGKILL a real supervisor process and watch its
real node go away.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki
from tests.support import wait_until

REPO = Path(__file__).resolve().parents[1]

# A supervisor as the demo is one: it starts a node through LocalFederation,
# tells the test the node's ready file, then waits to be killed.
SUPERVISOR = r"""
import subprocess, sys
from pathlib import Path
from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki

workdir, pki_root, federation, mode = sys.argv[1:5]
local = LocalFederation(Path(workdir), DevPki(Path(pki_root), federation), [NodeSpec("FR", "FR", "fr@example")])
node = local["FR"]
if mode == "forking-prefix":  # the node's parent is a shell that waits for it, not the supervisor
    node.prefix = ["sh", "-c", '"$@"; exit $?', "wrapper"]
if mode == "parent-pid-only":  # the kernel's parent-death signal alone
    node.write_config()
    command = [arg for arg in node.serve_command() if arg != "--stop-on-stdin-eof"]
    with node.log_path.open("ab") as log:
        node.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
else:
    node.start()
node.wait_ready()
print(node.ready_path, flush=True)
sys.stdin.read()  # until the test kills us
"""


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaps has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("mode", ["localfed", "forking-prefix", "parent-pid-only"])
def test_node_stops_when_its_supervisor_is_sigkilled(pki: DevPki, tmp_path: Path, mode: str) -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path), str(pki.root), pki.federation, mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    node_pid = None
    try:
        line = supervisor.stdout.readline()  # type: ignore[union-attr]
        assert line, f"supervisor exited with {supervisor.wait()} before its node was ready"
        node_pid = int(json.loads(Path(line.strip()).read_text())["pid"])
        assert _alive(node_pid) and node_pid != supervisor.pid

        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        wait_until(lambda: not _alive(node_pid), 30, f"node {node_pid} exits after its supervisor's SIGKILL")
        log = (tmp_path / "FR" / "node.log").read_text()
        assert '"stopped"' in log, log  # a graceful stop, not a crash
    finally:
        _kill(supervisor.pid)
        supervisor.wait()
        if node_pid is not None:
            _kill(node_pid)


def test_node_stops_when_its_stdin_closes(pki: DevPki, tmp_path: Path) -> None:
    local = LocalFederation(tmp_path, pki, [NodeSpec("FR", "FR", "fr@example")])
    with local:
        node = local["FR"]
        assert node.process is not None and node.process.stdin is not None
        node.process.stdin.close()
        assert node.process.wait(timeout=30) == 0
        assert '"stopped"' in node.log_tail()


def test_node_refuses_to_serve_when_its_parent_is_already_gone(pki: DevPki, tmp_path: Path) -> None:
    """The supervisor may die between exec and arming: the node checks getppid()."""
    node = LocalFederation(tmp_path, pki, [NodeSpec("FR", "FR", "fr@example")])["FR"]
    node.write_config()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that was a process and is no longer our parent
    done = subprocess.run(
        node.node_command("serve", "--config", str(node.config_path), "--ready-file", str(node.ready_path),
                          "--parent-pid", str(gone.pid)),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"parent process {gone.pid} is gone" in done.stderr
    assert not node.ready_path.exists()


def test_no_python_runs_between_fork_and_exec() -> None:
    """No pre-exec hook anywhere (``git grep`` finds none): unsafe with gRPC threads."""
    needle = "preexec" + "_fn"
    offenders = [str(path.relative_to(REPO)) for top in ("federation", "node", "gateway", "tests")
                 for path in (REPO / top).rglob("*.py") if needle in path.read_text(errors="replace")]
    assert offenders == []
