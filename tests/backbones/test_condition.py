"""The text-condition machinery of difffeat/backbones/text.py: default resolution order, per-call overrides."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from difffeat.backbones import create_backbone
from difffeat.extract import FeatureExtractor


def test_default_condition_resolution_order(tmp_path, caplog) -> None:
    given = torch.full((1, 3, 16), 0.25)
    assert torch.equal(create_backbone("sd-unet-tiny", encoder_hidden_states=given).encoder_hidden_states, given)
    assert torch.equal(create_backbone("sd-unet-tiny", condition={"encoder_hidden_states": given})
                       .encoder_hidden_states, given)
    null = tmp_path / "null.safetensors"
    save_file({"prompt_embeds": torch.ones(1, 5, 16)}, str(null))  # the legacy key is read as encoder_hidden_states
    assert torch.equal(create_backbone("sd-unet-tiny", null_embedding=null).encoder_hidden_states, torch.ones(1, 5, 16))
    with caplog.at_level(logging.WARNING):
        zeros = create_backbone("sd-unet-tiny").encoder_hidden_states
    assert torch.equal(zeros, torch.zeros(1, 77, 16)) and "on zeros" in caplog.text


def test_bad_conditions_are_named(tmp_path) -> None:
    with pytest.raises(KeyError, match=r"unknown condition key\(s\) \['text_embeds'\]"):
        create_backbone("sd-unet-tiny", condition={"text_embeds": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match=r"'encoder_hidden_states' must have shape \(B, 77, 16\)"):
        create_backbone("sd-unet-tiny", encoder_hidden_states=torch.zeros(1, 3, 8))
    null = tmp_path / "null.safetensors"
    save_file({"other": torch.ones(1)}, str(null))
    with pytest.raises(KeyError, match=r"holds none of the condition keys.*found \['other'\]"):
        create_backbone("sd-unet-tiny", null_embedding=null)
    backbone = create_backbone("sd-unet-tiny")
    with pytest.raises(ValueError, match=r"'encoder_hidden_states' has batch 2, the latents 3"):
        backbone.condition(torch.zeros(2, 77, 16), 3)
    with pytest.raises(FileNotFoundError, match="not loaded from a pipeline folder"):
        backbone.encode_prompts(["a dog"])
    with pytest.raises(TypeError, match="not text-conditioned"):
        create_backbone("unet2d-tiny").encode_prompts(["a dog"])


def test_per_call_conditions_override_the_default_per_image() -> None:
    backbone = create_backbone("sd-unet-tiny")
    fe = FeatureExtractor(backbone, ["mid_block"], [100, 500])
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(1))
    together = fe(x, range(3), cond=cond)
    for i in range(3):  # row i of the batch sees condition i, whichever chunk its rows fall in
        alone = fe(x[i:i + 1], [i], cond={"encoder_hidden_states": cond[i:i + 1]})
        assert all(torch.equal(together[k][i], alone[k][0]) for k in together)
    default = fe(x, range(3))
    assert not torch.equal(default[("mid_block", 100)], together[("mid_block", 100)])


def test_prompts_need_one_per_image() -> None:
    fe = FeatureExtractor(create_backbone("sd-unet-tiny"), ["mid_block"], [100])
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="got 3 prompts for a batch of 2 images"):
        fe(x, prompts=["a", "b", "c"])
    with pytest.raises(ValueError, match="got a single string for a batch of 2 images"):
        fe(x, prompts="a dog")
    with pytest.raises(ValueError, match="either prompts or cond"):
        fe(x, cond=torch.zeros(1, 77, 16), prompts=["a", "b"])
