"""The benchmark suite: every BENCHMARKS.md row in one run, each with the command that made it.

1. adapters: engine throughput with N = 1, 8, 64, 512 adapters (zipf:1.0 popularity)
   relative to base-model-only requests, same engine (in-process ``LLM``), same prompts and
   output lengths. ``--max-loras`` below N makes the adapters compete for device slots and
   ``--max-cpu-loras`` below N for the host cache, so 512 adapters exercise every tier.
2. peft: the engine vs transformers + PEFT batched per adapter (``bench_engine.py``'s two
   runners, 64 adapters round-robin, on this suite's model).
3. pipeline: queue overhead vs plain arq no-op jobs (``bench_pipeline.py``, subprocess).
4. loadtest: ``lorafleet loadtest`` end to end (embedded Redis + one worker), open loop,
   zipf:1.0 over 64 adapters made by ``lorafleet make-adapters``.

CPU (default): the tiny random llama (hidden 64, 2 layers) in fp32, torch limited to
``--threads`` (1 by default: intra-op threads only add synchronisation on a model this
small, and collapse when other processes share the cores). ``--gpu``: a random model shaped
like Llama-3.2-1B (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab
128256, tied embeddings) in bf16 on CUDA; no hub download. It stops at once without CUDA.

    python benchmarks/run_all.py --out rows.md   # then merge the rows into BENCHMARKS.md
    python benchmarks/run_all.py --gpu --out gpu-rows.md
    python benchmarks/run_all.py --only adapters --counts 1,8 --requests 64   # one section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SECTIONS = ("adapters", "peft", "pipeline", "loadtest")

#: Llama-3.2-1B's shape (config.json of meta-llama/Llama-3.2-1B), minus rope scaling, which
#: changes no cost. ``max_position_embeddings`` is cut so the KV cache can hold a full one.
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 4096,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class Mode:
    """Everything that differs between the CPU and the GPU suite."""

    name: str
    device: str
    dtype: str
    model_shape: dict
    rank: int
    targets: tuple[str, ...]
    requests: int  # section 1
    prompt_len: str
    output_len: int
    max_num_seqs: int
    kv_cache_mb: int
    peft_requests: int  # section 2
    peft_tokens: int
    pipeline_args: tuple[str, ...]  # section 3
    loadtest_args: tuple[str, ...]  # section 4
    tiers: str  # default --tiers


CPU = Mode(
    name="cpu",
    device="cpu",
    dtype="float32",
    model_shape={},
    rank=8,
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    requests=256,
    prompt_len="uniform:16:64",
    output_len=32,
    max_num_seqs=128,
    kv_cache_mb=256,
    peft_requests=256,
    peft_tokens=32,
    pipeline_args=("--light", "100", "--burst", "500", "--rounds", "2"),
    loadtest_args=("--rate", "20", "--num-requests", "300", "--output-len", "16",
                   "--prompt-len", "uniform:8:24"),
    tiers="8:32,64:128",  # the engine's defaults (tiers churn), and room for 64 adapters
)  # fmt: skip

GPU = Mode(
    name="gpu",
    device="cuda",
    dtype="bfloat16",
    model_shape=LLAMA_1B,
    rank=16,
    targets=("q_proj", "k_proj", "v_proj", "o_proj"),  # S-LoRA's and Punica's setting
    requests=1024,
    prompt_len="uniform:64:512",
    output_len=128,
    max_num_seqs=256,
    kv_cache_mb=16384,
    peft_requests=512,
    peft_tokens=64,
    pipeline_args=("--light", "200", "--burst", "1000", "--rounds", "3", "--device", "cuda"),
    loadtest_args=("--rate", "20", "--num-requests", "1000", "--output-len", "64",
                   "--prompt-len", "uniform:32:256"),
    tiers="16:128,128:512",
)  # fmt: skip


# -- setup ---------------------------------------------------------------------------------


def require_cuda() -> str:
    """The GPU's name; exits with the reason when CUDA is not usable."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        raise SystemExit(
            f"run_all.py --gpu needs a CUDA device, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build: {built}). Run it on a GPU host with a "
            "CUDA build of torch, or drop --gpu for the CPU suite."
        )
    return torch.cuda.get_device_name(0)


def machine_line(mode: Mode, threads: int) -> str:
    import torch

    where = (
        torch.cuda.get_device_name(0)
        if mode.device == "cuda"
        else f"{platform.machine()} CPU, {os.cpu_count()} cores, {threads} torch thread(s)"
    )
    return (
        f"{where}; torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def build_model(root: Path, mode: Mode) -> Path:
    import torch

    from lorafleet.worker.demo.synthetic import build_random_model

    return build_random_model(
        root / "model", "llama", seed=1, dtype=getattr(torch, mode.dtype), **mode.model_shape
    )


def make_adapters(model: Path, out: Path, count: int, mode: Mode) -> list[str]:
    """``lorafleet make-adapters`` as a subprocess; returns the command line."""
    cmd = [
        "lorafleet", "make-adapters", "--model", str(model), "--count", str(count),
        "--rank", str(mode.rank), "--out", str(out), "--targets", ",".join(mode.targets),
    ]  # fmt: skip
    subprocess.run([sys.executable, "-m", "lorafleet.worker.cli", *cmd[1:]], check=True)
    return cmd


def adapter_requests(root: Path, count: int):
    from lorafleet.producer import LoRARequest

    folders = sorted(p.parent for p in root.glob("*/adapter_config.json"))[:count]
    return [LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(folders)]


def log(message: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- 1. throughput vs number of adapters ---------------------------------------------------


def check_graphs(llm, args) -> None:
    """With --cuda-graphs, stop rather than time eager steps if graphs were turned off."""
    runner = llm.engine.runner
    if not args.cuda_graphs:
        return
    if runner.graphs is None:
        raise SystemExit(f"CUDA graphs were turned off: {runner.graphs_error}")
    log(f"CUDA graphs: {len(runner.graphs.graphs)} captured, {runner.graphs.replays} replays")


def timed_tokens(llm, prompts, params, loras) -> float:
    """Output tokens/s of one ``generate`` call."""
    start = time.perf_counter()
    outs = llm.generate(prompts, params, loras)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


@dataclass(frozen=True)
class Tiers:
    """An engine's adapter capacity: device slots and host cache entries."""

    max_loras: int
    max_cpu_loras: int

    @classmethod
    def parse(cls, spec: str) -> Tiers:
        """``SLOTS:CACHE``, e.g. ``8:32``."""
        slots, _, cache = spec.partition(":")
        return cls(int(slots), int(cache or slots))

    def __str__(self) -> str:
        return f"{self.max_loras}:{self.max_cpu_loras}"


def mode_llm(model: Path, mode: Mode, args, max_loras: int, max_cpu_loras: int | None = None):
    """The engine a suite section times: ``mode``'s device, dtype, rank, batch size and KV
    cache, ``max_loras`` device slots, ``max_cpu_loras`` host cache entries (None: the
    engine's default), decode steps from CUDA graphs when ``--cuda-graphs`` says so."""
    from lorafleet.worker import LLM

    return LLM(
        str(model),
        device=mode.device,
        dtype=mode.dtype,
        kv_cache_bytes=mode.kv_cache_mb * 2**20,
        max_num_seqs=mode.max_num_seqs,
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        max_lora_rank=mode.rank,
        cuda_graphs=args.cuda_graphs,
    )


def adapter_workload(n: int, mode: Mode, args):
    """Prompts, sampling params and adapters of section 1 for N adapters.

    The same seed draws the same prompts and lengths for every N (the adapter draw takes
    one random number per request whatever N is): only the adapters change.
    """
    from lorafleet.producer import SamplingParams
    from lorafleet.producer.workload import AdapterMix, Length, Prompts, Workload

    workload = Workload(
        AdapterMix.parse("zipf:1.0", n),
        Prompts(Length.parse(mode.prompt_len)),
        Length(mode.output_len, mode.output_len),
        seed=args.seed,
    )
    planned = workload.take(args.requests or mode.requests)
    params = [
        SamplingParams(max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True) for p in planned
    ]
    return [p.prompt for p in planned], params, [p.adapter for p in planned]


def adapters_section(model: Path, adapter_root: Path, mode: Mode, args) -> list[str]:

    loras = adapter_requests(adapter_root, max(args.counts))
    bases: list[float] = []
    rows = [
        "| adapters (zipf:1.0) | max_loras : max_cpu_loras | tokens/s with adapters | "
        "tokens/s base only | ratio | adapters used | slot loads | disk loads | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tiers in args.tiers:
        llm = mode_llm(model, mode, args, tiers.max_loras, tiers.max_cpu_loras)
        for n in args.counts:
            prompts, params, indices = adapter_workload(n, mode, args)
            chosen = [loras[i] if i is not None else None for i in indices]
            # Warm-up: one untimed pass, so the rounds see the adapter caches' steady state
            # (with more adapters than entries they still churn every round).
            llm.generate(prompts, params, chosen)
            check_graphs(llm, args)
            stats = llm.engine.adapters.stats
            slot_loads, disk_loads = stats.slot_loads, stats.disk_loads
            base = ours = 0.0
            for _ in range(args.rounds):  # alternate: both see the same machine conditions
                base = max(base, timed_tokens(llm, prompts, params, None))
                ours = max(ours, timed_tokens(llm, prompts, params, chosen))
            ratio = ours / base
            bases.append(base)
            log(f"adapters N={n}, tiers {tiers}: {ours:.0f} vs {base:.0f} tokens/s ({ratio:.2f}x)")
            rows.append(
                f"| {n} | {tiers.max_loras} : {tiers.max_cpu_loras} | {ours:,.0f} | "
                f"{base:,.0f} | {ratio:.2f}x | {len(set(indices))} | "
                f"{(stats.slot_loads - slot_loads) // args.rounds} | "
                f"{(stats.disk_loads - disk_loads) // args.rounds} | "
                f"`{section_command(args, 'adapters')}` |"
            )
        del llm  # one engine's memory at a time
    notes = (
        f"{args.requests or mode.requests} requests, prompts {mode.prompt_len} tokens, "
        f"{mode.output_len} output tokens each (EOS ignored), greedy; adapters rank "
        f"{mode.rank} on {', '.join(mode.targets)}; max_num_seqs={mode.max_num_seqs}. "
        "A step serves at most max_loras adapters (device slots); the host cache keeps "
        f"max_cpu_loras. Best of {args.rounds} alternating rounds after a warm-up pass; "
        "slot and disk loads are per round."
    )
    spread = (
        f"The base-only runs repeat one workload on one engine configuration after another: "
        f"their spread, {min(bases):,.0f} to {max(bases):,.0f} tokens/s, is this machine's "
        "noise (ratios come from alternating rounds, so they drift less)."
    )
    return ["### Throughput vs number of adapters", "", notes, "", *rows, "", spread]


# -- 2. engine vs transformers + PEFT ------------------------------------------------------


def peft_section(model: Path, adapter_root: Path, mode: Mode, args) -> list[str]:
    sys.path.insert(0, str(BENCH_DIR))
    from bench_engine import compare

    n_adapters = min(64, max(args.counts))
    # bench_engine's flags: the mode's engine settings go by the same names.
    engine = {
        k: getattr(mode, k) for k in ("rank", "device", "dtype", "max_num_seqs", "kv_cache_mb")
    }
    bench = argparse.Namespace(
        **engine,
        requests=mode.peft_requests,
        adapters=n_adapters,
        new_tokens=mode.peft_tokens,
        cuda_graphs=args.cuda_graphs,
        rounds=args.rounds,
    )
    ours, base = compare(model, adapter_requests(adapter_root, n_adapters), bench)
    log(f"peft: {ours:.0f} vs {base:.0f} tokens/s ({ours / base:.1f}x)")
    return [
        "### Engine vs transformers + PEFT",
        "",
        f"{mode.peft_requests} requests round-robin over {n_adapters} adapters (rank "
        f"{mode.rank}), {mode.peft_tokens} new tokens each; PEFT runs one left-padded "
        f"`generate` batch per adapter (`set_adapter`); best of {args.rounds} alternating rounds.",
        "",
        "| workload | lorafleet tokens/s | transformers + PEFT tokens/s | ratio | command |",
        "|---|---|---|---|---|",
        f"| {n_adapters} adapters | {ours:,.0f} | {base:,.0f} | {ours / base:.1f}x | "
        f"`{section_command(args, 'peft')}` |",
    ]


# -- 3. pipeline overhead ------------------------------------------------------------------


def run_captured(cmd: Sequence[str], env: dict[str, str]) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc.stdout


def pipeline_section(mode: Mode, args, env: dict[str, str]) -> list[str]:
    cmd = ["python", "benchmarks/bench_pipeline.py", *mode.pipeline_args, *graphs_flag(args)]
    out = run_captured([sys.executable, str(BENCH_DIR / "bench_pipeline.py"), *cmd[2:]], env)
    log("pipeline:\n" + out)

    def row(label: str) -> list[str]:
        line = next(x for x in out.splitlines() if x.startswith(label))
        return re.findall(r"\d[\d.]*", line[len(label) :])

    p50, p99 = row("enqueue->first token p50 (ms)"), row("enqueue->first token p99 (ms)")
    burst = row("throughput, burst of")[1:]  # the first number is the burst size
    engine = row("engine alone, same burst (jobs/s)")
    command = f"`{threads_prefix(args)}{shlex.join(cmd)}`"
    return [
        "### Pipeline overhead vs arq no-op jobs",
        "",
        "One job at a time: enqueue to first streamed token; burst: jobs/s at max_tokens=1, "
        "tiny model, base + 4 adapters, one worker, both sides on one embedded Redis.",
        "",
        "| measure | lorafleet | arq no-op | engine alone | command |",
        "|---|---|---|---|---|",
        f"| enqueue -> first token p50 (ms) | {p50[0]} | {p50[1]} | | {command} |",
        f"| enqueue -> first token p99 (ms) | {p99[0]} | {p99[1]} | | {command} |",
        f"| burst throughput (jobs/s) | {burst[0]} | {burst[1]} | {engine[0]} | {command} |",
    ]


# -- 4. load test --------------------------------------------------------------------------


def loadtest_section(model: Path, mode: Mode, args, env: dict[str, str], root: Path) -> list[str]:
    from lorafleet.producer.loadreport import read_json

    adapters = root / "loadtest-adapters"
    make_cmd = make_adapters(model, adapters, 64, mode)
    report_path = root / "loadtest.json"
    cmd = [
        "lorafleet", "loadtest", "--model", str(model), "--adapters-dir", str(adapters),
        "--device", mode.device, "--adapter-mix", "zipf:1.0",
        "--max-loras", str(args.tiers[0].max_loras),
        "--max-cpu-loras", str(args.tiers[0].max_cpu_loras),
        "--quiet", "--json", str(report_path), *mode.loadtest_args, *graphs_flag(args),
    ]  # fmt: skip
    out = run_captured([sys.executable, "-m", "lorafleet.worker.cli", *cmd[1:]], env)
    log("loadtest:\n" + out)
    r = read_json(report_path)

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    # What the section ran, with the suite's temporary folder written as $TMP.
    ran = " && ".join(shlex.join(c).replace(str(root), "$TMP") for c in (make_cmd, cmd))
    return [
        "### Load test (producer -> Redis -> one worker)",
        "",
        f"{r.description}. Latencies in ms (p50 / p99). The section runs `{ran}` "
        "($TMP/model: the suite's model).",
        "",
        "| requests ok | req/s | output tokens/s | queue wait | TTFT | TPOT | end-to-end | command |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r.ok}/{r.sent} | {r.request_throughput:.1f} | {r.output_throughput:,.0f} | "
        f"{ms(r.queue_wait.p50)} / {ms(r.queue_wait.p99)} | {ms(r.ttft.p50)} / {ms(r.ttft.p99)} | "
        f"{ms(r.tpot.p50)} / {ms(r.tpot.p99)} | {ms(r.e2e.p50)} / {ms(r.e2e.p99)} | "
        f"`{section_command(args, 'loadtest')}` |",
    ]


# -- driver --------------------------------------------------------------------------------


def mode_of(args) -> Mode:
    return GPU if args.gpu else CPU


def graphs_flag(args) -> list[str]:
    return ["--cuda-graphs"] if args.cuda_graphs else []


def threads_prefix(args) -> str:
    return f"OMP_NUM_THREADS={args.threads} " if not args.gpu else ""


def section_command(args, section: str) -> str:
    """The command that reproduces one section's rows with this run's settings."""
    parts = ["python", "benchmarks/run_all.py", "--only", section]
    parts += ["--gpu"] if args.gpu else ["--threads", str(args.threads)]
    if args.counts != DEFAULT_COUNTS:
        parts += ["--counts", ",".join(map(str, args.counts))]
    for flag, value, default in (
        ("--requests", args.requests, None),
        ("--rounds", args.rounds, 3),
        ("--tiers", ",".join(map(str, args.tiers)), mode_of(args).tiers),
        ("--seed", args.seed, 0),
        ("--cuda-graphs", args.cuda_graphs, False),
    ):
        if value is True:
            parts.append(flag)
            continue
        if value != default:
            parts += [flag, str(value)]
    return shlex.join(parts)


DEFAULT_COUNTS = [1, 8, 64, 512]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the Llama-3.2-1B-shaped suite on CUDA")
    ap.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections")
    ap.add_argument("--out", help="write the markdown rows here (default: stdout)")
    ap.add_argument(
        "--counts",
        type=lambda s: [int(x) for x in s.split(",")],
        default=DEFAULT_COUNTS,
        help="adapter counts of section 1 (default 1,8,64,512)",
    )
    ap.add_argument("--requests", type=int, help="requests per run of section 1")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; best kept")
    ap.add_argument(
        "--tiers",
        help="engine configurations of section 1, SLOTS:CACHE (max_loras:max_cpu_loras) "
        f"comma-separated (CPU {CPU.tiers}, GPU {GPU.tiers}); the first also serves section 4",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="engines and workers decode from CUDA graphs (every section)",
    )
    args = ap.parse_args(argv)
    if args.cuda_graphs and not args.gpu:
        ap.error("--cuda-graphs needs --gpu")
    args.tiers = [Tiers.parse(t) for t in (args.tiers or mode_of(args).tiers).split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    mode = mode_of(args)
    if args.gpu:
        log(f"GPU: {require_cuda()}")
    else:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported
    import torch

    if not args.gpu:
        torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if not args.gpu else dict(os.environ)
    env.pop("LORAFLEET_REDIS_URL", None)  # section 4 starts its own Redis
    sections = args.only or list(SECTIONS)
    lines = [
        f"## {mode.name.upper()} suite ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine_line(mode, args.threads)}. "
        f"Model: random llama {json.dumps(mode.model_shape) if mode.model_shape else '(hidden 64, 2 layers, vocab 259)'}, "
        f"{mode.dtype} on {mode.device}"
        f"{', decode steps from CUDA graphs' if args.cuda_graphs else ', eager steps'}.",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        root = Path(tmp)
        log(f"building the {mode.name} model in {root}")
        model = build_model(root, mode)
        adapter_root = root / "adapters"
        if {"adapters", "peft"} & set(sections):
            count = max(args.counts) if "adapters" in sections else 64
            log(f"making {count} adapters")
            make_adapters(model, adapter_root, count, mode)
        for section in sections:
            log(f"section {section}")
            if section == "adapters":
                lines += adapters_section(model, adapter_root, mode, args)
            elif section == "peft":
                lines += peft_section(model, adapter_root, mode, args)
            elif section == "pipeline":
                lines += pipeline_section(mode, args, env)
            else:
                lines += loadtest_section(model, mode, args, env, root)
            lines.append("")
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text)
        log(f"rows written to {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
