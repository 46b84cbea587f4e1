"""`punica serve` with bad flags or a busy port: one line on stderr, exit status 2, no
traceback, and (for the port) before any model is loaded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.server.conftest import Running


def run_serve(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "punica.cli", "serve", "--device", "cpu",
                           *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["--port", "99999"], "expected a port number"),
    (["--max-num-seqs", "0"], "max_num_seqs"),
    (["--max-loras", "-3"], "max_loras >= 0"),
    (["--lora-modules", "x=/nonexistent-dir"], "no adapter_config.json"),
    (["--lora-modules", "bad$name=/tmp"], "lora_name: expected"),
    (["--api-key-file", "/nonexistent-file"], "--api-key-file"),
    (["--tenant-max-in-flight", "0"], "--tenant-max-in-flight: expected >= 1"),
    (["--tenant-weights", "/nonexistent-file"], "--tenant-weights"),
])
def test_bad_flags_fail_in_one_line(checkpoint: Running, args: list[str], needle: str) -> None:
    done = run_serve("--model", str(checkpoint.model_dir), *args)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_busy_port_fails_before_the_model_loads(checkpoint: Running) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_serve("--model", str(checkpoint.model_dir / "missing"), "--port", str(port))
    # The model directory does not exist: had the port been checked after the model, the
    # error would be about the model.
    assert done.returncode == 2 and "cannot listen" in done.stderr, done.stderr


def test_the_cluster_refuses_tenant_flags_it_would_ignore(checkpoint: Running) -> None:
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "punica.cli", "cluster", "--device", "cpu",
                           "--model", str(checkpoint.model_dir), "--scheduling-policy", "fair",
                           "--tenant-tokens-per-minute", "100"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--scheduling-policy, --tenant-tokens-per-minute: not supported by punica cluster" \
        in done.stderr and "Traceback" not in done.stderr, done.stderr
