"""DiffDIS-style one-step segmenter: shapes, task embedding, zero-initialised parts, training, TTA, folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difffeat.backbones import UNet2DConditionBackbone, create_backbone
from difffeat.data.dis import DISFileError
from difffeat.train import save_pipeline
from heads.dis import DiffDIS, DiffDISModule, dis_loss, predict_folder, task_embedding

# a pixel-space SD-shaped U-Net: 64 px in, mid block (with a transformer) at 16 x 16
TINY = {"sample_size": 64, "in_channels": 3, "out_channels": 3, "block_out_channels": [8, 16, 16],
        "layers_per_block": 1, "cross_attention_dim": 8, "attention_head_dim": 2, "norm_num_groups": 4,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}


def tiny_backbone(seed: int = 0) -> UNet2DConditionBackbone:
    return UNet2DConditionBackbone.from_config(TINY, seed=seed, name="tiny", encoder_hidden_states=torch.zeros(1, 1, 8))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder as DiffusionModule exports it (the 'pretrained' U-Net)."""
    folder = tmp_path_factory.mktemp("unet") / "tiny-ddpm"
    save_pipeline(tiny_backbone().model, {"_class_name": "DDPMScheduler", "prediction_type": "epsilon"}, folder,
                  null_embedding=torch.zeros(1, 1, 8))
    return folder


def batch(n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 1, 64, 64)
    mask[:, :, 16:48, 20:44] = 1
    edge = (F.max_pool2d(mask, 5, 1, 2) - (-F.max_pool2d(-mask, 5, 1, 2))).clamp(0, 1)
    return {"image": torch.rand(n, 3, 64, 64, generator=gen) * 2 - 1, "mask": mask, "edge": edge}


def test_shapes_and_input_checks() -> None:
    model = DiffDIS(tiny_backbone())
    b = batch()
    maps = model(b["image"], b["mask"], b["edge"])
    assert set(maps) == {"mask", "edge"} and maps["mask"].shape == maps["edge"].shape == (2, 1, 64, 64)
    assert model.unet.conv_in.in_channels == 6 and model.timestep == 999  # image + noisy target, final step
    p = model.predict(b["image"])
    assert p.shape == (2, 1, 64, 64) and float(p.min()) >= 0 and float(p.max()) <= 1
    with pytest.raises(ValueError, match="multiples of 4"):
        model(b["image"][..., :62])
    with pytest.raises(ValueError, match="edge target"):
        model(b["image"], b["mask"])
    with pytest.raises(ValueError, match="mask target"):
        model(b["image"], b["mask"][..., :32], b["edge"])


def test_mask_and_edge_halves_differ_only_by_their_task_embedding() -> None:
    model = DiffDIS(tiny_backbone()).eval()
    assert not torch.equal(task_embedding(0, 1), task_embedding(1, 1))
    x = batch(1)["image"].repeat(2, 1, 1, 1)
    x_t = model.noise((1, 3, 64, 64)).repeat(2, 1, 1, 1)  # the same noise in both halves
    t = torch.full((2,), model.timestep)
    with torch.no_grad():
        both = model.step(x, x_t, t, torch.cat([task_embedding(0, 1), task_embedding(1, 1)]))
        same = model.step(x, x_t, t, task_embedding(0, 2))
    assert (both[0] - both[1]).abs().max() > 1e-3  # one U-Net, two tasks
    torch.testing.assert_close(same[0], same[1], atol=1e-6, rtol=0)  # nothing else tells the halves apart


def test_new_parts_leave_the_pretrained_unet_unchanged_at_init(pretrained: Path) -> None:
    model = DiffDIS(str(pretrained)).eval()
    original = create_backbone(str(pretrained)).eval()
    x = batch(1)["image"].repeat(2, 1, 1, 1)
    t = torch.full((2,), model.timestep)
    labels = torch.cat([task_embedding(0, 1), task_embedding(1, 1)])
    cond = model.backbone.condition(None, 2)["encoder_hidden_states"]
    inputs = torch.cat([x, x], 1)  # target channels = image channels: the widened conv_in sees the image twice
    with torch.no_grad():
        full = model.unet(inputs, t, encoder_hidden_states=cond, class_labels=labels,
                          **model.condition(x))
        with model._stack(True):  # the interaction hook active, as in a stacked forward
            stacked = model.unet(inputs, t, encoder_hidden_states=cond, class_labels=labels,
                                 **model.condition(x)).sample
        plain = model.unet(inputs, t, encoder_hidden_states=cond, class_labels=labels).sample
    # zero-initialised skip conditioning and interaction add exact zeros
    assert torch.equal(full.sample, plain) and torch.equal(stacked, plain)
    # and the widened conv_in (filters repeated, halved) reproduces the pretrained U-Net, once the task
    # embedding (the one part that must differ between tasks) is switched off
    with torch.no_grad():
        model.unet.class_embedding.linear_2.weight.zero_()
        model.unet.class_embedding.linear_2.bias.zero_()
        ours = model.unet(inputs, t, encoder_hidden_states=cond, class_labels=labels).sample
        theirs = original.model(x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_one_training_step_is_finite_and_updates_every_new_part(pretrained: Path) -> None:
    torch.manual_seed(0)
    module = DiffDISModule(str(pretrained), lr=1e-3)
    opt = module.configure_optimizers()
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2)  # the task embedding at 10x
    before = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    loss = module.training_step(batch(1), 0)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    after = dict(module.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    for name in ("backbone.model.conv_in.weight", "backbone.model.class_embedding.linear_1.weight",
                 "condition.convs.0.weight", "interaction.attn.to_out.0.weight",
                 "backbone.model.mid_block.resnets.0.conv1.weight"):
        assert not torch.equal(before[name], after[name]), name


def test_edge_weight_zero_drops_the_edge_half_and_term() -> None:
    model = DiffDIS(tiny_backbone(), edge_weight=0)
    b = batch()
    maps = model(b["image"], b["mask"])  # no edge target needed
    assert set(maps) == {"mask"} and model.interaction is None
    losses = dis_loss(maps, b["mask"], b["edge"], edge_weight=0)
    assert set(losses) == {"loss", "mask_loss"} and torch.equal(losses["loss"], losses["mask_loss"])
    with_edge = dis_loss({"mask": maps["mask"], "edge": maps["mask"]}, b["mask"], b["edge"], edge_weight=0.5)
    torch.testing.assert_close(with_edge["loss"], with_edge["mask_loss"] + 0.5 * with_edge["edge_loss"])


def test_mse_loss_is_the_reference_objective_on_the_pm1_target() -> None:
    b = batch()
    maps = {"mask": torch.randn(2, 1, 64, 64), "edge": torch.randn(2, 1, 64, 64)}
    losses = dis_loss(maps, b["mask"], b["edge"], kind="mse")
    expected = F.mse_loss(maps["mask"], b["mask"] * 2 - 1) + F.mse_loss(maps["edge"], b["edge"] * 2 - 1)
    torch.testing.assert_close(losses["loss"], expected)


def test_flip_tta_of_a_mirror_symmetric_image_is_mirror_symmetric() -> None:
    model = DiffDIS(tiny_backbone(), edge_weight=0).eval()
    with torch.no_grad():  # let the prediction depend on the image, not only on the fixed noise
        model.condition.convs[0].weight.normal_(0, 0.5)
    x = batch(1)["image"]
    x = (x + x.flip(-1)) / 2
    assert torch.equal(x, x.flip(-1))
    plain = model.predict(x)
    tta = model.predict(x, flip=True)
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-3)  # the one-step prediction alone is not
    assert torch.equal(tta, tta.flip(-1))  # mean of p(x) and the un-flipped p(flip x)
    half = model.predict(x, flip=True, scales=(0.5,))  # predicted at 32 px, mapped back to 64 px
    assert half.shape == x[:, :1].shape and not torch.allclose(half, tta, atol=1e-3)
    torch.testing.assert_close(half, half.flip(-1), atol=1e-6, rtol=0)  # bilinear resizing is mirror-symmetric


def _write_images(folder: Path, sizes: list[tuple[int, int]]) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_predict_folder_writes_one_png_per_image_at_its_size(tmp_path: Path) -> None:
    model = DiffDIS(tiny_backbone(), edge_weight=0)
    _write_images(tmp_path / "im", [(40, 50), (64, 64), (70, 33)])
    paths = predict_folder(model, tmp_path / "im", tmp_path / "pred", size=64)
    assert [p.name for p in paths] == ["img0.png", "img1.png", "img2.png"]
    for path, (h, w) in zip(paths, [(40, 50), (64, 64), (70, 33)], strict=True):
        with Image.open(path) as img:
            assert img.mode == "L" and img.size == (w, h)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im", "pred"] and model.training
    with pytest.raises(FileExistsError, match="pred"):
        predict_folder(model, tmp_path / "im", tmp_path / "pred", size=64)


def test_predict_folder_leaves_nothing_behind_on_a_bad_image(tmp_path: Path) -> None:
    model = DiffDIS(tiny_backbone(), edge_weight=0)
    _write_images(tmp_path / "im", [(64, 64), (64, 64)])
    data = (tmp_path / "im" / "img1.png").read_bytes()
    (tmp_path / "im" / "img1.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DISFileError, match="img1.png"):
        predict_folder(model, tmp_path / "im", tmp_path / "pred", size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im"]  # no prediction folder, no temporary one
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        predict_folder(model, tmp_path / "empty", tmp_path / "pred2")
    with pytest.raises(FileNotFoundError, match="missing"):
        predict_folder(model, tmp_path / "missing", tmp_path / "pred3")
