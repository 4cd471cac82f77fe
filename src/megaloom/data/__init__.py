"""Data pipeline: tokenizer (`tokenizer`), raw documents (`documents`), Megatron `.bin`/`.idx`
(`indexed`), preprocessing (`preprocess`), GPT samples and splits (`gpt_dataset`), blending
(`blend`), cached index arrays (`index_cache`) and the embedded default corpus
(`default_corpus`). Nothing here imports torch."""
