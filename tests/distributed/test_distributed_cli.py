"""`megaloom train --nproc 2` launches torchrun and matches the single-process run, both data
parallel (samples sharded, distributed optimizer) and pipelined (validation through the stages);
a layout that does not fit the world size is a one-line error; a killed rank is restarted and
the run resumes to the same losses; a crash while writing shards loses nothing."""

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaloom.checkpoint.reader import find_latest
from megaloom.cli import main
from megaloom.loading import load_model
from megaloom.train.metrics import read_metrics

SENTENCES = ["The loom weaves threads of text into cloth.", "Models predict the next token.",
             "A tokenizer splits words into pieces.", "Python reads the documentation."]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(SENTENCES[(i + k) % 4]
                                                          for k in range(1 + i % 4))}) + "\n"
                              for i in range(200)), encoding="utf-8")
    tok = root / "tok.json"
    assert main(["tokenizer", "train", "--vocab-size", "300", "--output", str(tok),
                 str(corpus)]) == 0
    assert main(["preprocess", "--input", str(corpus), "--output-prefix", str(root / "c"),
                 "--tokenizer", str(tok), "--append-eod", "--no-progress"]) == 0
    return root, tok


def train_args(data, out, *extra):
    root, tok = data
    return ["train", "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
            "model.seq_len=16", "train.max_steps=3", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.eval_interval=3", "train.eval_iters=2",
            "train.warmup_steps=1", "train.precision=fp32",
            f"data.prefixes=[{root / 'c_text_document'}]", f"data.tokenizer={tok}",
            f"data.cache_dir={root / 'cache'}", "--out", str(out), "--samples", "0", *extra]


@pytest.mark.parametrize("layout", ["parallel.distributed_optimizer=true", "parallel.pp=2"])
def test_nproc_run_matches_single_process(data, tmp_path, layout):
    assert main(train_args(data, tmp_path / "one")) == 0
    assert main(train_args(data, tmp_path / "two", layout, "--nproc", "2")) == 0
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    step = tmp_path / "two" / "checkpoints" / "step_00000003"
    # both ranks write their own shard (pipeline stages, or ZeRO-1 optimizer shards)
    assert sorted(p.name for p in step.glob("shard_*")) == ["shard_00000.safetensors",
                                                             "shard_00001.safetensors"]


def test_layout_larger_than_world_is_a_clear_error(data, tmp_path, capsys):
    assert main(train_args(data, tmp_path / "bad", "parallel.tp=2")) != 0
    err = capsys.readouterr().err
    assert "parallel.tp" in err and "Traceback" not in err


def _worker_pids(out_dir, rank: int) -> list[int]:
    """Pids of the torchrun workers of the run writing to `out_dir` with global rank `rank`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out_dir).encode() in cmdline and f"RANK={rank}".encode() in environ \
                and any(e.startswith(b"LOCAL_RANK=") for e in environ):
            pids.append(int(proc.name))
    return pids


def test_killed_rank_restarts_and_resumes_to_the_same_losses(data, tmp_path):
    """4 gloo ranks (tp2 x dp2) with one restart allowed; rank 2 is SIGKILLed after the step-4
    checkpoint; torchrun restarts the group, which resumes from that checkpoint by itself."""
    steps = ["train.max_steps=12", "train.save_interval=4", "parallel.tp=2"]
    assert main(train_args(data, tmp_path / "straight", *steps, "--nproc", "4")) == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "megaloom", *train_args(data, out, *steps, "--nproc", "4",
                                                             "--max-restarts", "1")]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = None
    deadline = time.monotonic() + 120
    while run.poll() is None and time.monotonic() < deadline and killed is None:
        latest = out / "checkpoints" / "latest"
        if latest.is_file() and latest.read_text().strip() == "step_00000004":
            for pid in _worker_pids(out, 2):
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.005)
    _, err = run.communicate(timeout=300)
    assert killed is not None, "the run ended before a rank could be killed"
    assert run.returncode == 0, err.decode()[-3000:]
    assert b"SIGKILL" in err or b"Signals.SIGKILL" in err or b"-9" in err
    want = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    got = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(want, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]


def test_crash_while_writing_shards_keeps_the_last_checkpoint(data, tmp_path):
    """SIGKILL in the middle of writing a shard file: the previous checkpoint stays `latest`
    and loadable, and the next run removes the torn temporary and resumes from it."""
    out = tmp_path / "run"
    assert main(train_args(data, out, "train.max_steps=2")) == 0
    script = (
        "import os, signal, sys\n"
        "from megaloom.checkpoint import shards\n"
        "from megaloom.cli import main\n"
        "def torn(self, path):\n"
        "    path.write_bytes(b'partial shard')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "shards.ShardWriter.write = torn\n"
        "sys.exit(main(sys.argv[1:]))\n")
    killed = subprocess.run([sys.executable, "-c", script,
                             *train_args(data, out, "train.max_steps=3")], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    root = out / "checkpoints"
    assert (root / ".step_00000003.tmp").is_dir()
    assert find_latest(out).name == "step_00000002"
    load_model(out)
    assert main(train_args(data, out, "train.max_steps=3")) == 0
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002",
                                                      "step_00000003"]


def test_hung_rank_fails_the_run_within_the_timeout_naming_the_rank(data, tmp_path):
    out = tmp_path / "hung"
    command = [sys.executable, "-m", "megaloom", *train_args(
        data, out, "train.max_steps=100000", "train.save_interval=2", "parallel.pp=2",
        "parallel.timeout_s=3", "--nproc", "2")]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stopped = []
    deadline = time.monotonic() + 120
    while not stopped and run.poll() is None and time.monotonic() < deadline:
        if (out / "checkpoints" / "latest").is_file():
            stopped = _worker_pids(out, 1)
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)  # alive, but never answers a collective again
        time.sleep(0.005)
    stopped_at = time.monotonic()
    while _worker_pids(out, 0) and time.monotonic() - stopped_at < 90:
        time.sleep(0.1)  # rank 0 gives up on its stopped peer after parallel.timeout_s
    waited = time.monotonic() - stopped_at
    for pid in stopped:  # a stopped process cannot act on torchrun's SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, err = run.communicate(timeout=120)
    assert stopped and run.returncode != 0
    assert waited < 60, (f"rank 0 waited {waited:.0f}s for a peer that hung; torchrun's "
                         f"stderr ends: {err.decode()[-3000:]}")
    assert b"rank 0 (tp 0, pp 0, dp 0): a collective with its peers failed" in err
    assert b"parallel.timeout_s=3" in err


def readme_two_node_commands() -> list[list[str]]:
    """The README's two-node example: one torchrun command per node."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    lines = [line.strip() for line in readme.splitlines()
             if line.strip().startswith("torchrun --nnodes 2 --node-rank")]
    assert len(lines) == 2, "README.md should show the two node commands"
    return [shlex.split(line.split("#")[0]) for line in lines]


def test_two_nodes_on_localhost_match_the_single_process(data, tmp_path):
    """Two torchrun invocations (2 processes each) meet by c10d rendezvous on 127.0.0.1, as
    the README shows, and train to the single-process losses."""
    assert main(train_args(data, tmp_path / "one")) == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "two-nodes"
    runs = []
    for command in readme_two_node_commands():
        command = [part.replace("127.0.0.1:29500", f"127.0.0.1:{port}") for part in command]
        runs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *command[1:],
             *train_args(data, out)[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors[0].decode()[-2000:]
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
