"""The `difffeat` command: every YAML in configs/ under fast_dev_run, and config errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from difffeat.cli import main

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
# configs that point at a backbone another config trains (`make run`, ddpm_scenes.yaml) run here on the same
# architecture, random init
TRAINED = {".cache/difffeat/backbones/unet2d-digits": "unet2d-digits",
           ".cache/difffeat/backbones/sd-unet-scenes-ddpm": "sd-unet-scenes",
           ".cache/difffeat/backbones/sd-unet-scenes-attn2-ddpm": "sd-unet-scenes-attn2"}


def _overrides(path: Path, tmp_path: Path) -> list[str]:
    """Point outputs into tmp_path, and inputs that `make run` or the teacher config make at stand-ins."""
    text = path.read_text()
    args = []
    for folder, name in TRAINED.items():
        if folder in text and "export_dir" not in text:
            args += ["--model.backbone", name]  # same architecture, random init
    if "export_dir" in text:
        args += ["--model.export_dir", str(tmp_path / "exported")]
    if "FewShotDataModule" in text:  # a handful of scenes and episodes
        args += ["--data.train_scenes", "120", "--data.test_scenes", "120", "--data.train_episodes", "4",
                 "--data.test_episodes", "4", "--data.batch_size", "2"]
    if "export_path" in text:
        args += ["--model.export_path", str(tmp_path / "teacher.safetensors")]
    return args


def _config(path: Path, tmp_path: Path) -> Path:
    """The config itself, or a copy whose teacher checkpoint (made by teacher_digits.yaml) is dropped:
    a random-init teacher of the same shape."""
    text = path.read_text()
    if "checkpoint: .cache" not in text:
        return path
    copy = tmp_path / path.name
    copy.write_text(re.sub(r"checkpoint: \.cache\S+", "checkpoint: null", text))
    return copy


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_runs_under_fast_dev_run(path: Path, tmp_path: Path) -> None:
    lines = path.read_text().splitlines()
    command = next(line.split()[2] for line in lines if line.startswith("#   difffeat "))
    args = [command, "--config", str(_config(path, tmp_path)), "--trainer.fast_dev_run", "1",
            *_overrides(path, tmp_path)]
    if command == "extract":
        args += ["--store", str(tmp_path / "store")]
    main(args)
    if command == "extract":
        assert (tmp_path / "store" / "shard_00000.safetensors").exists()


def test_config_typo_is_named(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((Path(__file__).parent.parent / "configs" / "ddpm_digits.yaml").read_text()
                   .replace("warmup_steps", "warmup_stpes"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bad)])
    assert "warmup_stpes" in capsys.readouterr().err


def test_extract_config_typo_is_named(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((Path(__file__).parent.parent / "configs" / "extract_digits.yaml").read_text()
                   .replace("shard_size", "shard_sise"))
    with pytest.raises(SystemExit):
        main(["extract", "--config", str(bad)])
    assert "shard_sise" in capsys.readouterr().err


def test_probe_subcommand_writes_a_table(tmp_path: Path, capsys) -> None:
    import torch

    from difffeat.store import FeatureStore

    y = torch.arange(30) % 3
    fs = FeatureStore(tmp_path / "store", {"cli": 1}, 30, 16)
    for k in range(fs.num_shards):
        rows = torch.tensor(list(fs.shard_range(k)))
        fs.write_shard(k, {"f@t0": torch.nn.functional.one_hot(y[rows], 3).float() + 0.1 * rows[:, None] / 30,
                           "label": y[rows], "split": (rows >= 20).long(), "index": rows})
    out = tmp_path / "probe.md"
    main(["probe", "--store", str(tmp_path / "store"), "--labels_per_class", "[1, 0]", "--seeds", "[0]",
          "--out", str(out)])
    assert "| `f@t0` | 100.0 | 100.0 |" in out.read_text()
    assert "f@t0" in capsys.readouterr().out


def test_backbones_lists_families_and_names(capsys) -> None:
    from difffeat.backbones import list_backbones
    from difffeat.backbones.registry import list_adapters

    main(["backbones"])
    out = capsys.readouterr().out
    for class_name, adapters in list_adapters().items():
        assert all(f"| `{class_name}` | `{a.__module__}.{a.__name__}` |" in out for a in adapters)
    assert all(name in out for name in list_backbones())


def test_backbones_prints_a_tap_table(capsys) -> None:
    from difffeat.backbones import create_backbone

    main(["backbones", "--model", "unet2d-tiny", "--match", "up_blocks"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    info = {n: i for n, i in create_backbone("unet2d-tiny").feature_info.items() if "up_blocks" in n}
    assert [line.split("`")[1] for line in rows] == list(info)
    first = info[next(iter(info))]
    assert rows[0] == f"| `{first.name}` | map | {first.channels} | stride {first.stride} |"


def _dis_images(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 50), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_predict_masks_from_a_fit_checkpoint(tmp_path: Path, capsys) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from heads.dis import predict_folder
    from heads.dis_baselines import SMPSegmentationModule

    config = Path(__file__).parent.parent / "configs" / "dis_smp_unet.yaml"
    main(["fit", "--config", str(config), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
          "--trainer.enable_checkpointing", "true", "--trainer.default_root_dir", str(tmp_path / "run"),
          "--data.size", "64", "--data.batch_size", "2", "--data.lengths", "[2, 1, 1]",
          "--model.decoder_channels", "[16, 16, 8, 8, 8]"])
    [ckpt] = (tmp_path / "run").rglob("*.ckpt")
    _dis_images(tmp_path / "im")
    # the model rebuilt from the checkpoint's own hyper-parameters (no config), weights read as tensors only
    main(["predict-masks", "--checkpoint", str(ckpt), "--images", str(tmp_path / "im"), "--out",
          str(tmp_path / "pred"), "--size", "64"])
    assert "wrote 2 masks" in capsys.readouterr().out
    state = torch.load(ckpt, weights_only=True)
    module = SMPSegmentationModule(**{k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")})
    module.load_state_dict(state["state_dict"])
    expected = predict_folder(module, tmp_path / "im", tmp_path / "expected", size=64)
    for path in expected:
        with Image.open(path) as want, Image.open(tmp_path / "pred" / path.name) as got:
            assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want))
    # the same from a plain state dict and the training config (which gives the default size)
    torch.save(state["state_dict"], tmp_path / "weights.pt")
    small = tmp_path / "small.yaml"
    small.write_text(config.read_text().replace("image_size: 128", "decoder_channels: [16, 16, 8, 8, 8]").replace(
        "size: 128", "size: 64"))
    main(["predict-masks", "--checkpoint", str(tmp_path / "weights.pt"), "--model_config", str(small), "--images",
          str(tmp_path / "im"), "--out", str(tmp_path / "pred2")])
    for path in expected:
        with Image.open(path) as want, Image.open(tmp_path / "pred2" / path.name) as got:
            assert np.array_equal(np.asarray(got), np.asarray(want))


def test_predict_masks_refuses_other_classes_and_mismatched_weights(tmp_path: Path) -> None:
    import torch

    _dis_images(tmp_path / "im")
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "os.system"}}, tmp_path / "evil.ckpt")
    with pytest.raises(KeyError, match="not a DIS segmenter"):
        main(["predict-masks", "--checkpoint", str(tmp_path / "evil.ckpt"), "--images", str(tmp_path / "im"),
              "--out", str(tmp_path / "pred")])
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "nohp.ckpt")
    with pytest.raises(ValueError, match="--model_config"):
        main(["predict-masks", "--checkpoint", str(tmp_path / "nohp.ckpt"), "--images", str(tmp_path / "im"),
              "--out", str(tmp_path / "pred")])
    config = Path(__file__).parent.parent / "configs" / "dis_smp_unet.yaml"
    with pytest.raises(ValueError, match="does not fit"):
        main(["predict-masks", "--checkpoint", str(tmp_path / "nohp.ckpt"), "--model_config", str(config), "--images",
              str(tmp_path / "im"), "--out", str(tmp_path / "pred")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt", "im", "nohp.ckpt"]  # nothing written


def test_export_scenes_writes_a_coco_folder(tmp_path: Path, capsys) -> None:
    from pycocotools.coco import COCO

    main(["export-scenes", "--out_dir", str(tmp_path / "coco"), "--length", "3", "--size", "32"])
    assert "wrote 3 scenes" in capsys.readouterr().out
    jsons = list((tmp_path / "coco").glob("*.json"))
    assert len(jsons) == 1 and len(COCO(str(jsons[0])).getImgIds()) == 3
