"""The registry, the adapters' feature_info, and loading from local diffusers folders."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from safetensors.torch import save_file

from difffeat.backbones import Backbone, create_backbone, list_backbones
from difffeat.backbones.registry import resolve_local

TINY = ["unet2d-tiny", "sd-unet-tiny", "dit-tiny"]


def _probe(backbone: Backbone, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    size = backbone.latent_size
    x = torch.randn(2, backbone.latent_channels, size, size, generator=gen)
    with torch.no_grad():
        return backbone.denoise(x, torch.tensor([3, 500]))


@pytest.mark.parametrize("name", list_backbones())
def test_feature_info_matches_the_taps(name: str) -> None:
    backbone = create_backbone(name)
    info = backbone.feature_info
    assert info, "every adapter offers taps"
    assert [i.order for i in info.values()] == sorted(i.order for i in info.values())
    deepest = [n for n in info if n.count(".") <= 1][-3:]
    size = backbone.latent_size
    x = torch.randn(1, backbone.latent_channels, size, size)
    with torch.no_grad(), backbone.tap(deepest, stop_early=False) as found:
        backbone.run(x, torch.tensor([1]))
    for n in deepest:
        out = found[n]
        if info[n].kind == "map":
            assert out.shape[1] == info[n].channels
            assert out.shape[-1] * info[n].stride == size
        else:
            assert out.shape[-1] == info[n].channels
            assert out.shape[1] == info[n].grid[0] * info[n].grid[1]


@pytest.mark.parametrize("name", TINY)
def test_save_pretrained_round_trip(name: str, tmp_path) -> None:
    backbone = create_backbone(name)
    backbone.model.save_pretrained(tmp_path / "model")
    loaded = create_backbone(tmp_path / "model")
    assert type(loaded) is type(backbone)
    torch.testing.assert_close(_probe(loaded), _probe(backbone), rtol=0, atol=0)


def test_pipeline_folder_loads_scheduler_and_vae(tmp_path) -> None:
    backbone = create_backbone("sd-unet-tiny")
    folder = tmp_path / "pipe"
    backbone.model.save_pretrained(folder / "unet")
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=500)
    sched.save_pretrained(folder / "scheduler")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8],
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"], "vae": ["diffusers", "AutoencoderKL"]}))
    null = torch.randn(1, 5, 16)
    save_file({"prompt_embeds": null}, str(folder / "null_embedding.safetensors"))
    loaded = create_backbone(folder)
    assert torch.equal(loaded.encoder_hidden_states, null)
    assert loaded.schedule.num_train_timesteps == 500
    assert loaded.image_channels == 3 and loaded.image_size == 16
    latents = loaded.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert latents.shape == (2, 4, 8, 8)


def test_dit_null_class_is_the_last_embedding() -> None:
    backbone = create_backbone("dit-tiny")
    assert isinstance(backbone.model, DiTTransformer2DModel)
    assert backbone.class_label == backbone.null_class == 10
    table = backbone.model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 11  # 10 classes + the null class learned through label dropout


def test_hub_id_without_local_copy_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="someone/not-cached-model.*never downloads"):
        resolve_local("someone/not-cached-model")


def test_unknown_layer_lists_valid_names() -> None:
    backbone = create_backbone("unet2d-tiny")
    with pytest.raises(KeyError, match=r"up_blocks\.7.*valid layers.*mid_block"):
        backbone.modules_by_name(["up_blocks.7"])


def test_folder_without_diffusers_config_is_rejected(tmp_path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a diffusers folder"):
        create_backbone(tmp_path)


# ----------------------------------------------------------------- plug-ins saved in model folders
TRAINING_MODULES = ("selfcond", "align", "train")


def test_the_backbones_package_imports_no_training_module() -> None:
    import ast
    from pathlib import Path

    import difffeat.backbones

    for path in Path(difffeat.backbones.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports included
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[:2] not in [["difffeat", m] for m in TRAINING_MODULES], f"{path.name}: {name}"


def _selfcond_export(tmp_path):
    """A pipeline folder holding a U-Net with a trained-looking (non-zero) self-conditioning MLP."""
    from difffeat.selfcond import SelfConditioning
    from difffeat.train import SCHEDULERS, save_pipeline

    backbone = create_backbone("unet2d-tiny").set_self_conditioning(SelfConditioning(hidden=8))
    torch.nn.init.normal_(backbone.selfcond.mlp[-1].weight, generator=torch.Generator().manual_seed(0))
    save_pipeline(backbone.model, SCHEDULERS["eps"], tmp_path / "sc", plugins=[backbone.selfcond])
    return backbone, tmp_path / "sc"


def test_a_self_conditioned_export_loads_in_a_fresh_interpreter(tmp_path) -> None:
    import subprocess
    import sys

    backbone, folder = _selfcond_export(tmp_path)
    create_backbone("unet2d-tiny").model.save_pretrained(tmp_path / "plain")
    code = ("import sys; import difffeat.backbones as b; "
            "plain = b.create_backbone(sys.argv[2]); "
            f"print([m for m in sys.modules if m.startswith('difffeat.') and m.split('.')[1] in {TRAINING_MODULES}]); "
            "sc = b.create_backbone(sys.argv[1]); print(type(sc.selfcond).__name__, sc.weights_digest())")
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "plain")], capture_output=True,
                         text=True, check=True, timeout=300).stdout.strip().splitlines()
    assert out[-2] == "[]"  # neither importing the backbones nor loading a plain folder imports a plug-in
    assert out[-1] == f"SelfConditioning {backbone.weights_digest()}"  # the folder named the module to import


def test_a_self_conditioned_export_reattaches_it(tmp_path) -> None:
    backbone, folder = _selfcond_export(tmp_path)
    assert (folder / "plugins" / "selfcond" / "model.safetensors").exists()
    loaded = create_backbone(folder)
    assert type(loaded.selfcond).__name__ == "SelfConditioning"
    torch.testing.assert_close(loaded(torch.ones(2, 1, 16, 16), torch.tensor([3, 500])),
                               backbone(torch.ones(2, 1, 16, 16), torch.tensor([3, 500])), rtol=0, atol=0)


def test_a_folder_in_the_old_selfcond_layout_still_loads(tmp_path) -> None:
    backbone, folder = _selfcond_export(tmp_path)
    (folder / "plugins" / "selfcond").rename(folder / "selfcond")  # exports before the plug-in registry
    (folder / "plugins").rmdir()
    config = json.loads((folder / "selfcond" / "config.json").read_text())
    config.pop("_module")
    (folder / "selfcond" / "config.json").write_text(json.dumps(config))
    loaded = create_backbone(folder)
    assert loaded.weights_digest() == backbone.weights_digest()


def test_any_registered_plugin_travels_with_the_folder_and_unknown_ones_are_named(tmp_path) -> None:
    from difffeat.plugins import attached_plugins, register_plugin
    from difffeat.train import SCHEDULERS, save_pipeline

    @register_plugin("test-output-scale")
    class OutputScale(torch.nn.Module):
        """Multiplies the denoiser's output by a learned factor (a forward hook on the diffusers model)."""

        def __init__(self, init: float = 1.0) -> None:
            super().__init__()
            self.init = init
            self.scale = torch.nn.Parameter(torch.tensor(init))

        def config(self) -> dict:
            return {"init": self.init}

        def attach(self, backbone: Backbone) -> None:
            backbone.output_scale = self
            backbone.model.register_forward_hook(lambda _m, _i, out: type(out)(out.sample * self.scale))

    backbone = create_backbone("unet2d-tiny")
    plain = _probe(backbone)
    OutputScale(1.0).attach(backbone)
    with torch.no_grad():
        backbone.output_scale.scale.fill_(3.0)
    assert attached_plugins(backbone) == [backbone.output_scale]
    save_pipeline(backbone.model, SCHEDULERS["eps"], tmp_path / "m", plugins=attached_plugins(backbone))
    loaded = create_backbone(tmp_path / "m")
    torch.testing.assert_close(_probe(loaded), 3.0 * plain)
    assert loaded.output_scale.init == 1.0 and float(loaded.output_scale.scale) == 3.0

    config = tmp_path / "m" / "plugins" / "test-output-scale" / "config.json"
    (config.parent).rename(config.parent.with_name("not-registered"))
    with pytest.raises(KeyError, match=r"not-registered.*unknown plug-in 'not-registered'.*registered:.*selfcond"):
        create_backbone(tmp_path / "m")
