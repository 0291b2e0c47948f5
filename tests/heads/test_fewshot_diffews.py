"""DiffewS: the fine-tuned model, its loss and its module."""

from __future__ import annotations

import pytest
import torch

from heads.fewshot_diffews import DiffewS, mask_loss


def test_diffews_predicts_one_mask_per_episode_and_checks_its_input() -> None:
    model = DiffewS("sd-unet-scenes")
    support = torch.rand(2, 3, 3, 64, 64) * 2 - 1  # 2 episodes, 3 shots
    masks = torch.zeros(2, 3, 64, 64, dtype=torch.bool)
    masks[..., 10:30, 10:30] = True
    logits = model(support, masks, torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 64, 64) and not model.fusion.bank
    loss = mask_loss(logits, masks[:, 0])
    loss.backward()
    assert model.backbone.model.conv_in.support.weight.grad is not None  # the support path trains
    with pytest.raises(ValueError, match="must be"):
        model(support, masks[:, :, :32], torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="query"):
        model(support, masks, torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="1 channels .* expects 3"):
        model(support[:, :, :1], masks, torch.rand(2, 1, 64, 64))
