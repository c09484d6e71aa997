"""Adapter tiers: disk (PEFT folders) -> CPU cache (LRU) -> device slots (LRU over idle slots).

A slot is a row of the slot stacks inside every ``LoRALinear``. A slot holding an adapter
that a running sequence uses is pinned (reference count > 0); only idle slots are evicted.

Below the CPU tier sits a negative cache: an adapter whose load failed is refused from
memory, with the original reason, for ``adapter_failure_ttl`` seconds, so a thousand jobs
naming a broken or missing adapter cost one disk (or hub) lookup, not a thousand.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import torch

from lorafleet.producer.errors import (
    AdapterConflictError,
    AdapterInvalidError,
    AdapterNotFoundError,
    AdapterPathForbiddenError,
    LoRADisabledError,
    LoraFleetError,
)
from lorafleet.producer.types import LoRARequest
from lorafleet.worker.adapters.hub import fetch_adapter, hub_cache_root, looks_like_hub_id
from lorafleet.worker.adapters.peft_adapter import AdapterWeights, load_peft_adapter
from lorafleet.worker.adapters.policy import AdapterPolicy
from lorafleet.worker.adapters.stats import AdapterStats
from lorafleet.worker.model.decoder import CausalLM, LoRALinear


class ReadsAhead(Protocol):
    """What ``load`` needs of a prefetcher (``lorafleet.worker.adapters.prefetch``)."""

    def finish(self, req: LoRARequest) -> bool:
        """Wait for a read under way of ``req``'s adapter and cache it; True if cached."""
        ...


#: Failed adapters remembered at once; beyond it the oldest failure is forgotten (and its
#: adapter retried), so a flood of distinct bad names cannot grow the cache without bound.
MAX_REMEMBERED_FAILURES = 4096


class AdapterManager:
    def __init__(self, model: CausalLM, config: AdapterPolicy, served_model_name: str) -> None:
        self.args = model.args
        self.config = config
        self.served_model_name = served_model_name
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.num_slots = config.max_loras
        self.linears: dict[tuple[int, str], tuple[LoRALinear, int]] = model.lora_linears()
        self._unique_linears = list({id(lin): lin for lin, _ in self.linears.values()}.values())
        if config.enable_lora:
            for linear in self._unique_linears:
                linear.allocate_slots(
                    self.num_slots, config.max_lora_rank, config.merge_after_steps
                )
        # Host-side: the step's LoRAMeta uploads it with the rest of its metadata.
        self.slot_ranks = [0] * self.num_slots
        self.slot_owner: list[int | None] = [None] * self.num_slots
        self._slot_by_id: dict[int, int] = {}  # slot_owner inverted: looked up per sequence
        self.slot_refs = [0] * self.num_slots
        self.slot_used_at = [0] * self.num_slots
        self._clock = 0
        self.cpu: OrderedDict[int, AdapterWeights] = OrderedDict()
        self.identities: dict[int, tuple[str, str]] = {}
        # (lora_name, lora_path) -> (monotonic expiry, the error its load raised)
        self.failures: OrderedDict[tuple[str, str], tuple[float, LoraFleetError]] = OrderedDict()
        self.stats = AdapterStats()
        #: Reads ahead (set by the engine process when prefetch is on); ``load`` waits for
        #: an adapter's read under way there instead of reading it a second time.
        self.prefetcher: ReadsAhead | None = None
        self._prefetched: set[int] = set()  # in the CPU cache, read ahead, not yet used

    # -- identity and location -------------------------------------------------------------

    def check(self, req: LoRARequest) -> None:
        """Reject requests that can never be served: LoRA off, id reuse, wrong base model."""
        if not self.config.enable_lora:
            raise LoRADisabledError(
                f"adapter {req.lora_name!r} requested but LoRA is disabled (enable_lora=False)"
            )
        known = self.identities.get(req.lora_int_id)
        if known is not None and known != (req.lora_name, req.lora_path):
            raise AdapterConflictError(
                f"lora_int_id {req.lora_int_id} is already bound to adapter {known[0]!r} at "
                f"{known[1]!r}; got {req.lora_name!r} at {req.lora_path!r}. "
                f"Use a new id for a different adapter."
            )
        if req.base_model_name and req.base_model_name not in self._model_names():
            raise AdapterInvalidError(
                f"adapter {req.lora_name!r} is for base model {req.base_model_name!r}, "
                f"but this worker serves {self.served_model_name!r}"
            )

    def _model_names(self) -> set[str]:
        return {self.served_model_name, Path(self.served_model_name).name, self.config.model}

    def _folder(self, req: LoRARequest) -> Path:
        """The adapter's local folder, confined to the allowed roots (or, for a hub id, to
        the hub cache). Raises typed errors naming the adapter."""
        path = Path(req.lora_path).expanduser()
        if not path.is_absolute() and not path.exists() and self.config.hub == "off":
            as_hub_id = (
                " (as a hub id: fetching adapters from a hub is disabled here, LORAFLEET_HUB "
                "is 'off')"
                if looks_like_hub_id(req.lora_path)
                else ""
            )
            raise AdapterNotFoundError(
                f"adapter {req.lora_name!r}: lora_path {req.lora_path!r} is relative and names "
                f"no folder from the worker's working directory ({Path.cwd()}){as_hub_id}: "
                "use an absolute path, as the worker sees it"
            )
        # vLLM's order: an existing local folder first, else a hub id.
        if looks_like_hub_id(req.lora_path) and not path.exists():
            cfg = self.config
            folder = fetch_adapter(
                req.lora_path, req.lora_name, mode=cfg.hub, cache_dir=cfg.hub_cache_dir
            )
            return self._confined(req, folder, (str(hub_cache_root(cfg.hub_cache_dir)),))
        roots = self.config.adapter_roots
        if roots == ():
            raise AdapterPathForbiddenError(
                f"adapter {req.lora_name!r}: this worker loads no local adapters (no adapter "
                f"roots configured: set LORAFLEET_ADAPTER_ROOTS)"
            )
        # Confinement is checked before existence: nothing is revealed about other paths.
        if roots is not None and not _inside(path.resolve(), roots):
            raise AdapterPathForbiddenError(
                f"adapter {req.lora_name!r}: {req.lora_path!r} resolves outside the allowed "
                f"adapter roots {list(roots)}"
            )
        if not path.exists():
            raise AdapterNotFoundError(f"adapter {req.lora_name!r}: no folder at {req.lora_path!r}")
        return self._confined(req, path, roots)

    @staticmethod
    def _confined(req: LoRARequest, path: Path, roots: tuple[str, ...] | None) -> Path:
        if not path.is_dir():
            raise AdapterNotFoundError(
                f"adapter {req.lora_name!r}: {req.lora_path!r} is not a folder"
            )
        if roots is not None and not all(_inside(f.resolve(), roots) for f in path.iterdir()):
            raise AdapterPathForbiddenError(
                f"adapter {req.lora_name!r}: a file in {req.lora_path!r} links outside the "
                f"allowed adapter roots {list(roots)}"
            )
        return path

    # -- CPU tier --------------------------------------------------------------------------

    def load(self, req: LoRARequest) -> AdapterWeights:
        """The adapter's validated weights, from the CPU cache or from disk. Raises the
        typed error of a load that failed within ``adapter_failure_ttl`` without retrying."""
        self.check(req)
        cached = self.cpu.get(req.lora_int_id)
        if cached is None and self.prefetcher is not None and self.prefetcher.finish(req):
            cached = self.cpu.get(req.lora_int_id)
        if cached is not None:
            self.cpu.move_to_end(req.lora_int_id)
            self.stats.cpu_hits += 1
            if req.lora_int_id in self._prefetched:
                self._prefetched.discard(req.lora_int_id)
                self.stats.prefetch_used += 1
            return cached
        self._raise_recent_failure(req)
        start = time.perf_counter()
        try:
            weights = self._read(req)
        except LoraFleetError as err:
            self._remember_failure(req, err)
            raise
        self.stats.disk_loads += 1
        self.stats.disk_load_seconds += time.perf_counter() - start
        self._cache(req, weights)
        return weights

    def _cache(self, req: LoRARequest, weights: AdapterWeights) -> None:
        self.identities[req.lora_int_id] = (req.lora_name, req.lora_path)
        self.cpu[req.lora_int_id] = weights
        while len(self.cpu) > self.config.max_cpu_loras:
            evicted, _ = self.cpu.popitem(last=False)  # a slot keeps its own device copy
            self.stats.cpu_evictions += 1
            if evicted in self._prefetched:
                self._prefetched.discard(evicted)
                self.stats.prefetch_wasted += 1

    # -- reading ahead (prefetch) ----------------------------------------------------------

    def is_held(self, lora_id: int) -> bool:
        """True if the adapter is in the CPU cache or a device slot."""
        return lora_id in self.cpu or lora_id in self._slot_by_id

    def needs_read(self, req: LoRARequest) -> bool:
        """True if serving ``req`` would read its adapter from disk now: not held, and no
        recent failure of it is remembered."""
        if self.is_held(req.lora_int_id):
            return False
        failure = self.failures.get((req.lora_name, req.lora_path))
        return failure is None or failure[0] <= time.monotonic()

    def read_ahead(self, req: LoRARequest) -> AdapterWeights:
        """Read and validate ``req``'s adapter without touching the tiers: safe to call from
        a background thread (it reads settings only). Raises what ``load`` would."""
        if req.lora_int_id in self.identities:  # checked again on adopt, on this thread
            self.check(req)
        return self._read(req)

    def adopt(self, req: LoRARequest, weights: AdapterWeights, seconds: float) -> bool:
        """Cache weights read ahead (``read_ahead``, ``seconds`` of reading) unless the
        adapter got there meanwhile or its id is now bound to another adapter. Returns
        whether they were cached."""
        try:
            self.check(req)
        except LoraFleetError:
            return False
        if self.is_held(req.lora_int_id):
            self.stats.prefetch_wasted += 1
            return False
        self.stats.disk_loads += 1
        self.stats.disk_load_seconds += seconds
        self.stats.prefetch_loads += 1
        self._prefetched.add(req.lora_int_id)
        self._cache(req, weights)
        return True

    def _read(self, req: LoRARequest) -> AdapterWeights:
        try:
            return load_peft_adapter(
                self._folder(req),
                req.lora_name,
                self.args,
                self.config.max_lora_rank,
                self.dtype,
                self.config.max_adapter_bytes,
            )
        except LoraFleetError:
            raise
        except Exception as e:
            # Unreadable files, odd paths, a parser choking on a hostile file: the request's
            # fault, answered as a value. Left to propagate, it would fail the whole batch.
            raise AdapterInvalidError(
                f"adapter {req.lora_name!r}: cannot read {req.lora_path!r}: {type(e).__name__}: {e}"
            ) from None

    def _raise_recent_failure(self, req: LoRARequest) -> None:
        key = (req.lora_name, req.lora_path)
        failure = self.failures.get(key)
        if failure is None:
            return
        expiry, err = failure
        left = expiry - time.monotonic()
        if left <= 0:
            del self.failures[key]
            return
        self.stats.failure_cache_hits += 1
        raise type(err)(f"{err.message} (remembered; the adapter is retried in {left:.0f}s)")

    def _remember_failure(self, req: LoRARequest, err: LoraFleetError) -> None:
        self.stats.disk_load_failures += 1
        ttl = self.config.adapter_failure_ttl
        if ttl <= 0:
            return
        key = (req.lora_name, req.lora_path)
        self.failures[key] = (time.monotonic() + ttl, err)
        self.failures.move_to_end(key)
        while len(self.failures) > MAX_REMEMBERED_FAILURES:
            self.failures.popitem(last=False)

    # -- device slots ----------------------------------------------------------------------

    def slot_of(self, lora_id: int) -> int | None:
        return self._slot_by_id.get(lora_id)

    def has_room_for(self, lora_id: int) -> bool:
        """True if ``lora_id`` holds a slot or an idle slot could be taken for it."""
        return lora_id in self._slot_by_id or 0 in self.slot_refs

    @property
    def slots_in_use(self) -> int:
        return sum(1 for r in self.slot_refs if r > 0)

    def acquire(self, req: LoRARequest) -> int:
        """Pin ``req``'s adapter in a slot (loading it if needed) and return the slot."""
        self._clock += 1
        slot = self.slot_of(req.lora_int_id)
        if slot is not None:
            self.stats.slot_hits += 1
        else:
            weights = self.load(req)
            slot = self._victim()
            self._write_slot(slot, req.lora_int_id, weights)
        self.slot_refs[slot] += 1
        self.slot_used_at[slot] = self._clock
        return slot

    def release(self, lora_id: int) -> None:
        slot = self.slot_of(lora_id)
        if slot is None or self.slot_refs[slot] == 0:
            raise RuntimeError(f"release of adapter {lora_id} that holds no pinned slot")
        self.slot_refs[slot] -= 1

    def _victim(self) -> int:
        idle = [s for s in range(self.num_slots) if self.slot_refs[s] == 0]
        if not idle:
            raise RuntimeError("no idle adapter slot (scheduler must check has_room_for)")
        empty = [s for s in idle if self.slot_owner[s] is None]
        if empty:
            return empty[0]
        self.stats.slot_evictions += 1
        return min(idle, key=lambda s: self.slot_used_at[s])

    def _write_slot(self, slot: int, lora_id: int, adapter: AdapterWeights) -> None:
        """Load ``adapter`` into ``slot``: one host-to-device copy of its packed weights,
        then one batched device copy into the slot rows and one batched zeroing of the rank
        columns past its rank and of the projections it leaves alone (a few calls instead
        of four small ops per projection and layer, two of them host-to-device copies)."""
        bit = 1 << slot
        masks = {id(lin): lin.slot_mask & ~bit for lin, _ in self.linears.values()}
        weights = adapter.on(self.device)
        targets: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        zeros: list[torch.Tensor] = []
        for key, (linear, index) in self.linears.items():
            lora_a, lora_b = linear.lora_as[index][slot], linear.lora_bs[index][slot]
            pair = weights.get(key)
            if pair is None:
                zeros += [lora_a, lora_b]
                continue
            masks[id(linear)] |= bit
            a, b = pair
            r = a.shape[0]
            targets += [lora_a[:r], lora_b[:, :r]]
            sources += [a, b]
            if r < lora_a.shape[0]:
                zeros += [lora_a[r:], lora_b[:, r:]]
        if targets:
            torch._foreach_copy_(targets, sources)
        if zeros:
            torch._foreach_zero_(zeros)
        for linear in self._unique_linears:
            linear.slot_mask = masks[id(linear)]  # nn.Module attribute writes are slow: once each
        self.slot_ranks[slot] = adapter.rank
        old = self.slot_owner[slot]
        if old is not None:
            del self._slot_by_id[old]
        self.slot_owner[slot] = lora_id
        self._slot_by_id[lora_id] = slot
        self.stats.slot_loads += 1


def _inside(real: Path, roots: tuple[str, ...]) -> bool:
    return any(real.is_relative_to(root) for root in roots)
