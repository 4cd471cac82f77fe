"""A LoRA run as a PEFT adapter: `adapter_config.json` + `adapter_model.safetensors` that
`peft.PeftModel.from_pretrained` loads onto the exported base model (written beside it, in
`base/`, from the run's own frozen weights), with logits equal to megaloom's.

Names follow `transformers`: GPT-2's fused `c_attn` (Conv1D, so `fan_in_fan_out`) takes the
qkv adapter with `B`'s rows reordered from megaloom's per-group layout to q, k, v; Llama's
separate `q_proj`/`k_proj`/`v_proj` share `A` and take their rows of `B`. A classifier's head
is saved as PEFT's `modules_to_save` (`score`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from megaloom.config import GATED_ACTIVATIONS, Config
from megaloom.errors import MegaloomError
from megaloom.finetune.lora import target_names
from megaloom.interop.weights import split_qkv
from megaloom.utils.io import atomic_dir

PREFIX = "base_model.model."
GPT2_MODULES = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.up": "mlp.c_fc",
                "mlp.down": "mlp.c_proj"}
LLAMA_MODULES = {"attn.proj": "self_attn.o_proj", "mlp.up": "mlp.up_proj",
                 "mlp.gate": "mlp.gate_proj", "mlp.down": "mlp.down_proj"}


def hf_adapters(module: str, a: torch.Tensor, b: torch.Tensor, config: Config
                ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(HF module name, A, B) for megaloom module `layers.i.<path>`'s adapter."""
    model = config.model
    _, index, path = module.split(".", 2)
    if model.arch == "gpt2":
        if path == "attn.qkv":
            b = torch.cat(split_qkv(b, model))
        yield f"transformer.h.{index}.{GPT2_MODULES[path]}", a, b
        return
    if path == "attn.qkv":
        for kind, rows in zip("qkv", split_qkv(b, model), strict=True):
            yield f"model.layers.{index}.self_attn.{kind}_proj", a, rows
        return
    yield f"model.layers.{index}.{LLAMA_MODULES[path]}", a, b


def export_peft(spec: str | Path, out_dir: str | Path) -> Path:
    """Write the adapter of LoRA run `spec` to `out_dir` and its base model to `out_dir/base`."""
    from megaloom.checkpoint.reader import LazyState, open_checkpoint
    from megaloom.interop.hf import _empty_output, export_hf

    checkpoint = open_checkpoint(spec)
    config = checkpoint.config
    lora = config.task.lora
    if lora.rank == 0:
        raise MegaloomError(f"{checkpoint.directory} was not trained with LoRA "
                            "(task.lora.rank=0); export it with megaloom-to-hf")
    out_dir = _empty_output(out_dir)
    store = checkpoint.store
    tensors, modules = {}, []
    for module in target_names(lora, config.model.num_layers,
                               config.model.activation in GATED_ACTIVATIONS):
        a, b = store.read(f"{module}.lora_A"), store.read(f"{module}.lora_B")
        for name, hf_a, hf_b in hf_adapters(module, a, b, config):
            tensors[f"{PREFIX}{name}.lora_A.weight"] = hf_a.clone()  # q, k, v share A
            tensors[f"{PREFIX}{name}.lora_B.weight"] = hf_b.clone()
            modules.append(name)
    task_type = "CAUSAL_LM"
    if config.model.num_labels:
        tensors[f"{PREFIX}score.weight"] = store.read("lm_head.weight").contiguous()
        task_type = "SEQ_CLS"
    adapter = {"peft_type": "LORA", "task_type": task_type, "r": lora.rank,
               "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
               "target_modules": modules, "fan_in_fan_out": config.model.arch == "gpt2",
               "bias": "none", "modules_to_save": ["score"] if config.model.num_labels else None,
               "base_model_name_or_path": "base", "inference_mode": True,
               "init_lora_weights": True}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(adapter, indent=2) + "\n")
        export_hf(LazyState(checkpoint, merge=False), config, tmp / "base",
                  tokenizer_path=checkpoint.tokenizer)
    return out_dir
