"""The README's learning-rate sweep: train the embedded job, then the saved model's loss on the corpus.

    OMP_NUM_THREADS=1 python plugins/schedulefree/benchmarks/lr_sweep.py \
        "examples/schedule-free.yaml:optimizer.lr=3e-3,training.output_dir=outputs/sf-3e-3" \
        "examples/adamw.yaml:optimizer.lr=6e-3,training.output_dir=outputs/aw-6e-3"

Each argument is ``CONFIG:OVERRIDE,OVERRIDE,...``; one JSON line per run: the last logged training
loss (at y for schedule-free) and the mean loss of the model in the output directory (x) on the
first 256 blocks of the run's data, batches of 32.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optiplug
import optiplug.app
from optiplug.app.data import load_dataset


def saved_model_loss(output_dir: str, cfg: optiplug.app.RunConfig, blocks: int = 256, batch: int = 32) -> float:
    """Mean loss of the model saved in ``output_dir`` on the first ``blocks`` blocks of ``cfg``'s data."""
    dataset = load_dataset(cfg.data, AutoTokenizer.from_pretrained(output_dir))
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    losses = []
    with torch.no_grad():
        for start in range(0, min(len(dataset), blocks), batch):
            stop = min(start + batch, len(dataset), blocks)
            ids = torch.stack([torch.as_tensor(dataset[i]["input_ids"]) for i in range(start, stop)])
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return sum(losses) / len(losses)


def main(runs: list[str]) -> None:
    torch.set_num_threads(1)
    for run in runs:
        path, _, overrides = run.partition(":")
        over = [o for o in overrides.split(",") if o]
        start = time.time()
        result = optiplug.app.train(path, over)
        loss = saved_model_loss(str(result.output_dir), optiplug.app.load_config(path, over))
        line = {"config": path, "overrides": over, "final_train_loss": result.losses[-1][1], "saved_model_loss": loss}
        print(json.dumps({**line, "seconds": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
