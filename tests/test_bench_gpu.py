"""experiments/bench_gpu.py cannot rot between GPU runs: configs build, the CPU smoke run works, no GPU skips."""

from __future__ import annotations

import pytest
import torch

from experiments import bench_gpu


@pytest.mark.parametrize("model", bench_gpu.MODELS, ids=lambda m: m.name)
def test_full_size_configs_build_and_name_a_real_tap(model) -> None:
    backbone = bench_gpu.build(model, torch.device("meta"), torch.bfloat16, 64, smoke=False)  # no memory
    assert model.tap in backbone.tap_names()
    assert backbone.latent_channels == model.latent_channels
    assert next(backbone.model.parameters()).dtype == torch.bfloat16


def test_without_a_gpu_it_skips_saying_so(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_gpu, "RESULTS", tmp_path)
    assert bench_gpu.main([]) is None
    assert "no CUDA GPU" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_smoke_run_measures_every_family(capsys) -> None:
    table = bench_gpu.main(["--smoke", "--n", "2", "--batch-size", "2"])
    rows = [line for line in table.splitlines() if line.startswith("| ") and "img/s" not in line]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [m.name for m in bench_gpu.MODELS]
    assert all(float(r.split(" | ")[4].split()[0]) > 0 for r in rows)
