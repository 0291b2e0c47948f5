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


def _logits_and_target(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(3, 8, 8, generator=gen) > 0.6
    return torch.randn(3, 8, 8, generator=gen) * 3, target


def test_mask_loss_is_smp_dice_plus_soft_bce() -> None:
    import segmentation_models_pytorch as smp

    logits, target = _logits_and_target()
    expected = (smp.losses.DiceLoss(mode="binary", from_logits=True)(logits, target.float())
                + smp.losses.SoftBCEWithLogitsLoss()(logits, target.float()))
    torch.testing.assert_close(mask_loss(logits, target), expected)


def test_mask_loss_leaves_ignored_pixels_out() -> None:
    import segmentation_models_pytorch as smp

    logits, target = _logits_and_target(1)
    ignore = torch.zeros_like(target)
    ignore[:, 6:] = True  # PASCAL's boundary band, say
    target &= ~ignore
    logits.requires_grad_(True)
    loss = mask_loss(logits, target, ignore)
    loss.backward()
    assert torch.count_nonzero(logits.grad[ignore]) == 0  # nothing learnt from ignored pixels
    # the same as the loss over the valid pixels alone: not diluted by the ignored ones
    valid_logits = logits.detach()[:, :6].reshape(3, 1, -1)
    valid_target = target[:, :6].reshape(3, 1, -1).float()
    expected = (smp.losses.DiceLoss(mode="binary", from_logits=True)(valid_logits, valid_target)
                + smp.losses.SoftBCEWithLogitsLoss()(valid_logits, valid_target))
    torch.testing.assert_close(loss.detach(), expected)


def test_diffews_module_trains_on_the_valid_query_pixels(monkeypatch) -> None:
    from heads.fewshot_diffews import DiffewSModule

    module = DiffewSModule("sd-unet-scenes")
    logits, target = _logits_and_target(2)
    ignore = torch.zeros_like(target)
    ignore[:, :, :2] = True
    target &= ~ignore

    class Fixed(torch.nn.Module):  # stands in for DiffewS: the loss, not the network, is under test
        def forward(self, *_):
            return logits

    monkeypatch.setattr(module, "model", Fixed())
    batch = {"support": None, "support_mask": None, "query": None, "query_mask": target, "query_ignore": ignore}
    torch.testing.assert_close(module.training_step(batch, 0), mask_loss(logits, target, ignore))


def test_the_attn2_scenes_unet_has_self_attention_at_half_resolution() -> None:
    from diffusers.models.attention_processor import Attention

    from heads.fewshot_diffews import DiffewS

    grids = {}
    model = DiffewS("sd-unet-scenes-attn2")
    hooks = [m.register_forward_hook(lambda _m, args, _o, n=n: grids.setdefault(n, args[0].shape[1]))
             for n, m in model.backbone.model.named_modules() if isinstance(m, Attention) and n.endswith("attn1")]
    support = torch.rand(1, 1, 3, 64, 64) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    mask[..., 8:40, 8:40] = True
    with torch.no_grad():
        out = model(support, mask, torch.rand(1, 3, 64, 64) * 2 - 1)
    for h in hooks:
        h.remove()
    assert out.shape == (1, 64, 64) and max(grids.values()) == 32 * 32  # 32×32 of a 64×64 scene


def _episode(size: int = 32, shots: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    support = torch.rand(2, shots, 3, size, size, generator=gen) * 2 - 1
    masks = torch.zeros(2, shots, size, size, dtype=torch.bool)
    masks[..., 4:12, 4:12] = True
    return support, masks, torch.rand(2, 3, size, size, generator=gen) * 2 - 1


def test_query_only_model_never_sees_the_support() -> None:
    torch.manual_seed(0)
    model = DiffewS("sd-unet-scenes", query_only=True).eval()
    support, masks, query = _episode()
    with torch.no_grad():
        own = model(support, masks, query)
        other = model(support.flip(0), masks.flip(0), query)
        plain = model.backbone(query, torch.zeros(2, dtype=torch.long))[:, 0]
    torch.testing.assert_close(own, other, rtol=0, atol=0)
    torch.testing.assert_close(own, plain, rtol=0, atol=0)
    torch.manual_seed(0)
    full = DiffewS("sd-unet-scenes").eval()
    with torch.no_grad():
        assert not torch.equal(full(support, masks, query), full(support.flip(0), masks.flip(0), query))


def test_query_only_weights_are_refused_by_a_support_model() -> None:
    query_only = DiffewS("sd-unet-scenes", query_only=True).state_dict()
    with pytest.raises(ValueError, match="query-only .*never trained"):
        DiffewS("sd-unet-scenes").load_state_dict(query_only)
    with pytest.raises(ValueError, match="support-conditioned, but the model is query-only"):
        DiffewS("sd-unet-scenes", query_only=True).load_state_dict(DiffewS("sd-unet-scenes").state_dict())
    DiffewS("sd-unet-scenes", query_only=True).load_state_dict(query_only)  # same kind loads


def test_empty_support_masks_are_refused_unless_the_control_asks() -> None:
    model = DiffewS("sd-unet-scenes").eval()
    support, masks, query = _episode()
    masks[1] = False
    with pytest.raises(ValueError, match=r"\[0\] are empty"):
        model(support, masks, query)
    with torch.no_grad():
        assert model(support, masks, query, allow_empty_support=True).shape == (2, 32, 32)


def test_module_logs_the_loss_of_positive_pair_episodes(monkeypatch) -> None:
    from heads.fewshot_diffews import DiffewSModule

    module = DiffewSModule("sd-unet-scenes")
    logits, target = _logits_and_target(3)
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.__setitem__(name, value))

    class Fixed(torch.nn.Module):
        def forward(self, *_):
            return logits

    monkeypatch.setattr(module, "model", Fixed())
    batch = {"support": None, "support_mask": None, "query": None, "query_mask": target,
             "pair": torch.tensor([0, 0, -1]), "negative": torch.tensor([False, True, False])}
    module.training_step(batch, 0)
    torch.testing.assert_close(logged["train/pair_loss"], mask_loss(logits[:1], target[:1]))
