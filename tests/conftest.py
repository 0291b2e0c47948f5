"""Shared fixtures: tiny random-init backbones (no weights are downloaded, ever)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits_images() -> torch.Tensor:
    from difffeat.data import load_digits_split

    return load_digits_split("train", 16)[0][:12]
