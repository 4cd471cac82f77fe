"""One run per output directory: a second `megaloom train`/`finetune` into a busy `--out`
refuses with the holder's PID; a killed holder leaves no stale lock; the ranks a launcher
starts under its lock do not take it again."""

import os
import signal
import subprocess
import sys

import pytest

from megaloom.cli import main
from megaloom.errors import MegaloomError
from megaloom.utils.run_lock import HELD_BY_PARENT, hold_output_dir

HOLD = """
import sys, time
from megaloom.utils.run_lock import hold_output_dir
with hold_output_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_second_run_into_a_busy_directory_names_the_holder(tmp_path, holder, capfd):
    code = main(["train", "--out", str(tmp_path / "run"), "train.max_steps=1"])
    err = capfd.readouterr().err
    assert code == 2 and f"is in use by another run (PID {holder.pid})" in err, err
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    assert main(["finetune", str(tmp_path / "base"), "--task", "sft", "--data",
                 str(tmp_path / "sft.jsonl"), "--out", str(tmp_path / "run")]) == 2
    assert f"is in use by another run (PID {holder.pid})" in capfd.readouterr().err
    with pytest.raises(MegaloomError, match=f"PID {holder.pid}"), \
            hold_output_dir(tmp_path / "run"):
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holder):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / ".megaloom.lock").read_text().strip() == str(holder.pid)
    with hold_output_dir(tmp_path / "run"):
        assert (tmp_path / "run" / ".megaloom.lock").read_text().strip() == str(os.getpid())
    with hold_output_dir(tmp_path / "run"):  # released at the end of the block
        pass


def test_ranks_under_the_launchers_lock_do_not_take_it_again(tmp_path):
    with hold_output_dir(tmp_path / "run"):
        assert os.environ[HELD_BY_PARENT] == str((tmp_path / "run").resolve())
        child = subprocess.run([sys.executable, "-c", HOLD.replace("120", "0"),
                                str(tmp_path / "run")], capture_output=True, text=True)
        assert child.returncode == 0 and child.stdout.strip() == "held", child.stderr
        env = {k: v for k, v in os.environ.items() if k != HELD_BY_PARENT}
        stranger = subprocess.run([sys.executable, "-c", HOLD.replace("120", "0"),
                                   str(tmp_path / "run")], capture_output=True, text=True,
                                  env=env)
        assert stranger.returncode != 0 and "is in use by another run" in stranger.stderr
    assert HELD_BY_PARENT not in os.environ


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError), hold_output_dir(out):
        raise RuntimeError("bad data")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    with hold_output_dir(existing):
        (existing / "metrics.jsonl").write_text("{}\n")
    assert (existing / "metrics.jsonl").is_file()
