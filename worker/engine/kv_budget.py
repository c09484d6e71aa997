"""How big the paged KV cache is and how long a sequence may be, decided from the model's
config before its weights load.

- ``kv_cache_bytes`` given: that budget.
- On a GPU: ``gpu_memory_utilization`` of the device's memory, minus what other processes
  hold, the weights and a reserve for activations (vLLM's rule, estimated from the shapes
  rather than profiled).
- On the CPU: ``CPU_SHARE`` of the available RAM, at most ``CPU_MAX_BYTES``.
Either way never more than ``max_num_seqs`` sequences of ``max_model_len`` tokens can use.

``max_model_len`` given and not fitting is an error naming the settings to change; not
given, it is the model's limit, lowered (with a warning naming both figures) to what fits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.model.decoder import ModelArgs

log = logging.getLogger(__name__)

#: Share of the available RAM the CPU engine's KV cache may take by default.
CPU_SHARE = 0.25
#: Cap of the CPU default (vLLM's CPU backend default is the same 4 GiB).
CPU_MAX_BYTES = 4 * 2**30
#: Set aside on a GPU beyond weights and activations: the CUDA context, cuBLAS workspaces,
#: captured graphs' pools, the allocator's fragmentation.
GPU_OVERHEAD_BYTES = 1 * 2**30
#: Share of the RAM left after the KV cache that merged adapter weights may take.
MERGE_SHARE = 0.5
#: What turns merging off, named in its warning.
MERGE_OFF = "merge_after_steps=0 (LLM) / LORAFLEET_MERGE_AFTER_STEPS=0 (worker)"
#: Shortest usable context.
MIN_MODEL_LEN = 16

#: What an operator sets, named in errors: (in-process ``LLM`` argument, worker flag and
#: variable).
RAISE_CACHE = "kv_cache_bytes (LLM) / --kv-cache-mb, LORAFLEET_KV_CACHE_MB (worker)"
LOWER_LEN = "max_model_len (LLM) / --max-model-len, LORAFLEET_MAX_MODEL_LEN (worker)"


class KVBudgetError(ValueError):
    """The KV cache cannot hold the context asked for; the message names the settings."""


@dataclass(frozen=True)
class KVBudget:
    """The cache's blocks, the context length served, and where the budget came from."""

    num_blocks: int
    block_size: int
    max_model_len: int
    token_bytes: int
    source: str

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def cache_bytes(self) -> int:
        return self.num_tokens * self.token_bytes


def kv_token_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token across all layers."""
    return 2 * args.num_layers * args.num_kv_heads * args.head_dim * dtype.itemsize


def weight_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters (tied embeddings counted once)."""
    h, v = args.hidden_size, args.vocab_size
    per_layer = sum(i * o for i, o in args.linear_shapes().values()) + 2 * h
    embeddings = v * h * (1 if args.tie_word_embeddings else 2)
    return (args.num_layers * per_layer + embeddings + h) * dtype.itemsize


def activation_bytes(config: EngineConfig, args: ModelArgs, dtype: torch.dtype) -> int:
    """A bound on one step's transient tensors: a full token budget through the widest
    layer (the MLP's gate|up and their product, a few hidden-sized copies) and float32
    logits plus sampling buffers for every sequence."""
    tokens = config.max_num_batched_tokens
    per_token = (3 * args.intermediate_size + 6 * args.hidden_size) * dtype.itemsize
    logits = config.max_num_seqs * args.vocab_size * 4 * 4
    return tokens * per_token + logits


def available_ram() -> int:
    """Bytes of RAM available to new allocations (``MemAvailable``), else total RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memory_budget(
    config: EngineConfig, args: ModelArgs, dtype: torch.dtype, device: torch.device
) -> tuple[int, str]:
    """(bytes the cache may take, how that was decided)."""
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes, f"kv_cache_bytes={config.kv_cache_bytes}"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        share = config.gpu_memory_utilization
        others = total - free
        reserved = weight_bytes(args, dtype) + activation_bytes(config, args, dtype)
        budget = int(total * share) - others - reserved - GPU_OVERHEAD_BYTES
        source = (
            f"gpu_memory_utilization={share:g} of {total / 2**30:.1f} GiB, less "
            f"{others / 2**30:.1f} GiB used by others and {reserved / 2**30:.1f} GiB of "
            f"weights and activations"
        )
        return budget, source
    ram = available_ram()
    budget = min(int(ram * CPU_SHARE), CPU_MAX_BYTES)
    return budget, f"{CPU_SHARE:.0%} of {ram / 2**30:.1f} GiB available RAM, at most 4 GiB"


def plan_kv_cache(
    config: EngineConfig, args: ModelArgs, dtype: torch.dtype, device: torch.device
) -> KVBudget:
    """Size the KV cache and the context length. Raises ``KVBudgetError``."""
    limit = args.max_position_embeddings
    wanted = config.max_model_len
    if wanted is not None and wanted > limit:
        raise KVBudgetError(
            f"max_model_len {wanted} is longer than the model's limit of {limit} tokens "
            f"(max_position_embeddings in config.json); lower {LOWER_LEN}"
        )
    token_bytes = kv_token_bytes(args, dtype)
    block_bytes = config.block_size * token_bytes
    budget, source = _memory_budget(config, args, dtype, device)
    useful = config.max_num_seqs * (wanted or limit) + config.block_size
    num_blocks = max(0, min(budget // block_bytes, -(-useful // config.block_size)))
    fits = num_blocks * config.block_size
    mib = num_blocks * block_bytes / 2**20
    if wanted is not None and fits < wanted:
        raise KVBudgetError(
            f"the KV cache ({source}) holds {fits} tokens ({mib:.0f} MiB), fewer than "
            f"max_model_len {wanted}: raise {RAISE_CACHE}, or lower {LOWER_LEN}"
        )
    if fits < MIN_MODEL_LEN:
        raise KVBudgetError(
            f"the KV cache ({source}) holds only {fits} tokens ({mib:.0f} MiB): raise "
            f"{RAISE_CACHE}" + (", or gpu_memory_utilization" if device.type == "cuda" else "")
        )
    served = wanted or min(limit, fits)
    if served < limit and wanted is None:
        log.warning(
            "max_model_len lowered from the model's %d to %d tokens: that is what the KV cache "
            "(%s, %.0f MiB) holds; raise %s for longer contexts",
            limit,
            served,
            source,
            mib,
            RAISE_CACHE,
        )
    return KVBudget(num_blocks, config.block_size, served, token_bytes, source)


def merging_fits(args: ModelArgs, dtype: torch.dtype, budget: KVBudget) -> bool:
    """Whether one merged copy of every LoRA linear's weight (``merge_after_steps``) takes
    at most ``MERGE_SHARE`` of the RAM left after the KV cache (call it once the weights are
    loaded and before the cache is); warns when not."""
    need = args.num_layers * sum(i * o for i, o in args.linear_shapes().values()) * dtype.itemsize
    left = available_ram() - budget.cache_bytes
    if need <= left * MERGE_SHARE:
        return True
    log.warning(
        "adapters will not be merged into the weights for long single-adapter streams: a copy "
        "of the LoRA linears' weights (%.0f MiB) would take over %.0f%% of the RAM left after "
        "the KV cache (%.0f MiB); set %s to silence this",
        need / 2**20,
        MERGE_SHARE * 100,
        left / 2**20,
        MERGE_OFF,
    )
    return False
