"""Engine configuration: one dataclass, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafleet.worker.hub import HUB_MODES


@dataclass
class EngineConfig:
    """Settings of one engine (one process, one device).

    ``model`` is a Hugging Face model folder or a catalog name (``lorafleet.worker.catalog``,
    e.g. ``smollm2``; prepared on first use). ``device`` is a torch device name, or ``auto``
    (the default) for CUDA when there is a GPU. ``num_threads`` sets torch's CPU threads for
    the whole process (None: torch's default). ``kv_cache_bytes`` is the memory budget of
    the paged KV cache; ``None`` sizes it from the device's memory
    (``gpu_memory_utilization`` of a GPU, a bounded share of RAM on the CPU) and
    ``max_model_len`` ``None`` is the model's limit, lowered to what the cache holds (see
    ``lorafleet.worker.kv_budget``). ``adapter_roots`` ``None`` means any local path may
    be loaded (the in-process ``LLM`` default: its caller is the operator); a tuple confines
    adapters to those folders, and an empty tuple allows no local adapter at all (a worker
    whose ``LORAFLEET_ADAPTER_ROOTS`` is unset). ``hub`` says whether adapters named by a hub
    id (``org/name``) are fetched: ``off``, ``offline`` (local hub cache only) or ``online``
    (see ``lorafleet.worker.hub``). An adapter that failed to load is refused without
    touching the disk again for ``adapter_failure_ttl`` seconds (0: always retry).
    ``cuda_graphs`` replays decode steps from captured CUDA graphs (see
    ``lorafleet.worker.decode_graphs``); on a CPU the same padded static path runs eagerly,
    which only tests use. ``pipelined``: on CUDA, each step is scheduled and queued before
    the previous one is read back, so the host's work overlaps the GPU's (see
    ``LLMEngine.step``); off, and always on the CPU, each step is read back as soon as it is
    queued. ``max_cpu_loras`` defaults to ``max(max_loras, 32)``. ``served_model_name`` is what a
    ``LoRARequest.base_model_name`` must match (default: the model folder's name).
    """

    model: str
    device: str = "auto"
    dtype: str = "auto"
    enable_lora: bool = True
    max_loras: int = 4
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    num_threads: int | None = None
    block_size: int = 16
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    adapter_roots: tuple[str, ...] | None = None
    max_adapter_bytes: int = 2 * 2**30
    adapter_failure_ttl: float = 30.0
    hub: str = "off"
    hub_cache_dir: str | None = None
    starvation_steps: int = 64
    served_model_name: str | None = None
    seed: int = 0
    cuda_graphs: bool = False
    pipelined: bool = True

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a Hugging Face model folder")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                f"dtype must be one of auto, float32, float16, bfloat16; got {self.dtype!r}"
            )
        for name in ("max_loras", "max_lora_rank", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = max(self.max_loras, 32)
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.starvation_steps < 1:
            raise ValueError("starvation_steps must be >= 1")
        if self.adapter_failure_ttl < 0:
            raise ValueError(f"adapter_failure_ttl must be >= 0, got {self.adapter_failure_ttl}")
        if self.hub not in HUB_MODES:
            raise ValueError(f"hub must be one of {', '.join(HUB_MODES)}; got {self.hub!r}")
        if self.adapter_roots is not None:
            self.adapter_roots = tuple(str(Path(r).resolve()) for r in self.adapter_roots)
