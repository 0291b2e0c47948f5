"""REPA and HASTE: losses, gradient paths, termination, teacher loading, bad configurations."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from difffeat.align import Alignment, TimmTeacher, attention_distillation_loss, repa_loss
from difffeat.backbones import create_backbone
from difffeat.train import DiffusionModule, diffusion_loss

VIT = "vit_tiny_patch16_224"
VIT_KW = {"patch_size": 2, "in_chans": 1, "embed_dim": 24, "depth": 3, "num_heads": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real timm checkpoint file, made at another input size than the one the student needs."""
    model = timm.create_model(VIT, img_size=8, num_classes=10, **VIT_KW)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(model.state_dict(), str(path))
    return path, model


def _alignment(checkpoint, **kw) -> Alignment:
    return Alignment(TimmTeacher(VIT, str(checkpoint[0]), VIT_KW), projector_dim=16, **kw)


def test_repa_loss_is_minus_one_for_proportional_tokens() -> None:
    teacher = torch.randn(2, 5, 8)
    assert torch.isclose(repa_loss(3.5 * teacher, teacher), torch.tensor(-1.0))
    assert repa_loss(-teacher, teacher) > 0.99


def test_attention_loss_is_kl_plus_teacher_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 6, 6, generator=gen)
    teacher = torch.randn(3, 7, 7, generator=gen)  # one prefix (CLS) token
    p = teacher[:, 1:, 1:].softmax(-1)
    log_q = student.log_softmax(-1)
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(attention_distillation_loss(student, teacher, prefix=1), kl + entropy)


def test_teacher_checkpoint_loads_with_resampled_position_embeddings(checkpoint) -> None:
    teacher = TimmTeacher(VIT, str(checkpoint[0]), VIT_KW)
    teacher.build((8, 8))
    reference = checkpoint[1].state_dict()
    assert torch.equal(teacher.model.blocks[1].attn.qkv.weight, reference["blocks.1.attn.qkv.weight"])
    assert teacher.model.pos_embed.shape == (1, 65, 24) != reference["pos_embed"].shape
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.model.training
    tokens, logits = teacher(torch.rand(2, 1, 16, 16) * 2 - 1, attention_blocks=[2])
    assert tokens.shape == (2, 64, 24) and logits[2].shape == (2, 2, 65, 65)


def test_repa_gradient_stops_at_block_l_and_never_reaches_the_teacher(checkpoint) -> None:
    backbone = create_backbone("dit-digits").requires_grad_(True).train()
    align = _alignment(checkpoint, depth=2)
    align.bind(backbone)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    with align.capture(backbone) as found:
        backbone.denoise(images, torch.tensor([10, 500]))
    align.loss(found, images)["repa"].backward()
    blocks = backbone.model.transformer_blocks
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[1].parameters())
    for later in blocks[2:]:
        assert all(p.grad is None or not p.grad.any() for p in later.parameters())
    assert all(p.grad is None for p in align.teacher.parameters())
    assert any(p.grad is not None for p in align.projector.parameters())


def test_after_stop_step_the_loss_is_the_diffusion_loss_and_the_teacher_is_idle(checkpoint) -> None:
    module = DiffusionModule("dit-digits", objective="flow",
                             alignment=_alignment(checkpoint, depth=2, attention_weight=0.5, stop_step=3))
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    calls = module.alignment.teacher.calls
    torch.manual_seed(0)
    before, terms = module.compute_loss(images, step=2)
    assert set(terms) == {"diffusion", "repa", "attention"} and module.alignment.teacher.calls == calls + 1
    torch.manual_seed(0)
    after, terms = module.compute_loss(images, step=3)
    torch.manual_seed(0)
    assert torch.equal(after, diffusion_loss(module, images)) and set(terms) == {"diffusion"}
    assert module.alignment.teacher.calls == calls + 1  # the teacher was not run after stop_step
    assert not torch.equal(before, after)


def test_haste_loss_has_both_terms(checkpoint) -> None:
    backbone = create_backbone("dit-digits")
    align = _alignment(checkpoint, depth=3, attention_weight=0.5)
    align.bind(backbone)
    assert align.attention_pairs[0] == [0, 0, 0, 0] and len(align.attention_pairs) == 6
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    with align.capture(backbone) as found:
        backbone.denoise(images, torch.tensor([1, 2]))
    terms = align.loss(found, images)
    assert set(terms) == {"repa", "attention"} and terms["attention"] > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"depth": 7}, r"depth 7 out of range: the student has blocks 1 … 6"),
    ({"attention_weight": 0.5, "attention_pairs": [[0, 4, 0, 0]]}, r"student has blocks 0 … 5 with heads 0 … 3"),
    ({"attention_weight": 0.5, "attention_pairs": [[0, 0, 0, 2]]}, r"teacher has blocks 0 … 2 with heads 0 … 1"),
])
def test_bad_alignment_configs_fail_at_construction(checkpoint, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DiffusionModule("dit-digits", alignment=_alignment(checkpoint, **kwargs))


def test_negative_stop_step_and_unmatchable_grid(checkpoint) -> None:
    with pytest.raises(ValueError, match="stop_step must be >= 0"):
        _alignment(checkpoint, stop_step=-1)
    fixed = Alignment(TimmTeacher(VIT, None, {**VIT_KW, "img_size": 12}))
    with pytest.raises(ValueError, match="6x6 patch grid; the student's token grid is 8x8"):
        DiffusionModule("dit-digits", alignment=fixed)
    with pytest.raises(TypeError, match="transformer student"):
        DiffusionModule("unet2d-tiny", alignment=_alignment(checkpoint))


def test_project_teacher_export_loads_as_a_timm_checkpoint(tmp_path) -> None:
    import lightning as L

    from difffeat.data import DigitsDataModule
    from heads.classification import TimmClassifierModule

    module = TimmClassifierModule(VIT, {**VIT_KW, "img_size": 16}, export_path=str(tmp_path / "t.safetensors"))
    L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, DigitsDataModule(batch_size=8))
    teacher = TimmTeacher(VIT, str(tmp_path / "t.safetensors"), VIT_KW)
    teacher.build((8, 8))
    trained = module.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in teacher.model.state_dict().items() if k in trained)
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_teacher_with_another_token_count_is_a_value_error_naming_both(checkpoint) -> None:
    class CoarseTeacher(TimmTeacher):
        """A teacher whose stem downsamples twice more than its patch size says (a 4x4 grid for 8x8)."""

        def build(self, grid):
            super().build(grid)
            self.grid = (grid[0] // 2, grid[1] // 2)

    align = Alignment(CoarseTeacher(VIT, str(checkpoint[0]), VIT_KW), depth=2, projector_dim=16)
    with pytest.raises(ValueError, match=r"block 2 gives 64 tokens \(8x8\).*gives 16 \(4x4\).*patch grid is 8x8"):
        align.bind(create_backbone("dit-digits"))
