"""Which device a Relay process computes on: what torch sees, never what Ray's GPU ids alone suggest (a test
cluster declares fake GPUs; a node may list a GPU whose driver is missing)."""
from __future__ import annotations


def torch_device() -> str:
    """'cuda' when torch finds a CUDA device in this process, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
