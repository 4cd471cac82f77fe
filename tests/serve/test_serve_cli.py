"""`megaloom serve` end to end: a subprocess serving a saved checkpoint on 127.0.0.1, and
option errors reported before the model loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
from server_process import free_port, wait_until_healthy


def test_serve_command_serves_a_checkpoint(checkpoint):
    port = free_port()
    env = {**os.environ, "MEGALOOM_API_KEY": "k3y"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "megaloom", "serve", str(checkpoint), "--port", str(port),
         "--max-batch-size", "4", "--model-name", "tiny-cli", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url, timeout=60, interval=0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3y"}).json()
        assert models["data"][0]["id"] == "tiny-cli"
    finally:
        proc.terminate()  # uvicorn shuts down gracefully, then re-raises the signal
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


@pytest.mark.parametrize("flag,value,message", [
    ("--port", "70000", "--port must be <= 65535"),
    ("--max-queue", "-1", "--max-queue must be >= 0"),
    ("--timeout", "0", "--timeout must be > 0"),
    ("--max-batch-size", "0", "--max-batch-size must be >= 1"),
])
def test_bad_options_fail_before_loading(tmp_path, flag, value, message):
    result = subprocess.run([sys.executable, "-m", "megaloom", "serve", str(tmp_path / "none"),
                             flag, value], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr
