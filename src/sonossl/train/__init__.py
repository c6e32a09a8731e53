"""Training: one loop (checkpoints, resume, DDP, AMP, progress, dvclive) shared by pretraining and fine-tuning."""
