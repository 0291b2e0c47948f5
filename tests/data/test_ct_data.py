"""CT data: DICOM / PNG / NPY readers and their refusals, series ordering, DICOM writing, simulated scanners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from difffeat.data.ct import (
    HELD_OUT_PROTOCOL,
    STANDARD,
    TRAIN_PROTOCOLS,
    CTDataModule,
    CTFileError,
    Protocol,
    SimulatedScanners,
    denormalize_hu,
    header_window,
    make_phantom,
    normalize_hu,
    read_ct_image,
    read_dicom,
    read_series,
    simulate_scan,
    tissue_labels,
    window,
    write_dicom_series,
)

CT_SMALL = get_testdata_file("CT_small.dcm")


def _ct() -> pydicom.Dataset:
    return pydicom.dcmread(CT_SMALL)


def _series(folder: Path, zs: list[float], instance: list[int] | None = None, positions: bool = True) -> None:
    folder.mkdir()
    for i, z in enumerate(zs):
        ds = _ct()
        a = ds.pixel_array.copy()
        a[:] = 100 + 10 * i  # slice i holds HU 100 + 10 i - 1024
        ds.PixelData = a.tobytes()
        if positions:
            ds.ImagePositionPatient = [0.0, 0.0, z]
        else:
            del ds.ImagePositionPatient
        if instance is not None:
            ds.InstanceNumber = instance[i]
        ds.save_as(folder / f"f{i}.dcm")


def test_read_dicom_hu_and_header() -> None:
    ds = _ct()
    s = read_dicom(CT_SMALL)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(s.hu, expected)
    assert s.hu.min() == -896 and "PixelData" not in s.header and s.header.Modality == "CT"


def test_bad_dicoms_named(tmp_path: Path) -> None:
    ds = _ct()
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(CTFileError, match=r"nopix\.dcm has no pixel data"):
        read_dicom(tmp_path / "nopix.dcm")
    ds = _ct()
    del ds.RescaleSlope
    ds.save_as(tmp_path / "noslope.dcm")
    with pytest.raises(CTFileError, match=r"noslope\.dcm lacks RescaleSlope"):
        read_dicom(tmp_path / "noslope.dcm")
    with pytest.raises(CTFileError, match=r"MR_small\.dcm has modality 'MR'"):
        read_dicom(get_testdata_file("MR_small.dcm"))
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(CTFileError, match=r"junk\.dcm cannot be read"):
        read_dicom(tmp_path / "junk.dcm")


def test_compressed_without_decoder_named(tmp_path: Path) -> None:
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    ds = _ct()
    ds.PixelData = encapsulate([b"\xff\xd8 fake jpeg-ls frame \xff\xd9"])
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.save_as(tmp_path / "jls.dcm")
    with pytest.raises(CTFileError, match=r"jls\.dcm uses the compressed transfer syntax JPEG-LS"):
        read_dicom(tmp_path / "jls.dcm")


def test_npy_png_inputs(tmp_path: Path) -> None:
    hu = np.linspace(-1000, 1000, 64, dtype=np.float32).reshape(8, 8)
    np.save(tmp_path / "a.npy", hu)
    np.testing.assert_array_equal(read_ct_image(tmp_path / "a.npy").hu, hu)
    bad = hu.copy()
    bad[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(CTFileError, match=r"nan\.npy: 1 of 64 pixels are NaN"):
        read_ct_image(tmp_path / "nan.npy")
    Image.fromarray(np.round(hu + 1024).astype(np.uint16)).save(tmp_path / "b.png")
    np.testing.assert_allclose(read_ct_image(tmp_path / "b.png").hu, np.round(hu))
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(CTFileError, match=r"c\.png is 8-bit"):
        read_ct_image(tmp_path / "c.png")
    assert read_ct_image(tmp_path / "c.png", png_window=(40, 400)).hu.max() == pytest.approx(240)


def test_series_order_and_mixed_sizes(tmp_path: Path) -> None:
    _series(tmp_path / "pos", [5.0, -2.5, 0.0])
    order = [s.path.name for s in read_series(tmp_path / "pos")]
    assert order == ["f1.dcm", "f2.dcm", "f0.dcm"]
    _series(tmp_path / "inst", [0, 0, 0], instance=[3, 1, 2], positions=False)
    assert [s.path.name for s in read_series(tmp_path / "inst")] == ["f1.dcm", "f2.dcm", "f0.dcm"]
    # one slice without a position: the whole series falls back to InstanceNumber (never a mix of the two)
    _series(tmp_path / "mixed", [9.0, 1.0, 5.0], instance=[1, 2, 3])
    ds = pydicom.dcmread(tmp_path / "mixed" / "f1.dcm")
    del ds.ImagePositionPatient
    ds.save_as(tmp_path / "mixed" / "f1.dcm")
    assert [s.path.name for s in read_series(tmp_path / "mixed")] == ["f0.dcm", "f1.dcm", "f2.dcm"]
    ds = _ct()
    ds.Rows, ds.Columns = 64, 256
    ds.save_as(tmp_path / "pos" / "odd.dcm")
    with pytest.raises(CTFileError, match=r"mixes slice sizes: f0\.dcm is 128x128, odd\.dcm is 64x256"):
        read_series(tmp_path / "pos")


def test_write_dicom_series_roundtrip_and_atomic(tmp_path: Path) -> None:
    src = read_dicom(CT_SMALL)
    hu = np.clip(src.hu * 0.5, -1024, 3000).astype(np.float32)
    out = tmp_path / "std"
    paths = write_dicom_series([(hu, src.header), (hu + 10, src.header)], out)
    assert [p.name for p in paths] == ["slice_0000.dcm", "slice_0001.dcm"]
    back = [pydicom.dcmread(p) for p in paths]
    orig = _ct()
    for ds in back:
        assert ds.SeriesInstanceUID != orig.SeriesInstanceUID and ds.SOPInstanceUID != orig.SOPInstanceUID
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "RescaleSlope", "RescaleIntercept", "StudyInstanceUID", "PatientID"):
            assert ds.get(tag) == orig.get(tag), tag
    assert back[0].SeriesInstanceUID == back[1].SeriesInstanceUID != ""
    assert back[0].SOPInstanceUID != back[1].SOPInstanceUID
    np.testing.assert_allclose(read_dicom(paths[0]).hu, np.round(hu), atol=0.5)
    np.testing.assert_allclose(read_dicom(paths[1]).hu, np.round(hu + 10), atol=0.5)
    # a bad second slice: nothing written, no temporary folder left
    with pytest.raises(CTFileError, match="differs from its header"):
        write_dicom_series([(hu, src.header), (hu[:10], src.header)], tmp_path / "bad")
    nan = hu.copy()
    nan[0, 0] = np.nan
    with pytest.raises(CTFileError, match="NaN"):
        write_dicom_series([(hu, src.header), (nan, src.header)], tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["std"]
    with pytest.raises(FileExistsError):
        write_dicom_series([(hu, src.header)], out)


def test_hu_helpers() -> None:
    hu = np.array([-2000.0, -1024.0, 0.0, 1024.0, 5000.0])
    x = normalize_hu(hu)
    np.testing.assert_allclose(x, [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(denormalize_hu(torch.tensor(x)).numpy(), [-1024, -1024, 0, 1024, 1024])
    np.testing.assert_allclose(window(np.array([-160.0, 40.0, 240.0]), 40, 400), [0, 0.5, 1])
    assert tissue_labels(np.array([-1000, -850, -100, 40, 700])).tolist() == [0, 1, 2, 3, 4]
    ds = _ct()
    assert header_window(ds) is None
    ds.WindowCenter, ds.WindowWidth = [40, -600], [400, 1500]
    assert header_window(ds) == (40.0, 400.0)


def test_simulation_physics() -> None:
    hu = make_phantom("chest", 48, 0, 0)
    assert hu.shape == (48, 48) and hu.min() == -1000 and (tissue_labels(hu) == 1).any()
    clean = simulate_scan(hu, Protocol("clean", "ramp", None))
    body = tissue_labels(hu) == 3
    assert abs(float(np.median(clean[body] - hu[body]))) < 40  # noiseless FBP keeps soft-tissue HU
    low = simulate_scan(hu, Protocol("low", "ramp", 5e3), np.random.default_rng(0))
    high = simulate_scan(hu, Protocol("high", "ramp", 1e6), np.random.default_rng(0))
    assert np.abs(low - clean).std() > 2 * np.abs(high - clean).std()  # lower dose, more noise
    with pytest.raises(KeyError, match="expected one of ramp"):
        Protocol("x", "lanczos", None)
    with pytest.raises(ValueError, match="noise generator"):
        simulate_scan(hu, Protocol("low", "ramp", 5e3))
    assert make_phantom("real", 32).shape == (32, 32)


def test_simulated_pairs_seeded_and_split(tmp_path: Path) -> None:
    a = SimulatedScanners(3, 32, seed=0)
    b = SimulatedScanners(3, 32, seed=0, cache_dir=tmp_path)
    assert len(a) == 3 * (len(TRAIN_PROTOCOLS) + 1)
    ia, ib = a[1], b[1]
    assert torch.equal(ia["source"], ib["source"]) and torch.equal(ia["target"], ib["target"])
    assert len(list(tmp_path.glob("*.npy"))) == 2
    assert torch.equal(SimulatedScanners(3, 32, seed=0, cache_dir=tmp_path)[1]["source"], ia["source"])
    assert not torch.equal(a[0]["source"], a[1]["source"])  # two protocols of the same phantom
    assert torch.equal(a[0]["target"], a[1]["target"])  # one standard per phantom
    std_item = a[len(TRAIN_PROTOCOLS)]  # the identity pair
    assert torch.equal(std_item["source"], std_item["target"])
    test = SimulatedScanners.split("test", 2, 32)
    assert HELD_OUT_PROTOCOL in test.protocols and STANDARD not in test.protocols
    assert HELD_OUT_PROTOCOL not in SimulatedScanners.split("train", 2, 32).protocols
    assert test.kind(0) == "real" and test[0]["name"].startswith("ct-2-0000-real")
    train0 = SimulatedScanners.split("train", 2, 32).phantom(1)
    assert not np.array_equal(train0, SimulatedScanners.split("val", 2, 32).phantom(1))
    assert ia["source"].min() >= -1 and ia["source"].max() <= 1 and ia["labels"].dtype == torch.int64
    with pytest.raises(IndexError):
        a[len(a)]


def test_datamodule_batches() -> None:
    dm = CTDataModule(size=32, batch_size=4, phantoms=(2, 1, 1))
    batch = next(iter(dm.train_dataloader()))
    assert batch["source"].shape == (4, 1, 32, 32) and batch["labels"].shape == (4, 32, 32)
    assert len(dm.test_dataloader().dataset) == len(TRAIN_PROTOCOLS) + 1
    with pytest.raises(ValueError, match="train, val and test"):
        CTDataModule(phantoms=(1, 2))

