"""Shared pytest setup: import the top-level modules, cap torch threads (CI has 2 cores)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# OMP_NUM_THREADS, when set, wins (a busy machine runs faster with 1 thread); else at most 2.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
