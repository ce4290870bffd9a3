"""Built-in method plugins, one module per family (LoRA, LoRA variants, patches, sparse fine-tuning,
vectors, prompts, trainable tokens). Each imports only ``import adapterfmt as af``, as a third party would."""
