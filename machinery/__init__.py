"""Run machinery a first read can skip: a training run's bookkeeping (runs.py: validation, checkpoints and exact
resume, logs, signals), sample.py's (sample_runs.py), config dataclasses as command-line flags (flags.py), the
distributed backends (backends.py: DDP / FSDP2 / torch_xla), the Inception-v3 network for FID (inception.py) and the
fast precision/recall kernel (metrics_fast.py)."""
