"""What a training process loads besides the model: every rank pays for each module it imports,
and no layout divides that cost (`benchmarks/parallel_memory.py`)."""

import subprocess
import sys

STEP_AND_PARSER = """
import sys, torch
from megaloom.config import ModelConfig, TrainConfig
from megaloom.model import GPT
from megaloom.parallel.data_parallel import ParallelOptimizer
from megaloom.parallel.topology import Topology
import megaloom.cli
megaloom.cli.build_parser()
model = GPT(ModelConfig(num_layers=1, hidden_size=32, num_heads=4, vocab_size=64, seq_len=8))
optimizer = ParallelOptimizer(model, Topology.build(), TrainConfig())
from megaloom.parallel.pipeline import backward_stage
hidden = model(torch.randint(0, 64, (2, 8)))
backward_stage(hidden, torch.ones_like(hidden))  # a pipeline stage's backward
optimizer.reduce_gradients()
optimizer.clip_grad_norm(1.0)
optimizer.step()
optimizer.zero_grad()
print(sorted(m for m in ("torch._dynamo", "sympy", "sqlalchemy", "matplotlib") if m in sys.modules))
"""


def test_a_training_step_and_the_cli_load_no_compiler_database_or_plotting_modules():
    """TorchDynamo/SymPy (~45 MB, pulled in by `torch.optim.Optimizer`; SymPy alone, ~25 MB, by
    a backward given explicit gradients), SQLAlchemy (~11 MB, only for `--db`) and matplotlib
    (~25 MB, only once training has ended)."""
    out = subprocess.run([sys.executable, "-c", STEP_AND_PARSER], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
