"""Store keys are complete: every setting that changes a feature changes the key and is named on refusal."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from difffeat.backbones import create_backbone
from difffeat.digest import tensor_digest
from difffeat.extract import FeatureExtractor
from difffeat.store import FeatureStore, StoreError, atomic_write, remove_stale_temps


def _spec(extractor: FeatureExtractor) -> dict:
    return {**extractor.spec(), "dataset": "d"}


def _sd(**kw) -> FeatureExtractor:
    return FeatureExtractor(create_backbone("sd-unet-tiny", **kw.pop("bb", {})), ["mid_block"], [10], **kw)


def _selfcond() -> FeatureExtractor:
    from difffeat.selfcond import SelfConditioning

    backbone = create_backbone("unet2d-tiny")
    backbone.set_self_conditioning(SelfConditioning())
    return FeatureExtractor(backbone, ["mid_block"], [10])


CASES = {
    "prompt": (lambda: _sd(bb={"encoder_hidden_states": torch.zeros(1, 77, 16)}),
               lambda: _sd(bb={"encoder_hidden_states": torch.ones(1, 77, 16)}),
               "backbone.condition.encoder_hidden_states"),
    "class label": (lambda: FeatureExtractor(create_backbone("dit-tiny", class_label=1), ["pos_embed"], [10]),
                    lambda: FeatureExtractor(create_backbone("dit-tiny", class_label=2), ["pos_embed"], [10]),
                    "backbone.condition.class_label"),
    "schedule": (lambda: FeatureExtractor(create_backbone("unet2d-tiny"), ["mid_block"], [10]),
                 lambda: FeatureExtractor(create_backbone("unet2d-tiny", scheduler={"beta_schedule":
                                                                                    "squaredcos_cap_v2"}),
                                          ["mid_block"], [10]),
                 "backbone.schedule.alphas_cumprod"),
    "dtype": (lambda: FeatureExtractor(create_backbone("unet2d-tiny"), ["mid_block"], [10]),
              lambda: FeatureExtractor(create_backbone("unet2d-tiny"), ["mid_block"], [10], dtype=torch.float64),
              "backbone.dtype"),
    "self-conditioning": (lambda: FeatureExtractor(create_backbone("unet2d-tiny"), ["mid_block"], [10]),
                          _selfcond, "backbone.plugins"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_feature_changing_setting_changes_the_key_and_is_named(case, tmp_path) -> None:
    make_a, make_b, field = CASES[case]
    a, b = _spec(make_a()), _spec(make_b())
    FeatureStore(tmp_path, a, num_samples=4, shard_size=2)
    with pytest.raises(StoreError, match=rf"differing: \[.*'{field}"):
        FeatureStore(tmp_path, b, num_samples=4, shard_size=2)


def test_vae_scaling_is_in_the_key() -> None:
    from diffusers import AutoencoderKL

    def vae(scaling: float) -> AutoencoderKL:
        torch.manual_seed(0)
        return AutoencoderKL(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                             up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
                             scaling_factor=scaling)

    a = create_backbone("sd-unet-tiny", vae=vae(0.18215), encoder_hidden_states=torch.zeros(1, 1, 16)).spec()
    b = create_backbone("sd-unet-tiny", vae=vae(0.13025), encoder_hidden_states=torch.zeros(1, 1, 16)).spec()
    assert a["vae"]["weights"] == b["vae"]["weights"] and a["vae"]["scaling_factor"] != b["vae"]["scaling_factor"]


def test_the_same_settings_give_the_same_key() -> None:
    assert _spec(_sd(bb={"encoder_hidden_states": torch.ones(1, 3, 16)})) == _spec(
        _sd(bb={"encoder_hidden_states": torch.ones(1, 3, 16)}))


def test_digest_of_a_zero_dim_buffer() -> None:
    module = nn.Linear(2, 2)
    module.register_buffer("step", torch.tensor(3))
    before = tensor_digest(module.state_dict())
    module.step += 1
    assert tensor_digest(module.state_dict()) != before
    assert tensor_digest(torch.tensor(1.5)) != tensor_digest(torch.tensor([1.5]))  # shape is part of it


def test_only_provably_stale_temp_files_are_removed(tmp_path) -> None:
    atomic_write(tmp_path / "x", b"1")  # learn the naming scheme from the writer itself
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        from difffeat.store import _HOST

        names = {"dead": f".shard.tmp-{_HOST}-{dead}-ab12", "live": f".shard.tmp-{_HOST}-{live.pid}-ab12",
                 "other host": f".shard.tmp-elsewhere-{dead}-ab12"}
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        removed = remove_stale_temps(tmp_path)
        assert [p.name for p in removed] == [names["dead"]]
        assert (tmp_path / names["live"]).exists() and (tmp_path / names["other host"]).exists()
    finally:
        live.kill()


def test_a_folder_that_is_not_a_store_is_refused(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore(tmp_path, {"a": 1}, 4, 2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"hello": 1}')
    with pytest.raises(StoreError, match="not a feature-store manifest"):
        FeatureStore.open(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        FeatureStore.open(tmp_path)
