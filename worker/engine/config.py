"""Engine configuration: one dataclass, validated once at construction.

Torch-free: the queue worker builds its engine's configuration from ``LORAFLEET_*``
variables (``lorafleet.worker.serve.settings``) with the same fields and the same checks,
so every setting of the engine is declared here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from lorafleet.worker.adapters.hub import HUB_MODES
from lorafleet.worker.adapters.policy import AdapterPolicy

#: A problem with one field: (field, message). The message may name other fields as
#: ``{field}`` placeholders, which ``describe`` fills with what the user calls them.
Problem = tuple[str, str]


class EngineConfigError(ValueError):
    """The configuration is invalid: ``problems`` lists every one."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(describe(p) for p in problems))


def describe(problem: Problem, labels: Mapping[str, str] | None = None) -> str:
    """A problem as one sentence, each field named by ``labels`` (default: its own name)."""
    field, message = problem
    names = {f.name: f.name for f in fields(EngineConfig)} | dict(labels or {})
    return f"{names[field]} {message.format_map(names)}"


@dataclass
class EngineConfig:
    """Settings of one engine (one process, one device).

    ``model`` is a Hugging Face model folder or a catalog name (``lorafleet.worker.model.catalog``,
    e.g. ``smollm2``; prepared on first use). ``device`` is a torch device name, or ``auto``
    (the default) for CUDA when there is a GPU. ``num_threads`` sets torch's CPU threads for
    the whole process (None: torch's default). ``kv_cache_bytes`` is the memory budget of
    the paged KV cache; ``None`` sizes it from the device's memory
    (``gpu_memory_utilization`` of a GPU, a bounded share of RAM on the CPU) and
    ``max_model_len`` ``None`` is the model's limit, lowered to what the cache holds (see
    ``lorafleet.worker.engine.kv_budget``). ``adapter_roots`` ``None`` means any local path may
    be loaded (the in-process ``LLM`` default: its caller is the operator); a tuple confines
    adapters to those folders, and an empty tuple allows no local adapter at all (a worker
    whose ``LORAFLEET_ADAPTER_ROOTS`` is unset). ``hub`` says whether adapters named by a hub
    id (``org/name``) are fetched: ``off``, ``offline`` (local hub cache only) or ``online``
    (see ``lorafleet.worker.adapters.hub``). An adapter that failed to load is refused without
    touching the disk again for ``adapter_failure_ttl`` seconds (0: always retry).
    ``cuda_graphs`` replays decode steps from captured CUDA graphs (see
    ``lorafleet.worker.engine.decode_graphs``); on a CPU the same padded static path runs eagerly,
    which only tests use. ``pipelined``: on CUDA, each step is scheduled and queued before
    the previous one is read back, so the host's work overlaps the GPU's (see
    ``LLMEngine.step``); off, and always on the CPU, each step is read back as soon as it is
    queued. ``max_cpu_loras`` defaults to ``max(max_loras, 32)``. ``served_model_name`` is what a
    ``LoRARequest.base_model_name`` must match (default: the model folder's name).
    ``prefetch_adapters``: in the engine process, adapters of queued jobs the worker names
    are read by a background thread while the engine steps
    (``lorafleet.worker.adapters.prefetch``). ``merge_after_steps``: on the CPU in float32,
    a stream whose steps all ran on one adapter for this many steps in a row runs on the
    weights merged with it, as fast as the base model (``lorafleet.kernels.segmented.HotSlot``;
    memory: one more copy of the LoRA linears' weights, allocated at start-up, and only
    when such copies of every LoRA linear take at most half the RAM left after the
    KV cache); 0: never merge.

    Raises ``EngineConfigError`` listing every problem.
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
    prefetch_adapters: bool = True
    # Merge once the unmerged steps have cost about what a merge does (SmolLM2-135M, 2-core
    # VM: a merge 0.09 s, an unmerged step about 4 ms over the base model's): as in ski
    # rental, never more than twice the cost of the best choice made knowing the future.
    merge_after_steps: int = 16

    def __post_init__(self) -> None:
        problems = check(vars(self))
        if problems:
            raise EngineConfigError(problems)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = max(self.max_loras, 32)
        if self.adapter_roots is not None:
            self.adapter_roots = tuple(str(Path(r).resolve()) for r in self.adapter_roots)

    def adapter_policy(self) -> AdapterPolicy:
        """The settings the engine's ``AdapterManager`` reads."""
        return AdapterPolicy(**{f.name: getattr(self, f.name) for f in fields(AdapterPolicy)})

    @staticmethod
    def defaults() -> dict[str, Any]:
        """Each field's default (``model`` has none)."""
        return {f.name: f.default for f in fields(EngineConfig) if f.default is not MISSING}


def check(values: Mapping[str, Any]) -> list[Problem]:
    """Every problem with ``values`` (``EngineConfig`` fields; missing ones take their
    defaults), in field order."""
    v = {**EngineConfig.defaults(), **values}
    problems: list[Problem] = []

    def need(ok: bool, field: str, message: str) -> None:
        if not ok:
            got = repr(v[field]).replace("{", "{{").replace("}", "}}")  # not a placeholder
            problems.append((field, f"{message}, got {got}"))

    need(bool(v.get("model")), "model", "must name a Hugging Face model folder or a catalog model")
    need(
        v["dtype"] in ("auto", "float32", "float16", "bfloat16"),
        "dtype",
        "must be one of auto, float32, float16, bfloat16",
    )
    need(
        v["device"] in ("auto", "cpu", "cuda") or str(v["device"]).startswith("cuda:"),
        "device",
        "must be auto, cpu, cuda or cuda:N",
    )
    for name in ("max_loras", "max_lora_rank", "max_num_seqs", "max_num_batched_tokens"):
        need(v[name] >= 1, name, "must be >= 1")
    for name in ("max_cpu_loras", "max_model_len", "num_threads", "kv_cache_bytes"):
        need(v[name] is None or v[name] >= 1, name, "must be >= 1")
    block = v["block_size"]
    need(block >= 1 and not block & (block - 1), "block_size", "must be a power of two")
    if v["max_cpu_loras"] is not None and v["max_cpu_loras"] < v["max_loras"] >= 1:
        problems.append(
            ("max_cpu_loras", f"({v['max_cpu_loras']}) must be >= {{max_loras}} ({v['max_loras']})")
        )
    need(0 < v["gpu_memory_utilization"] <= 1, "gpu_memory_utilization", "must be in (0, 1]")
    need(v["max_adapter_bytes"] >= 1, "max_adapter_bytes", "must be >= 1")
    need(v["starvation_steps"] >= 1, "starvation_steps", "must be >= 1")
    need(v["merge_after_steps"] >= 0, "merge_after_steps", "must be >= 0 (0: never merge)")
    need(v["adapter_failure_ttl"] >= 0, "adapter_failure_ttl", "must be >= 0")
    need(v["hub"] in HUB_MODES, "hub", f"must be one of {', '.join(HUB_MODES)}")
    return problems
