"""``lorafleet make-adapters``: random PEFT adapters that fit a model, for load tests."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lorafleet.worker.cli.errors import UsageError

ALL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


NAME = "make-adapters"
HELP = "write N random PEFT LoRA adapters that fit a model (for load tests)"
DESCRIPTION = (
    "Write COUNT random LoRA adapters for the model in --model, in PEFT's format "
    "(adapter_config.json + adapter_model.safetensors), as OUT/adapter-0000, ... "
    "Weights are random (seeded): use them to measure, not to generate text."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="Hugging Face model folder, or a catalog name (smollm2)"
    )
    p.add_argument("--count", type=int, required=True, help="number of adapters")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--out", required=True, help="folder to write the adapters into")
    p.add_argument("--alpha", type=float, help="lora_alpha (default 2 x rank)")
    p.add_argument(
        "--targets",
        default=ALL_TARGETS,
        help="comma-separated target modules (default: all seven projections)",
    )
    p.add_argument("--seed", type=int, default=0, help="adapter i uses seed SEED + i (default 0)")


def run(args: argparse.Namespace) -> int:
    from lorafleet.worker.model.catalog import local_model

    model = local_model(args.model)
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {model}/config.json: {e}") from None
    if args.count < 1 or args.rank < 1:
        raise UsageError("--count and --rank must be >= 1")
    from lorafleet.worker.demo.synthetic import build_random_adapter

    out = Path(args.out)
    width = max(4, len(str(args.count - 1)))
    # std 1/sqrt(hidden) keeps each adapter's update a modest fraction of the base layer's
    # output at any model width (a fixed std blows up activations on wide models).
    std = config["hidden_size"] ** -0.5
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    started = time.monotonic()
    for i in range(args.count):
        try:
            build_random_adapter(
                model,
                out / f"adapter-{i:0{width}d}",
                rank=args.rank,
                alpha=args.alpha or 2.0 * args.rank,
                target_modules=targets,
                seed=args.seed + i,
                std=std,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
    print(
        f"wrote {args.count} rank-{args.rank} adapters for {model} to {out} "
        f"in {time.monotonic() - started:.1f}s"
    )
    return 0
