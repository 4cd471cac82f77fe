"""`save_checkpoint` across ranks: a failure on one rank reaches every rank, and the rank the
others waited for does not wait for a peer that hangs longer than the timeout."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from harness import spawn

from megaloom.config import Config
from megaloom.errors import CheckpointError
from megaloom.parallel.topology import is_collective_failure
from megaloom.train import checkpoint


def _one_chunk_each(rank: int):
    def add_chunks(writer):
        writer.add("w", (2, 3), ((rank, rank + 1), (0, 3)), torch.full((1, 3), float(rank)))
    return add_chunks


def _failing_rank_is_named_everywhere(rank: int, world: int, out: str) -> None:
    def add_chunks(writer):
        if rank == 1:
            raise OSError(28, "No space left on device")
        _one_chunk_each(rank)(writer)

    with pytest.raises(CheckpointError, match=r"failed: rank 1: .*No space left on device"):
        checkpoint.save_checkpoint(out, 1, add_chunks, Config(), None, {}, 0,
                                   timeout=timedelta(seconds=30))
    assert not (Path(out) / "checkpoints" / "latest").exists()


def test_a_failed_shard_is_reported_on_every_rank_and_nothing_is_committed(tmp_path):
    spawn(_failing_rank_is_named_everywhere, 2, str(tmp_path))


def _late_peer(rank: int, world: int, out: str) -> None:
    if rank == 1:  # answers the outcome broadcast 4 s late, then the job goes on
        share = checkpoint._share_failure

        def late(*args):
            time.sleep(4)
            return share(*args)

        checkpoint._share_failure = late
        assert checkpoint.save_checkpoint(out, 1, _one_chunk_each(rank), Config(), None, {}, 0)
        return
    started = time.monotonic()
    with pytest.raises(RuntimeError) as raised:
        checkpoint.save_checkpoint(out, 1, _one_chunk_each(rank), Config(), None, {}, 0,
                                   timeout=timedelta(seconds=1))
    assert time.monotonic() - started < 4
    assert is_collective_failure(raised.value)
    assert (Path(out) / "checkpoints" / "latest").read_text().strip() == "step_00000001"


def test_rank_zero_waits_at_most_the_timeout_for_peers_once_the_save_is_committed(tmp_path):
    spawn(_late_peer, 2, str(tmp_path))
