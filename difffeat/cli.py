"""The ``difffeat`` command.

* ``difffeat fit|validate|test|predict --config X.yaml``: LightningCLI on any LightningModule and
  LightningDataModule named by ``class_path`` (training backbones and heads).
* ``difffeat extract --config X.yaml``: fills a feature store (Lightning ``predict``, DDP-ready).
* ``difffeat probe --store DIR``: linear-probe sweep over every feature in a store.
* ``difffeat backbones [--model NAME_OR_FOLDER] [--match TEXT]``: the supported diffusers families and
  registered names; with ``--model``, that backbone's tap table (name, kind, channels, stride or grid).
* ``difffeat predict-masks --checkpoint X --images DIR --out DIR [--model_config Y.yaml]``: one 8-bit PNG mask per
  image of a folder from a trained DIS segmenter (:func:`heads.dis.predict_folder`, all or nothing).
* ``difffeat standardize-ct --checkpoint EXPORT --input_dir DIR --output_dir DIR``: a folder of CT DICOM slices
  (one series) to a new, standardized DICOM series (:func:`heads.ct.standardize_folder`, all or nothing).
* ``difffeat synthesize --checkpoint ADAPTER.ckpt --seeds COCO_DIR --out DIR --num_images N``: img2img images
  with the adapter's boxes, as a COCO folder validated by pycocotools (:func:`difffeat.synthesize.synthesize`;
  seeded, resumable).
* ``difffeat export-scenes --out_dir DIR --length N``: labelled generated scenes as a COCO folder (seed data).
* ``difffeat build-rae --folder DIR``: the digits representation autoencoder (MAE-pretrained encoder and latent
  statistics; the decoder is trained next by ``configs/rae_decoder_digits.yaml``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import CLI
from lightning.pytorch.cli import LightningCLI

from difffeat.predict import ExtractionModule, extract_to_store

__all__ = ["backbones", "build_rae", "dis_module_classes", "export_scenes", "extract", "families_table", "main",
           "predict_masks", "probe", "standardize_ct", "synthesize", "taps_table"]

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def extract(model: ExtractionModule, data: L.LightningDataModule, store: str, shard_size: int = 256,
            trainer: dict[str, Any] | None = None, num_workers: int = 0) -> None:
    """Extracts features of ``data``'s predict split into a feature store (resumes if interrupted).

    Args:
        model: the extraction module (backbone, layers, timesteps, ensemble, seed, readout).
        data: a datamodule; its ``predict_dataloader().dataset`` is extracted.
        store: the store folder.
        shard_size: samples per shard and per forward batch.
        trainer: ``lightning.Trainer`` arguments, e.g. ``{devices: 2, strategy: ddp}``.
        num_workers: loader workers.
    """
    data.prepare_data()
    data.setup("predict")
    fs = extract_to_store(model, data.predict_dataloader().dataset, store, shard_size, trainer, num_workers)
    if fs.complete:
        print(f"feature store complete: {fs.root} ({fs.num_shards} shards, key {fs.key[:12]})")


def probe(store: str, labels_per_class: list[int] | None = None, seeds: list[int] | None = None,
          out: str | None = None) -> None:
    """Linear-probe sweep over every feature in a store with a train/test ``split`` tensor.

    Args:
        store: the store folder.
        labels_per_class: label regimes (``0`` = all labels).
        seeds: seeds of the labelled subsets.
        out: optional Markdown file for the table.
    """
    from heads.classification import probe_store

    table = probe_store(store, labels_per_class or [1, 5, 10, 0], seeds or [0, 1, 2])
    print(table)
    if out:
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table + "\n")


def families_table() -> str:
    """A Markdown table of the registered adapters: diffusers class, adapter, condition, and the registered names."""
    from difffeat.backbones import list_backbones
    from difffeat.backbones.registry import list_adapters

    lines = ["| diffusers class | adapter | condition |", "|---|---|---|"]
    for class_name, adapters in list_adapters().items():
        for adapter in adapters:
            keys = getattr(adapter, "condition_keys", None)
            cond = ", ".join(f"`{k}`" for k in keys) if keys else "class label / none"
            lines.append(f"| `{class_name}` | `{adapter.__module__}.{adapter.__name__}` | {cond} |")
    return "\n".join(lines) + "\n\nregistered names: " + ", ".join(list_backbones())


def taps_table(backbone: Any, match: str | None = None) -> str:
    """A Markdown table of a backbone's taps in execution order (``match``: keep names containing it)."""
    lines = ["| tap | kind | channels | stride / token grid |", "|---|---|---|---|"]
    for name, info in backbone.feature_info.items():
        if match and match not in name:
            continue
        where = f"stride {info.stride}" if info.stride is not None else (
            f"grid {info.grid[0]}×{info.grid[1]}" if info.grid is not None else "—")
        lines.append(f"| `{name}` | {info.kind} | {info.channels} | {where} |")
    return "\n".join(lines)


def backbones(model: str | None = None, match: str | None = None) -> None:
    """Prints the supported families, or the tap table of one backbone.

    Args:
        model: a registered name or a local diffusers folder; without it, the families are listed.
        match: only taps whose name contains this text.
    """
    if model is None:
        print(families_table())
        return
    from difffeat.backbones import create_backbone

    backbone = create_backbone(model)
    print(f"{backbone.name}: {type(backbone).__name__} on {type(backbone.model).__name__}, inputs "
          f"{backbone.image_channels}×{backbone.image_size}×{backbone.image_size} ({backbone.inputs})\n")
    print(taps_table(backbone, match))


def dis_module_classes() -> dict[str, type]:
    """The DIS segmenters ``predict-masks`` builds, by class path (only these: no other import from a file)."""
    from heads.dis import DiffDISModule
    from heads.dis_baselines import FrozenDiffusionSMPModule, SMPSegmentationModule

    return {f"{c.__module__}.{c.__name__}": c for c in (DiffDISModule, SMPSegmentationModule, FrozenDiffusionSMPModule)}


def _load_weights(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state_dict, hyper_parameters)`` of a Lightning checkpoint, a plain state dict or a safetensors file."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path), {}
    try:  # tensors and plain containers only: no code is loaded from a checkpoint
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is not a weights-only torch file ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a (Lightning) state dict")
    if "state_dict" in ckpt:
        return ckpt["state_dict"], dict(ckpt.get("hyper_parameters") or {})
    return ckpt, {}


def predict_masks(checkpoint: str, images: str, out: str, model_config: str | None = None, size: int | None = None,
                  flip: bool = False, scales: list[float] | None = None, overwrite: bool = False) -> None:
    """Writes one 8-bit PNG mask per image of a folder with a trained DIS segmenter.

    The model is built from ``model_config``'s ``model`` section (a ``difffeat fit`` YAML) or, without it, from
    the hyper-parameters a ``difffeat fit`` checkpoint stores (its ``_class_path`` and init arguments);
    either way only the DIS modules of :func:`dis_module_classes` are built. The weights are read as
    tensors only (``torch.load(weights_only=True)`` or safetensors) and must match the model exactly.

    Args:
        checkpoint: a Lightning ``.ckpt``, a ``torch.save``-d state dict or a ``.safetensors`` file.
        images: folder of images.
        out: prediction folder to create (refused if it exists, unless ``overwrite``).
        model_config: the YAML the model was trained with (``--config`` is the command's own option).
        size: model input side (default: the config's ``data.init_args.size``, else the model's own).
        flip: flip test-time augmentation.
        scales: test-time scales (default ``[1.0]``).
        overwrite: replace an existing ``out``.

    Raises:
        FileNotFoundError: the checkpoint or the config is missing.
        KeyError: the model class is not a DIS segmenter (the valid ones listed).
        ValueError: no model description, or weights that do not fit the model.
    """
    import yaml

    from heads.dis import predict_folder

    state, hparams = _load_weights(Path(checkpoint))
    if model_config is not None:
        if not Path(model_config).is_file():
            raise FileNotFoundError(f"config {model_config} does not exist")
        spec = yaml.safe_load(Path(model_config).read_text()) or {}
        model_spec = spec.get("model") or {}
        class_path, init_args = model_spec.get("class_path"), dict(model_spec.get("init_args") or {})
        size = size or ((spec.get("data") or {}).get("init_args") or {}).get("size")
    else:
        hparams.pop("_instantiator", None)
        class_path, init_args = hparams.pop("_class_path", None), hparams
    if class_path is None:
        raise ValueError(f"checkpoint {checkpoint} does not name its model class; give the training config with "
                         f"--model_config")
    classes = dis_module_classes()
    if class_path not in classes:
        raise KeyError(f"model class {class_path!r} is not a DIS segmenter; expected one of {', '.join(classes)}")
    model = classes[class_path](**init_args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {checkpoint} does not fit {class_path}: {e}") from e
    written = predict_folder(model, images, out, size=size, flip=flip, scales=scales or [1.0], overwrite=overwrite)
    print(f"wrote {len(written)} masks to {out}")


def standardize_ct(checkpoint: str, input_dir: str, output_dir: str, size: int | None = None,
                   overwrite: bool = False, description: str = "standardized (DiffusionCT)") -> None:
    """Standardizes a folder of CT DICOM slices into a new DICOM series with a trained CT model.

    Args:
        checkpoint: the export folder of a CT model (``configs/ct_stage2.yaml``'s, or the U-Net baseline's).
        input_dir: folder of DICOM slices of one series.
        output_dir: folder to create (refused if it exists, unless ``overwrite``).
        size: model side (default: the model's own).
        overwrite: replace an existing ``output_dir``.
        description: ``SeriesDescription`` of the new series.
    """
    from heads.ct import standardize_folder

    written = standardize_folder(checkpoint, input_dir, output_dir, size=size, overwrite=overwrite,
                                 description=description)
    print(f"wrote {len(written)} standardized slices to {output_dir}")


def synthesize(checkpoint: str, seeds: str, out: str, num_images: int, steps: int = 25,
               strength: tuple[float, float] = (0.4, 0.8), score_threshold: float = 0.3, seed: int = 0,
               cache_interval: int = 1, cache_branch: int = 0) -> None:
    """Synthesizes a detection dataset (images + boxes, COCO) from a trained detection adapter.

    Args:
        checkpoint: a ``difffeat fit`` checkpoint of :class:`heads.detection.DetectionAdapter`.
        seeds: the labelled seed COCO folder (its categories name the output's).
        out: output folder (resumed when it holds a run of the same settings, refused otherwise).
        num_images: images to synthesize.
        steps: denoising steps of a full-strength pass.
        strength: the range each image's img2img strength is drawn from.
        score_threshold: lowest kept box score.
        seed: synthesis seed (the same seed gives the same dataset).
        cache_interval: DeepCache interval ``N`` (1: no feature cache).
        cache_branch: DeepCache skip branch.
    """
    from heads.detection import synthesize_from_checkpoint

    summary = synthesize_from_checkpoint(checkpoint, seeds, out, num_images, steps=steps, strength=tuple(strength),
                                         score_threshold=score_threshold, seed=seed, cache_interval=cache_interval,
                                         cache_branch=cache_branch)
    print(f"{out}: {summary['images']} images, {summary['boxes']} boxes")


def export_scenes(out_dir: str, length: int, size: int = 64, seed: int = 0, classes: list[int] | None = None,
                  max_objects: int = 4, min_objects: int = 1, offset: int = 0, overwrite: bool = False) -> None:
    """Writes labelled generated scenes as a COCO folder (see :func:`difffeat.data.coco.export_scenes`).

    Args:
        out_dir: the COCO folder to create.
        length: number of scenes.
        size: scene side in pixels.
        seed: scene seed.
        classes: scene class ids (default all).
        max_objects: at most this many objects per scene.
        min_objects: at least this many visible objects.
        offset: first scene index.
        overwrite: replace an existing ``out_dir``.
    """
    from difffeat.data.coco import export_scenes as export

    export(out_dir, length, size=size, seed=seed, classes=classes, max_objects=max_objects,
           min_objects=min_objects, offset=offset, overwrite=overwrite)
    print(f"wrote {length} scenes to {out_dir}")


def build_rae(folder: str = ".cache/difffeat/rae/digits-mae", mae_steps: int = 1500, decoder_steps: int = 0,
              noise_tau: float = 0.8, norm_mode: str = "element", seed: int = 0) -> None:
    """Builds the digits RAE (see :func:`difffeat.rae.build_digits_rae`) into ``folder``.

    Args:
        folder: destination (written atomically); ``configs/rae_decoder_digits.yaml`` reads the default.
        mae_steps: MAE pretraining steps of the encoder on the digits training split (no labels).
        decoder_steps: decoder training steps here (0: leave it to the decoder config).
        noise_tau: ``τ`` of the decoder's noise augmentation.
        norm_mode: ``"element"`` or ``"channel"`` latent statistics.
        seed: seed of the encoder init and of the training.
    """
    from difffeat.rae import build_digits_rae

    build_digits_rae(folder, mae_steps=mae_steps, decoder_steps=decoder_steps, noise_tau=noise_tau,
                     norm_mode=norm_mode, seed=seed)
    print(f"wrote the digits RAE to {folder}")


def main(args: Sequence[str] | None = None) -> Any:
    """Entry point of the ``difffeat`` command (``args`` defaults to ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if args is None else args)
    commands = [extract, probe, backbones, predict_masks, standardize_ct, synthesize, export_scenes, build_rae]
    if argv and argv[0].replace("-", "_") in {c.__name__ for c in commands}:
        argv[0] = argv[0].replace("-", "_")  # `predict-masks` is the function predict_masks
        return CLI(commands, args=argv, as_positional=False)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        if not argv:
            return None
    # no config.yaml dropped into the working directory on every run: `--print_config` gives it on demand
    return LightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, args=argv, save_config_callback=None,
                        parser_kwargs={"parser_mode": "yaml"})


if __name__ == "__main__":
    main()
