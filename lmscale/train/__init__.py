"""Training: what runs on each rank. Only ``engine`` imports DeepSpeed; nothing here imports Ray."""
