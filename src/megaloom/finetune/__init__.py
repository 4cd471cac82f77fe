"""Fine-tuning: LoRA adapters, the `megaloom finetune` run set-up and its end-of-run report."""
