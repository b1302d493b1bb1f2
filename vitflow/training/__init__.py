"""Fine-tuning: the training loop (`loop`), the strategy registry (`strategies`), torch distributed (`distributed`)."""
