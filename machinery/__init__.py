"""Run machinery a first read can skip: the distributed backends (DDP / FSDP2 / torch_xla), the Inception-v3
network for FID, and the fast precision/recall kernel."""
