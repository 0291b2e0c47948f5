"""Can DiffewS's support path learn at all? Memorising a few counterfactual pairs, against the query-only control.

A counterfactual pair is one query with two targets (two classes present in it) and the supports that say
which. A model that ignores its support cannot fit both targets of a pair; one that reads its support can
memorise them. Both models (:class:`heads.fewshot_diffews.DiffewS` and its ``query_only`` control) start
from the same weights and train on the *same* ``--pairs`` base-class pairs of fold 0, repeated, for
``--steps`` steps; the table gives the pair loss on those training pairs, and the mean absolute change of
the logits when each query is given its partner's support instead of its own (0 when the support is
ignored). If DiffewS fits the pairs far below the query-only floor, its support path works and a
benchmark that shows no support use is a matter of budget or of transfer to novel classes; if not, the
support path itself is at fault.

Run: ``python -m experiments.fewshot_support_check`` (writes ``experiments/results/fewshot_support_check.md``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from difffeat.data.episodes import FewShotDataModule
from difffeat.store import atomic_write
from experiments.fewshot_benchmark import CONFIG, RESULTS, SCENES, SIZE, partner
from experiments.probe_digits import ensure_backbone
from heads.fewshot_diffews import DiffewS, mask_loss


def run(backbone: str, query_only: bool, batches: list[dict], steps: int, lr: float) -> dict:
    L.seed_everything(0, verbose=False)
    model = DiffewS(backbone, query_only=query_only).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    curve = []
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = mask_loss(model(b["support"], b["support_mask"], b["query"]), b["query_mask"], b["query_ignore"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(float(loss))
    model.eval()
    losses, moves = [], []
    with torch.no_grad():
        for b in batches:
            own = model(b["support"], b["support_mask"], b["query"])
            swap = model(partner(b["support"]), partner(b["support_mask"]), b["query"])
            losses.append(float(mask_loss(own, b["query_mask"], b["query_ignore"])))
            moves.append(float((own - swap).abs().mean() / own.std()))
    return {"loss": float(np.mean(losses)), "move": 100 * float(np.mean(moves)), "curve": curve}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--backbone", help="default: configs/ddpm_scenes_attn2.yaml's trained U-Net")
    parser.add_argument("--out", default=str(RESULTS / "fewshot_support_check.md"))
    args = parser.parse_args(argv)
    began = time.perf_counter()
    backbone = args.backbone or str(ensure_backbone(CONFIG))
    data = FewShotDataModule(fold=0, size=SIZE, train_episodes=2 * args.pairs, counterfactual=True, cache_scenes=True,
                             **SCENES)
    episodes = data.episodes(True)
    batches = list(DataLoader(Subset(episodes, range(2 * args.pairs)), batch_size=8))  # whole pairs per batch
    rows = {name: run(backbone, q, batches, args.steps, args.lr) for name, q in
            (("DiffewS", False), ("DiffewS query-only", True))}
    lines = ["| model | pair loss on the memorised pairs | Δ logits with the partner's support (% of logit std) |",
             "|---|---|---|"]
    lines += [f"| {k} | {v['loss']:.3f} | {v['move']:.2f} |" for k, v in rows.items()]
    lines += ["", "Training loss every 25 steps: " + "; ".join(
        f"{k}: " + ", ".join(f"{x:.2f}" for x in v["curve"][::25]) for k, v in rows.items())]
    cli, minutes = " ".join(argv or []), (time.perf_counter() - began) / 60
    doc = f"""# Can the support path learn? Memorising counterfactual pairs

Written by `python -m experiments.fewshot_support_check {cli}` in {minutes:.1f} min: {args.pairs} base-class
counterfactual pairs of fold 0 ({SIZE}-px scenes), {args.steps} AdamW steps at lr {args.lr}, batches of 4 pairs,
both models from `{backbone.split('/')[-1]}` with the same seed.

{chr(10).join(lines)}
"""
    atomic_write(Path(args.out), doc.encode())
    print(doc)


if __name__ == "__main__":
    main()
