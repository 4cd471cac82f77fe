"""The user's path end to end through the CLI: a HF Llama with its tokenizer -> `preprocess`
with that tokenizer -> `train model.init_from=hf:DIR` -> `convert megaloom-to-hf` -> the run's
final weights load in `transformers` with the same logits and tokenizer."""

import json

import torch
from hf_reference import hf_config, randomize_
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from megaloom.cli import main
from megaloom.data.tokenizer import train_bpe
from megaloom.loading import load_model


def test_finetune_from_hf_dir_and_export(tmp_path, caplog):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(
        json.dumps({"text": f"Doc {i}: the quick brown fox jumps over the lazy dog. " * 3}) + "\n"
        for i in range(60)))
    train_bpe([corpus], 300, tmp_path / "bpe.json", special_tokens=["<s>", "</s>"],
              min_frequency=1, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "bpe.json"),
                                        bos_token="<s>", eos_token="</s>")
    config = hf_config("llama-gqa-untied")
    config.vocab_size = len(tokenizer)
    original = randomize_(AutoModelForCausalLM.from_config(config), seed=11)
    original.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")

    prefix = tmp_path / "data" / "corpus"
    assert main(["preprocess", "--input", str(corpus), "--output-prefix", str(prefix),
                 "--tokenizer", str(tmp_path / "hf"), "--append-eod", "--no-progress"]) == 0
    assert main(["train", f"model.init_from=hf:{tmp_path / 'hf'}", "model.num_layers=7",
                 f"data.prefixes=[{prefix}_text_document]", "data.split=80,20,0",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=3", "train.lr=1e-2",
                 "train.warmup_steps=0", "train.micro_batch_size=2", "train.global_batch_size=2",
                 "train.eval_interval=3", "train.eval_iters=1", "train.save_interval=3",
                 "--samples", "0", "--out", str(tmp_path / "run")]) == 0
    # the checkpoint's shape won, and the one field the user set differently is named
    assert caplog.text.rstrip().endswith("ignoring the recipe's num_layers=7")
    assert main(["convert", "megaloom-to-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0

    model, run_config, _ = load_model(tmp_path / "run")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = torch.tensor([loaded_tokenizer("the lazy dog jumps")["input_ids"]])
    assert ids.tolist() == [tokenizer("the lazy dog jumps")["input_ids"]]
    with torch.no_grad():
        ours = model(ids)[..., : run_config.model.vocab_size]
        torch.testing.assert_close(ours, exported(ids).logits, atol=1e-4, rtol=0)
        assert not torch.allclose(ours, original.eval()(ids).logits, atol=1e-3)  # it trained
    assert loaded_tokenizer.eos_token == "</s>"
