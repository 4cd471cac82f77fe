"""Tensor-parallel inference (tp=2, gloo): the lockstep engine generates exactly what the
single-process engine generates, for both flavours, greedy and seeded sampling, mixed prompt
lengths with continuous batching, logprobs and echo; bad layouts are refused."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaloom.cli import main
from megaloom.errors import MegaloomError
from megaloom.infer import Engine, Request, SamplingParams
from megaloom.infer.tensor_parallel import (
    FullLogitsGPT,
    TensorParallelEngine,
    check_tensor_parallel,
    drive,
)
from megaloom.parallel.parallelize import parallelize
from megaloom.parallel.topology import Topology

sys.path.append(str(Path(__file__).parents[1] / "distributed"))
from harness import spawn  # noqa: E402

PROMPTS = [[5, 17, 3], [40, 2, 9, 11, 30, 7, 1], [8], [100, 101, 102, 103]]
UNSEEDED = SamplingParams(max_tokens=4, temperature=1.0)  # rank 0 draws a seed for all ranks


def _requests() -> list[Request]:
    greedy = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, echo=True)
    sampled = SamplingParams(max_tokens=6, temperature=0.9, top_k=40, seed=5, n=2,
                             repetition_penalty=1.2)
    params = [greedy, sampled, greedy, sampled]
    return [Request(p, q, request_id=f"r{i}") for i, (p, q) in enumerate(zip(PROMPTS, params,
                                                                                strict=True))]


def _parity(rank: int, world: int, model) -> None:
    reference = Engine(copy.deepcopy(model), max_batch_size=3)
    want = reference.generate(_requests()) + [_cancel_one(reference)]
    topo = Topology.build(tp=world)
    engine = TensorParallelEngine(FullLogitsGPT(parallelize(model, topo), topo.tp_axis), topo,
                                  max_batch_size=3)
    got = drive(engine, lambda: [*engine.generate(_requests()), _cancel_one(engine),
                                 *engine.generate([Request(PROMPTS[0], UNSEEDED)])])
    if rank != 0:
        assert got is None
        return
    assert len(got.pop().completions[0].token_ids) == UNSEEDED.max_tokens  # still in lockstep
    for g, w in zip(got, want, strict=True):
        assert [c.token_ids for c in g.completions] == [c.token_ids for c in w.completions]
        if w.prompt_logprobs is not None:
            assert [lp and lp.token_id for lp in g.prompt_logprobs] == \
                   [lp and lp.token_id for lp in w.prompt_logprobs]
            got_lp = [lp.logprob for lp in g.completions[0].logprobs]
            want_lp = [lp.logprob for lp in w.completions[0].logprobs]
            torch.testing.assert_close(got_lp, want_lp, rtol=1e-4, atol=1e-4)


def _cancel_one(engine: Engine):
    """Cancel one of two running requests mid-way (tensor-parallel followers must drop it
    too); return the other's output."""
    requests = _requests()
    keep, drop = engine.add_request(requests[0]), engine.add_request(requests[1])
    engine.step()
    drop.cancel()
    while not keep.finished:
        engine.step()
    assert drop.output.completions[0].finish_reason == "cancelled"
    return keep.output


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tp2_generation_matches_single_process(make_model, arch):
    spawn(_parity, 2, make_model(arch))  # num_heads=4, num_kv_heads=2: GQA under llama


def test_pipeline_or_data_parallel_layout_is_refused():
    topo = Topology.build()
    check_tensor_parallel(topo)
    with pytest.raises(MegaloomError, match="pp=2"):
        check_tensor_parallel(dataclasses.replace(topo, pp=2))


def test_cli_nproc2_prints_and_writes_what_one_process_does(checkpoint, tmp_path, capsys):
    args = ["generate", checkpoint, "The quick", "Pack my box with", "--max-tokens", "6",
            "--ignore-eos", "--device", "cpu"]
    greedy, sampled = [*args, "--greedy"], [*args, "--seed", "3", "--n", "2", "--top-k", "30"]
    assert main(greedy) == 0
    want_terminal = capsys.readouterr().out
    assert main([*sampled, "--output", str(tmp_path / "one.jsonl")]) == 0
    run = [sys.executable, "-m", "megaloom"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    terminal = subprocess.run([*run, *greedy, "--nproc", "2"], capture_output=True, text=True,
                              env=env, timeout=120)
    assert terminal.returncode == 0, terminal.stderr
    assert terminal.stdout == want_terminal
    jsonl = subprocess.run([*run, *sampled, "--nproc", "2", "--output",
                            str(tmp_path / "two.jsonl")], capture_output=True, text=True,
                           env=env, timeout=120)
    assert jsonl.returncode == 0, jsonl.stderr

    def records(name):
        lines = (tmp_path / name).read_text(encoding="utf-8").splitlines()
        return [(r["prompt"], r["draft_index"], r["completion"])
                for r in map(json.loads, lines)]

    assert records("two.jsonl") == records("one.jsonl")
    assert len(records("two.jsonl")) == 4
