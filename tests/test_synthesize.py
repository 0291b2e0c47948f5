"""One-pass synthesis: the img2img scheduler, a valid and seeded COCO folder, resume after kill -9, bad inputs."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from difffeat.data.coco import ANNOTATIONS, IMAGES, CocoError, export_scenes, load_coco
from difffeat.synthesize import PARTS, SETTINGS, SynthesisError, img2img_scheduler, synthesize

ROOT = Path(__file__).parents[1]
# builds the tiny adapter the same way in this process and in the one that is killed
BUILD = '''
import sys
import torch

def build(unet_dir):
    from diffusers import UNet2DModel
    from heads.detection import DetectionAdapter

    torch.manual_seed(0)
    UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                norm_num_groups=4).save_pretrained(unet_dir)
    torch.manual_seed(0)
    return DetectionAdapter(unet_dir, ["mid_block", "up_blocks.0", "up_blocks.1"], 20, ["digit0", "circle"],
                            output_strides=[4, 8, 16], width=16, num_queries=6).eval()

if __name__ == "__main__":  # threads from OMP_NUM_THREADS: the caller's count, so the bytes can be compared
    from difffeat.synthesize import synthesize

    synthesize(build(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), steps=int(sys.argv[5]),
               score_threshold=0.0, progress=False)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("synth")
    script = tmp / "build.py"
    script.write_text(BUILD)
    adapter = runpy.run_path(str(script), run_name="lib")["build"](str(tmp / "unet"))
    seeds = export_scenes(tmp / "seeds", 3, size=32, seed=1, classes=[0, 1], progress=False)
    return {"tmp": tmp, "script": script, "adapter": adapter, "seeds": seeds}


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / IMAGES).iterdir())} | {
        ANNOTATIONS: (folder / ANNOTATIONS).read_bytes()}


def test_img2img_scheduler_recovers_x0_with_the_true_noise(setup) -> None:
    schedule = setup["adapter"].backbone.schedule
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    eps = torch.randn(1, 3, 8, 8)
    scheduler, model_t, step_t = img2img_scheduler(schedule, 600, 20, 7)
    assert model_t[0] == 600 and model_t[-1] == 20 and len(step_t) == 7
    x = scheduler.add_noise(x0, eps, torch.tensor([6]))
    a = schedule.alphas_cumprod[600]
    assert torch.allclose(x, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)
    for ts in step_t:
        x = scheduler.step(eps, ts, x).prev_sample
    assert torch.allclose(x, x0, atol=1e-4)
    with pytest.raises(SynthesisError, match="cannot place"):
        img2img_scheduler(schedule, 10, 20, 3)


def test_seeded_valid_dataset(setup) -> None:
    tmp, adapter, seeds = setup["tmp"], setup["adapter"], setup["seeds"]
    a = synthesize(adapter, seeds, tmp / "a", 3, steps=4, score_threshold=0.0, seed=5, progress=False)
    b = synthesize(adapter, seeds, tmp / "b", 3, steps=4, score_threshold=0.0, seed=5, progress=False)
    synthesize(adapter, seeds, tmp / "c", 3, steps=4, score_threshold=0.0, seed=6, progress=False)
    data = load_coco(tmp / "a")
    assert data["categories"] == load_coco(seeds)["categories"]
    assert len(data["images"]) == 3 and a["boxes"] == len(data["annotations"]) > 0
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= 32 and y + h <= 32
        assert ann["area"] == pytest.approx(w * h, rel=1e-5)
    assert all(0.4 <= im["strength"] <= 0.8 for im in data["images"])
    assert _folder_bytes(tmp / "a") == _folder_bytes(tmp / "b")
    assert _folder_bytes(tmp / "a") != _folder_bytes(tmp / "c")
    assert a["images_per_s"] > 0 and b["new_images"] == 3
    again = synthesize(adapter, seeds, tmp / "a", 3, steps=4, score_threshold=0.0, seed=5, progress=False)
    assert again["new_images"] == 0 and _folder_bytes(tmp / "a") == _folder_bytes(tmp / "b")


def test_resume_after_kill(setup) -> None:
    tmp, seeds = setup["tmp"], setup["seeds"]
    out, n, steps = tmp / "killed", 6, 30
    # the killed run's threads are this process's: CPU kernels round by thread count, and the bytes are compared
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(setup["script"]), str(tmp / "unet2"), str(seeds), str(out), str(n),
                             str(steps)], env=env, cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / PARTS).is_dir() and len(list((out / PARTS).glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    parts = {p.stem for p in (out / PARTS).glob("*.json")}
    assert 2 <= len(parts) < n and not (out / ANNOTATIONS).exists()
    assert parts <= {p.stem for p in (out / IMAGES).glob("*.png")}  # a finished part always has its image
    adapter = setup["adapter"]
    resumed = synthesize(adapter, seeds, out, n, steps=steps, score_threshold=0.0, progress=False)
    assert resumed["new_images"] == n - len(parts)
    whole = synthesize(adapter, seeds, tmp / "whole", n, steps=steps, score_threshold=0.0, progress=False)
    assert whole["new_images"] == n
    assert _folder_bytes(out) == _folder_bytes(tmp / "whole")


def test_bad_inputs(setup, tmp_path) -> None:
    adapter, seeds = setup["adapter"], setup["seeds"]
    out = tmp_path / "run"
    synthesize(adapter, seeds, out, 1, steps=2, score_threshold=0.5, progress=False)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(SynthesisError, match="other settings .*score_threshold"):
        synthesize(adapter, seeds, out, 1, steps=2, score_threshold=0.3, progress=False)
    with pytest.raises(SynthesisError, match="num_images"):
        synthesize(adapter, seeds, out, 2, steps=2, score_threshold=0.5, progress=False)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(SynthesisError, match="not a synthesis run"):
        synthesize(adapter, seeds, foreign, 1, steps=2, progress=False)
    for kwargs, message in [({"strength": (0.8, 0.4)}, "strength"), ({"strength": (0.4, 1.5)}, "strength"),
                            ({"score_threshold": 1.0}, "score_threshold"), ({"steps": 0}, "steps")]:
        with pytest.raises(SynthesisError, match=message):
            synthesize(adapter, seeds, tmp_path / "x", 1, progress=False, **kwargs)
    other = export_scenes(tmp_path / "other", 2, size=32, classes=[0, 3], progress=False)  # digit0, square
    with pytest.raises(SynthesisError, match=r"\['circle'\] are not in the seed set"):
        synthesize(adapter, other, tmp_path / "y", 1, progress=False)
    empty = tmp_path / "empty"
    (empty / IMAGES).mkdir(parents=True)
    (empty / ANNOTATIONS).write_text(json.dumps({"info": {}, "images": [], "annotations": [],
                                                 "categories": [{"id": 1, "name": "digit0"}]}))
    with pytest.raises(CocoError, match="lists no images"):
        synthesize(adapter, empty, tmp_path / "z", 1, progress=False)
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z"))
    import shutil

    from difffeat.data.coco import save_image

    edited = shutil.copytree(seeds, tmp_path / "edited")
    synthesize(adapter, edited, tmp_path / "e", 1, steps=2, progress=False)
    save_image(edited / IMAGES / "000000.png", torch.zeros(3, 32, 32))  # same json, other pixels
    with pytest.raises(SynthesisError, match="other settings .*seeds"):
        synthesize(adapter, edited, tmp_path / "e", 1, steps=2, progress=False)


class _RecordingCache:
    """Stands in for a feature cache: records the calls synthesis makes."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.steps: list[int] = []

    def config(self) -> dict:
        return {"kind": "recording"}

    def reset(self, steps: int) -> None:
        self.calls.append("reset")
        self.steps.append(steps)

    def attach(self, unet):
        from contextlib import contextmanager

        @contextmanager
        def attached():
            handle = unet.register_forward_hook(lambda *_: self.calls.append("forward"))
            self.calls.append("attach")
            try:
                yield
            finally:
                handle.remove()
                self.calls.append("detach")

        return attached()


def test_cache_plugs_in(setup, tmp_path) -> None:
    cache = _RecordingCache()
    synthesize(setup["adapter"], setup["seeds"], tmp_path / "cached", 2, steps=4, cache=cache, progress=False)
    assert cache.calls[0] == "reset" and cache.calls.count("reset") == 2 and cache.calls.count("attach") == 2
    assert cache.calls.count("forward") == sum(cache.steps) and cache.calls[-1] == "detach"
    assert all(1 <= n <= 4 for n in cache.steps)
    settings = json.loads((tmp_path / "cached" / SETTINGS).read_text())
    assert settings["cache"] == {"kind": "recording"}


def test_synthesize_from_a_lightning_checkpoint(setup, tmp_path) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from difffeat.data.coco import CocoDetection, collate_detection
    from heads.detection import synthesize_from_checkpoint

    adapter = runpy.run_path(str(setup["script"]), run_name="lib")["build"](str(tmp_path / "unet"))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(adapter.train(), DataLoader(CocoDetection(setup["seeds"]), batch_size=2, collate_fn=collate_detection))
    trainer.save_checkpoint(tmp_path / "adapter.ckpt")
    loaded = synthesize_from_checkpoint(tmp_path / "adapter.ckpt", setup["seeds"], tmp_path / "loaded", 2, steps=3,
                                        score_threshold=0.0, progress=False)
    direct = synthesize(adapter.eval(), setup["seeds"], tmp_path / "direct", 2, steps=3, score_threshold=0.0,
                        progress=False)
    assert loaded["boxes"] == direct["boxes"] > 0
    assert _folder_bytes(tmp_path / "loaded") == _folder_bytes(tmp_path / "direct")
    from difffeat.cli import main

    main(["synthesize", "--checkpoint", str(tmp_path / "adapter.ckpt"), "--seeds", str(setup["seeds"]), "--out",
          str(tmp_path / "cli"), "--num_images", "2", "--steps", "3", "--score_threshold", "0.0"])
    assert _folder_bytes(tmp_path / "cli") == _folder_bytes(tmp_path / "direct")
    cached = synthesize_from_checkpoint(tmp_path / "adapter.ckpt", setup["seeds"], tmp_path / "cached", 2, steps=3,
                                        score_threshold=0.0, cache_interval=2, progress=False)
    assert cached["images"] == 2
    assert json.loads((tmp_path / "cached" / SETTINGS).read_text())["cache"]["interval"] == 2


def test_deepcache_interval_one_equals_no_cache(setup, tmp_path) -> None:
    cache_module = pytest.importorskip("difffeat.cache")
    seeds, adapter = setup["seeds"], setup["adapter"]
    plain = synthesize(adapter, seeds, tmp_path / "plain", 2, steps=6, score_threshold=0.0, progress=False)
    one = synthesize(adapter, seeds, tmp_path / "one", 2, steps=6, score_threshold=0.0, progress=False,
                     cache=cache_module.DeepCache(interval=1))
    three = synthesize(adapter, seeds, tmp_path / "three", 2, steps=6, score_threshold=0.0, progress=False,
                       cache=cache_module.DeepCache(interval=3, last_full=True, steps=6))
    images = {k: v for k, v in _folder_bytes(tmp_path / "plain").items() if k != ANNOTATIONS}
    assert {k: v for k, v in _folder_bytes(tmp_path / "one").items() if k != ANNOTATIONS} == images
    assert {k: v for k, v in _folder_bytes(tmp_path / "three").items() if k != ANNOTATIONS} != images
    assert plain["boxes"] == one["boxes"] and three["images"] == 2
