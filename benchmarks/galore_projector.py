"""GaLore projection refresh: the randomized range finder vs galore-torch's exact SVD, time and error.

The matrices are real gradients: one backward pass (8 x 128 tokens) of a one-layer Llama block
with the matrix among its weights (``o_proj`` of a hidden-1024 and of a hidden-4096 block,
``down_proj`` (2048 x 5632) of a hidden-2048, MLP-5632 block). ``svd`` is galore-torch's own
``get_orthogonal_matrix`` (a full ``torch.linalg.svd``; ranks 128 and 256 slice the same
factorisation, so it is timed once per matrix: tens of seconds at 4096 x 4096); ``randomized`` is
optiplug-galore's range finder with its defaults (oversampling 16, 2 power iterations, QR after
each), timed as the median of 3 repetitions. One torch thread; the error is ``|G - P(G)|_F / |G|_F`` with the
projection side galore's ``std`` picks. Targets: >= 10x faster at 2048 x 5632, rank 128, with an
error <= 1.05x the SVD's.

A training comparison follows: the ``tiny`` model trained 30 steps on 8 repeated blocks with each
projection (rank 8 + oversampling 4 < 64, so the randomized path is used), final losses side by
side (target: within 1%).
"""

from __future__ import annotations

import tempfile
import time

import _common

REPETITIONS = 3
RANKS = (128, 256)
OVERSAMPLING, POWER_ITERATIONS = 16, 2  # optiplug-galore's defaults
CASES = [  # (label, hidden, intermediate, parameter)
    ("1024x1024", 1024, 2816, "o_proj"),
    ("2048x5632", 2048, 5632, "down_proj"),
    ("4096x4096", 4096, 1024, "o_proj"),
]


def gradient(hidden: int, intermediate: int, name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
        num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return next(p.grad.detach().clone() for n, p in model.named_parameters() if n.endswith(f"{name}.weight"))


def svd_timed(grad):
    """One ``torch.linalg.svd(grad, full_matrices=False)``, what galore-torch's get_orthogonal_matrix runs
    (it then slices the factors: free), timed; returns (seconds, U, Vh)."""
    import torch

    start = time.perf_counter()
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return time.perf_counter() - start, u, vh


def refresh_rows() -> list[dict]:
    import torch
    from optiplug_galore import projector

    from optiplug import projection_sides

    def randomized(grad, rank, left, right):
        generator = torch.Generator().manual_seed(0)
        return projector.randomized_bases(
            grad, rank, left, right, oversampling=OVERSAMPLING, power_iterations=POWER_ITERATIONS, generator=generator
        )

    rows = []
    for label, hidden, intermediate, name in CASES:
        grad = gradient(hidden, intermediate, name)
        left, right = projection_sides(grad.shape, "std")
        timings = _common.interleaved(
            {
                f"randomized-{rank}": (
                    lambda rank=rank, grad=grad, left=left, right=right: _common.timed(
                        lambda: randomized(grad, rank, left, right)
                    )
                )
                for rank in RANKS
            },
            REPETITIONS,
        )
        svd_s, u, vh = svd_timed(grad)  # the slow baseline: once per matrix (tens of seconds at 4096 x 4096)
        for rank in RANKS:
            exact = projector.projection_error(grad, u[:, :rank] if left else None, vh[:rank] if right else None)
            approx = projector.projection_error(grad, *randomized(grad, rank, left, right))
            fast_s = _common.median(timings[f"randomized-{rank}"])
            rows.append(
                {
                    "matrix": label,
                    "rank": rank,
                    "svd_s": round(svd_s, 4),
                    "randomized_s": round(fast_s, 4),
                    "speedup": round(svd_s / fast_s, 1),
                    "svd_error": round(exact, 5),
                    "randomized_error": round(approx, 5),
                    "error_ratio": round(approx / exact, 4),
                }
            )
            print(rows[-1], flush=True)
    return rows


def training_rows() -> list[dict]:
    import optiplug

    rows = []
    data = _common.TokenDataset(
        n=8, seq_len=64, vocab=_common.MODEL_SIZES["tiny"].vocab
    )  # 8 blocks, seen again and again: learnable
    with tempfile.TemporaryDirectory() as tmp:
        for projection in ("svd", "randomized"):
            trainer = optiplug.OptiTrainer(
                model=_common.build_model("tiny", seed=0),
                args=_common.training_args(
                    f"{tmp}/{projection}", max_steps=30, per_device_train_batch_size=8, logging_strategy="steps", logging_steps=1
                ),
                train_dataset=data,
                optimizer={"name": "galore_adamw", "rank": 8, "oversampling": 4, "update_proj_gap": 10,
                           "projection": projection, "lr": 1e-2},
                scheduler={"name": "cosine", "warmup_steps": 3},
            )  # fmt: skip
            start = time.perf_counter()
            trainer.train()
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            rows.append({"projection": projection, "first_loss": round(losses[0], 5), "final_loss": round(losses[-1], 5),
                         "train_s": round(time.perf_counter() - start, 2)})  # fmt: skip
    return rows


def main() -> None:
    import torch

    torch.set_num_threads(1)
    rows = refresh_rows()
    training = training_rows()
    key = next(r for r in rows if r["matrix"] == "2048x5632" and r["rank"] == 128)
    svd_loss, rand_loss = (
        next(r["final_loss"] for r in training if r["projection"] == p) for p in ("svd", "randomized")
    )
    loss_gap = abs(rand_loss - svd_loss) / svd_loss
    targets = {
        "speedup_2048x5632_rank128": {"value": key["speedup"], "target": ">= 10", "met": key["speedup"] >= 10},
        "error_ratio_2048x5632_rank128": {
            "value": key["error_ratio"],
            "target": "<= 1.05",
            "met": key["error_ratio"] <= 1.05,
        },
        "training_loss_gap": {"value": round(loss_gap, 5), "target": "<= 0.01", "met": loss_gap <= 0.01},
    }
    notes = (
        f"Real gradients of one-layer Llama blocks (8 x 128 tokens), one torch thread. svd = one "
        f"torch.linalg.svd(full_matrices=False) per matrix, which galore-torch's get_orthogonal_matrix runs at every "
        f"refresh (both ranks slice it); randomized = oversampling {OVERSAMPLING}, {POWER_ITERATIONS} power "
        f"iterations, median of {REPETITIONS} repetitions. 2048x5632 at rank 128: {key['speedup']}x "
        f"faster, error ratio {key['error_ratio']}. Training ('tiny' model, 30 steps, rank 8, gap 10, lr 1e-2): "
        f"final loss svd {svd_loss}, randomized {rand_loss} (gap {loss_gap:.3%})."
    )
    for row in training:
        print(row)
    print(targets)
    _common.write_results(
        _common.script_name(__file__),
        "GaLore projection refresh: randomized range finder vs exact SVD",
        rows,
        notes,
        training=training,
        targets=targets,
        chart={"x": "matrix", "y": ["svd_s", "randomized_s"], "kind": "bar", "ylabel": "seconds per refresh"},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
