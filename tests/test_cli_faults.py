"""Inputs a new user tried that used to end in a traceback or run anyway: each is now one line
on stderr and exit status 2, before any model loads or any process starts."""

import subprocess
import sys
import time

import pytest

from megaloom.cli import main


def write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


CASES = [  # (command line with {tmp} for a folder, files to create, words in the error)
    ("train --out {tmp}/run parallel.tp=2 --nproc 3", {}, "is not a multiple of parallel.tp"),
    ("train --out {tmp}/run train.micro_batch_size=8 train.global_batch_size=8 --nproc 2", {},
     "micro_batch_size x dp"),
    ("train --out {tmp}/run model.num_heads=4 parallel.tp=3 --nproc 3", {},
     "not divisible by parallel.tp=3"),
    ("train --out {tmp}/run train.lr=inf", {}, "train.lr: must be finite"),
    ("train {tmp}/empty.yaml", {"empty.yaml": ""}, "is empty"),
    ("train {tmp}/binary.yaml", {"binary.yaml": bytes(range(256))}, "not a YAML text file"),
    ("tokenizer train {tmp}/empty.txt --vocab-size 300 --output {tmp}/t.json",
     {"empty.txt": ""}, "no text to train on"),
    ("tokenizer train {tmp}/a.txt --vocab-size 1000000000 --output {tmp}/t.json",
     {"a.txt": "some text\n"}, "too large"),
    ("generate nowhere --file {tmp}/p.txt", {"p.txt": b"\xff\xfe prompt\n"}, "not UTF-8"),
    ("generate nowhere hi --seed 123456789012345678901234", {}, "invalid seed"),
    ("generate nowhere hi --db postgresql://u:p@host:notaport/db", {}, "bad database URL"),
]


@pytest.mark.parametrize("command,files,expected", CASES, ids=[c[2] for c in CASES])
def test_one_line_and_status_2(tmp_path, capfd, command, files, expected):
    for name, content in files.items():
        write(tmp_path / name, content)
    code = main(command.format(tmp=tmp_path).split())
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and len(errors) == 1 and expected in errors[0], err[-2000:]
    assert "Traceback" not in err


def test_tokenizer_output_may_name_a_directory(tmp_path):
    write(tmp_path / "a.txt", "some text, some more text\n")
    (tmp_path / "out").mkdir()
    assert main(["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab-size", "300",
                 "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_a_full_disk_is_one_line(tmp_path, capfd, monkeypatch):
    """A write that fails for lack of space, wherever it happens, says "disk full"."""
    import errno

    from megaloom.data.tokenizer import Tokenizer

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Tokenizer, "save", full)
    write(tmp_path / "a.txt", "some text, some more text\n")
    assert main(["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab-size", "300",
                 "--output", str(tmp_path / "t.json")]) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "error: disk full: [Errno 28] No space left on device" in lines[0]
    assert "Traceback" not in err


def test_an_exit_stuck_after_a_peer_failure_is_cut_with_where_it_hung():
    """After a peer failure the CLI arms a watchdog: an exit that blocks (as gloo's threads
    can on a hung peer) ends within the grace period, with the stuck stack on stderr."""
    script = ("import threading\n"
              "from megaloom.cli import exit_within\n"
              "exit_within(1)\n"
              "threading.Event().wait()  # an exit that never finishes\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 1 and time.monotonic() - started < 30
    assert b"Timeout" in done.stderr and b"threading" in done.stderr
