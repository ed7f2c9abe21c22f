"""Test-wide settings."""

import torch

# The tests run many tiny tensors on a 2-core machine: one intra-op thread is fastest there, and
# multi-threaded LAPACK kernels (float64 SVDs) spin against each other when the cores are busy
# (a 256×2304 float64 SVD measured 4 s on 2 threads, 0.2 s on 1).
torch.set_num_threads(1)
