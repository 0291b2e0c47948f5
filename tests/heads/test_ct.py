"""DiffusionCT: autoencoder and latent DDPM, both stages and the U-Net baseline from their configs under
fast_dev_run, frozen stage-1 weights, exports, and folder standardization to DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from safetensors.torch import load_file

from difffeat.cli import main
from difffeat.data.ct import CTDataModule, CTFileError, read_dicom
from heads.ct import (
    CTAutoencoder,
    DiffusionCTModule,
    LatentDDPM,
    UNetStandardizerModule,
    load_standardizer,
    standardize_folder,
)

CONFIGS = Path(__file__).parent.parent.parent / "configs"
TINY_DATA = ["--data.size", "32", "--data.phantoms", "[1, 1, 1]", "--data.batch_size", "2"]


def _fit(config: str, *args: str) -> None:
    main(["fit", "--config", str(CONFIGS / config), "--trainer.fast_dev_run", "1", *TINY_DATA, *args])


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ct") / "stage1"
    _fit("ct_stage1.yaml", "--model.channels", "[8, 16]", "--model.image_size", "32", "--model.export_dir", str(out))
    return out


@pytest.fixture(scope="module")
def stage2(stage1: Path) -> Path:
    out = stage1.parent / "stage2"
    _fit("ct_stage2.yaml", "--model.checkpoint", str(stage1), "--model.autoencoder_config", "null",
         "--model.block_out_channels", "[8, 16]", "--model.sample_steps", "2", "--model.export_dir", str(out))
    return out


def test_autoencoder_shapes() -> None:
    ae = CTAutoencoder((8, 16, 16), latent_channels=4)
    x = torch.zeros(2, 1, 32, 32)
    assert ae.encode(x).shape == (2, 4, 8, 8) and ae(x).shape == x.shape and ae.stride == 4
    with pytest.raises(ValueError, match="multiples of 4"):
        ae.encode(torch.zeros(1, 1, 30, 30))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        ae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="norm_num_groups"):
        CTAutoencoder((12, 16), norm_num_groups=8)


def test_latent_ddpm_loss_and_seeded_batch_independent_sampling() -> None:
    torch.manual_seed(0)
    ddpm = LatentDDPM(2, (8, 16), sample_steps=3)
    src, tgt = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    loss = ddpm.loss(tgt, src, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert ddpm.unet.conv_in.weight.grad.abs().sum() > 0 and ddpm.unet.conv_in.in_channels == 4
    ddpm.eval()
    batch = ddpm.sample(src, seed=5)
    assert torch.allclose(ddpm.sample(src[1:2], seed=5), batch[1:2], atol=1e-5)  # same row alone or in a batch
    assert not torch.allclose(ddpm.sample(src, seed=6), batch)
    assert not torch.allclose(batch[0], batch[1])  # the condition matters


def test_stage1_export(stage1: Path) -> None:
    model = load_standardizer(stage1)
    assert type(model).__name__ == "CTAutoencoderModule" and model.image_size == 32
    assert any(k.startswith("autoencoder.") for k in load_file(stage1 / "model.safetensors"))


def test_stage2_frozen_and_exported(stage1: Path, stage2: Path) -> None:
    before = load_file(stage1 / "model.safetensors")
    after = load_file(stage2 / "model.safetensors")
    for k, v in before.items():  # the frozen encoder / decoder left the stage-2 fit unchanged
        assert torch.equal(after[k], v), k
    model = load_standardizer(stage2)
    assert isinstance(model, DiffusionCTModule) and float(model.latent_scale) > 0
    assert not any(k.startswith("autoencoder.") for k in model.state_dict())  # out of Lightning checkpoints
    assert all(not p.requires_grad for p in model.autoencoder.parameters())
    names = {id(p) for p in model.trainable_parameters()}
    assert names and not names & {id(p) for p in model.autoencoder.parameters()}
    model.train()
    assert not model.autoencoder.training and model.diffusion.training
    model.eval()
    x = CTDataModule(size=32, phantoms=(1, 1, 1)).dataset("val")[0]["source"][None]
    y = model.standardize(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.equal(model.standardize(x), y)  # seeded sampling


def test_stage2_refuses_mismatched_or_missing_autoencoder(stage1: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="differs from stage 1's export .* in channels"):
        DiffusionCTModule(checkpoint=str(stage1), autoencoder_config={"channels": [16, 32]})
    with pytest.raises(FileNotFoundError, match="not a CT model export"):
        DiffusionCTModule(checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="give stage 1's export folder"):
        DiffusionCTModule()
    fresh = DiffusionCTModule(autoencoder_config={"channels": [8, 16]}, block_out_channels=[8, 16])
    with pytest.raises(RuntimeError, match="latent scale is unset"):
        fresh.standardize(torch.zeros(1, 1, 32, 32))


def test_unet_baseline_config(tmp_path: Path) -> None:
    _fit("ct_unet.yaml", "--model.image_size", "32", "--model.export_dir", str(tmp_path / "unet"))
    model = load_standardizer(tmp_path / "unet")
    assert isinstance(model, UNetStandardizerModule)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert model.standardize(x).shape == x.shape


def _dicom_folder(folder: Path, n: int = 2) -> None:
    folder.mkdir()
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.ImagePositionPatient = [0.0, 0.0, float(-i)]  # written in reverse order
        ds.save_as(folder / f"s{i}.dcm")


def test_standardize_folder_writes_readable_dicom(stage2: Path, tmp_path: Path) -> None:
    _dicom_folder(tmp_path / "in")
    out = tmp_path / "out"
    paths = standardize_folder(stage2, tmp_path / "in", out)
    assert [p.name for p in paths] == ["s1.dcm", "s0.dcm"]  # slice order along the normal, own file names
    orig = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = set()
    for p in paths:
        ds = pydicom.dcmread(p)
        series.add(ds.SeriesInstanceUID)
        assert ds.SeriesInstanceUID != orig.SeriesInstanceUID and ds.SOPInstanceUID != orig.SOPInstanceUID
        assert ds.ImageType[0] == "DERIVED" and (ds.Rows, ds.Columns) == (orig.Rows, orig.Columns)
        assert ds.PixelSpacing == orig.PixelSpacing and ds.RescaleIntercept == orig.RescaleIntercept
        hu = read_dicom(p).hu
        assert np.isfinite(hu).all() and hu.min() >= -1025 and hu.max() <= 1025
    assert len(series) == 1
    with pytest.raises(FileExistsError):
        standardize_folder(stage2, tmp_path / "in", out)


def test_standardize_ct_command(stage2: Path, tmp_path: Path, capsys) -> None:
    _dicom_folder(tmp_path / "in")
    main(["standardize-ct", "--checkpoint", str(stage2), "--input_dir", str(tmp_path / "in"), "--output_dir",
          str(tmp_path / "out")])
    assert "wrote 2 standardized slices" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s0.dcm", "s1.dcm"]
    assert pydicom.dcmread(tmp_path / "out" / "s0.dcm").ImageType[0] == "DERIVED"


def test_standardize_folder_bad_input_leaves_nothing(stage2: Path, tmp_path: Path) -> None:
    _dicom_folder(tmp_path / "in")
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr.save_as(tmp_path / "in" / "z_mr.dcm")
    with pytest.raises(CTFileError, match=r"z_mr\.dcm has modality 'MR'"):
        standardize_folder(stage2, tmp_path / "in", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    with pytest.raises(KeyError, match="not a CT model"):
        (tmp_path / "fake").mkdir()
        (tmp_path / "fake" / "config.json").write_text('{"class_path": "os.system", "init_args": {}}')
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "fake" / "model.safetensors"))
        load_standardizer(tmp_path / "fake")
