"""A real model on the CPU: lorafleet's LoRA path against its own base model and transformers.

Side by side in one process, on a real checkpoint (default: the catalog's
SmolLM2-135M-Instruct, prepared by ``lorafleet.worker.model.catalog.prepare_model``); greedy,
EOS ignored, every request makes exactly ``--new-tokens`` tokens; prompts of about 30-60
tokens rendered with the model's chat template:

  (a) ``--requests`` requests round-robin over ``--adapters`` random PEFT adapters (ranks 8
      and 16; half on all seven projections, half on q_proj/v_proj) in one engine batch;
      the same prompts base-only on the same engine; transformers + PEFT with every adapter
      loaded, one left-padded ``generate`` per adapter over that adapter's prompts;
  (b) one stream with one rank-8 adapter (all seven projections; and one on q_proj/v_proj)
      vs the same stream without;
  (c) one base-model stream: the engine vs transformers ``generate``.

After a short warm-up, ``--rounds`` rounds alternate the sides (each goal's two sides run
one after the other, so both see the same machine). The tables show each side's best and
median round and, per goal the issue names, the ratio of the two bests (judged against the
target) and the median of the per-round ratios, steadier where other work shares the CPU;
and the median of the per-round ratios of tokens per CPU-second of this process (all its
threads): where other work crowds the cores, wall time also counts waiting for them, CPU
time mostly not.

Then, unless ``--paired-rounds 0``, the same-engine goals again, measured step by step: two
engines of the same settings (the second first runs every side once, untimed, so both hold
the same adapters in slots and merged) take the two sides' requests (mixed adapters and base-only;
one stream with and without its adapter) and step one after the other until both are done,
which one steps first alternating, so a machine whose speed drifts from one second to the
next (a shared VM) slows both sides alike. Each side's throughput counts its own steps'
time; the table shows the median over rounds of the ratio and the median of the per-step
time ratios. ``--json`` keeps every round. Commands:

    LORAFLEET_CACHE=/tmp/lfcache python benchmarks/bench_real_model.py --threads 2
    python benchmarks/bench_real_model.py --model path/to/hf_folder --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.producer import LoRARequest, SamplingParams
from lorafleet.worker import LLM, LLMEngine
from lorafleet.worker.demo.synthetic import ALL_TARGETS, build_random_adapter

QV_TARGETS = ("q_proj", "v_proj")
SUBJECTS = (
    "how a rainbow forms",
    "why the sky is blue",
    "what a prime number is",
    "how bees make honey",
    "the water cycle",
    "how a bicycle stays upright",
    "what causes the seasons",
    "how vaccines work",
    "the history of the printing press",
    "how a compiler turns code into a program",
    "why bread rises",
    "what a black hole is",
)
ASKS = (
    "Explain {}.",
    "Explain {} to a ten-year-old, in two sentences.",
    "Write a short paragraph about {}, then give one surprising fact about it.",
    "I am preparing a talk for my class and need help: describe {} clearly, with an "
    "everyday example, and end with a question for the audience.",
)


@dataclass(frozen=True)
class Goal:
    """A ratio the issue asks for: ``ours / baseline >= target``."""

    name: str
    ours: str
    baseline: str
    target: float


GOALS = (
    Goal("(a) mixed adapters vs base-only, same engine", "mixed", "mixed_base", 0.9),
    Goal("(a) mixed adapters vs transformers + PEFT", "mixed", "mixed_peft", 3.0),
    Goal("(b) one stream, rank-8 adapter (all 7) vs none", "single_lora", "single_base", 0.95),
    Goal("(b) one stream, rank-8 adapter (q/v) vs none", "single_lora_qv", "single_base", 0.95),
    Goal("(c) one stream, base: engine vs transformers", "single_base", "single_hf", 1.0),
)
SIDES = {
    "mixed": "engine, requests on their adapters",
    "mixed_base": "engine, same prompts base-only",
    "mixed_peft": "transformers + PEFT, one generate per adapter",
    "single_lora": "engine, one stream, rank-8 adapter on all 7 projections",
    "single_lora_qv": "engine, one stream, rank-8 adapter on q_proj/v_proj",
    "single_base": "engine, one stream, base model",
    "single_hf": "transformers generate, one stream",
}


def resolve_model(model: str) -> Path:
    """A Hugging Face folder as is, else a catalog name prepared (once) in the cache."""
    if Path(model).is_dir():
        return Path(model)
    from lorafleet.worker.model.catalog import prepare_model

    return prepare_model(model)


def make_adapters(model_dir: Path, root: Path, count: int) -> list[LoRARequest]:
    """``count`` random adapters: ranks 8, 16 alternating; pairs alternate between all
    seven projections and q_proj/v_proj. std 1/sqrt(hidden), as ``lorafleet make-adapters``
    picks it, keeps each update a modest fraction of its layer's output."""
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    requests = []
    for i in range(count):
        rank = (8, 16)[i % 2]
        targets = ALL_TARGETS if i // 2 % 2 == 0 else QV_TARGETS
        path = build_random_adapter(
            model_dir,
            root / f"adapter-{i}",
            rank=rank,
            alpha=2.0 * rank,
            target_modules=targets,
            seed=i,
            std=hidden**-0.5,
        )
        requests.append(LoRARequest(f"adapter-{i}", i + 1, str(path)))
    return requests


def make_prompts(tokenizer, count: int) -> list[str]:
    """``count`` user questions of varying length, rendered with the chat template (plain
    text for a tokenizer without one)."""
    prompts = []
    for i in range(count):
        question = ASKS[i % len(ASKS)].format(SUBJECTS[i % len(SUBJECTS)])
        if tokenizer.chat_template is None:
            prompts.append(question)
            continue
        messages = [{"role": "user", "content": question}]
        prompts.append(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    return prompts


def engine_side(
    llm: LLM, prompts: list[str], loras: list[LoRARequest | None], new_tokens: int
) -> Callable[[], float]:
    """A timed run of ``prompts`` through the engine, each on its adapter: (tokens/s,
    tokens per CPU-second)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    def run() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, loras)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
        total = len(prompts) * new_tokens
        return total / elapsed, total / cpu

    return run


def generate_side(
    model, tokenizer, groups: list[tuple[str | None, list[str]]], new_tokens: int
) -> Callable[[], float]:
    """A timed run of transformers ``generate``: one left-padded batch per group, with the
    group's adapter set first when ``model`` is a ``PeftModel``. (tokens/s, tokens per
    CPU-second)."""
    batches = [
        (adapter, tokenizer(group, return_tensors="pt", padding=True)) for adapter, group in groups
    ]
    total = sum(len(group) for _, group in groups) * new_tokens

    def run() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        for adapter, batch in batches:
            if adapter is not None:
                model.set_adapter(adapter)
            with torch.inference_mode():
                out = model.generate(
                    **batch,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            assert out.shape[1] - batch.input_ids.shape[1] == new_tokens
        return total / (time.perf_counter() - start), total / (time.process_time() - cpu)

    return run


def load_hf(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def peft_model(model_dir: Path, loras: list[LoRARequest]):
    """A ``PeftModel`` over a fresh base model with every adapter loaded."""
    from peft import PeftModel

    first, *rest = loras
    peft = PeftModel.from_pretrained(
        load_hf(model_dir), first.lora_path, adapter_name=first.lora_name
    )
    for lora in rest:
        peft.load_adapter(lora.lora_path, adapter_name=lora.lora_name)
    return peft.eval()


def make_engine(model_dir: Path, args: argparse.Namespace, num_adapters: int, config: dict) -> LLM:
    """The engine every engine side runs on (``paired`` makes a second one alike)."""
    return LLM(
        str(model_dir),
        max_loras=num_adapters,
        max_lora_rank=16,
        num_threads=args.threads,
        # Enough for every request (and a default-sized KV cache holds it), within the model's.
        max_model_len=min(2048, config["max_position_embeddings"]),
        kv_cache_bytes=1 << 30,  # two of them in paired rounds: 1 GiB each is plenty
    )


def build_sides(
    args: argparse.Namespace, model_dir: Path, root: Path
) -> tuple[dict[str, Callable[[], tuple[float, float]]], dict[str, Jobs], LLM]:
    """Every side's timed run, in the order they alternate (each goal's two sides next to
    each other, so that both see the same machine), after a short warm-up of each; the
    engine sides' requests (for ``paired``); and the engine, warm."""
    from transformers import AutoTokenizer

    loras = make_adapters(model_dir, root, args.adapters)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = make_prompts(tokenizer, args.requests)
    mixed = [loras[i % len(loras)] for i in range(len(prompts))]
    config = json.loads((model_dir / "config.json").read_text())
    llm = make_engine(model_dir, args, len(loras), config)
    hf = load_hf(model_dir)
    peft = None if args.skip_peft else peft_model(model_dir, loras)
    single = [prompts[1]]

    def sides_for(count: int, new_tokens: int) -> dict[str, Callable[[], float]]:
        """The sides on the first ``count`` prompts (every adapter among them)."""
        some, some_loras = prompts[:count], mixed[:count]
        found = {
            "mixed_base": engine_side(llm, some, [None] * count, new_tokens),
            "mixed": engine_side(llm, some, some_loras, new_tokens),
        }
        if peft is not None:
            groups = [
                (lora.lora_name, [p for p, m in zip(some, some_loras, strict=True) if m == lora])
                for lora in loras
            ]
            found["mixed_peft"] = generate_side(peft, tokenizer, groups, new_tokens)
        return found | {
            "single_base": engine_side(llm, single, [None], new_tokens),
            "single_lora": engine_side(llm, single, [loras[0]], new_tokens),
            "single_lora_qv": engine_side(llm, single, [loras[2]], new_tokens),
            "single_hf": generate_side(hf, tokenizer, [(None, single)], new_tokens),
        }

    # Warm-up, untimed: adapters into the engine's slots, first-call allocations.
    for run in sides_for(len(loras), 2).values():
        run()
    jobs = {
        "mixed": list(zip(prompts, mixed, strict=True)),
        "mixed_base": [(p, None) for p in prompts],
        "single_lora": [(single[0], loras[0])],
        "single_lora_qv": [(single[0], loras[2])],
        "single_base": [(single[0], None)],
    }
    return sides_for(len(prompts), args.new_tokens), jobs, llm


#: The same-engine goals measured step by step (``paired``): ours, baseline, target.
PAIRED_GOALS = (
    Goal("(a) mixed adapters vs base-only, same engine", "mixed", "mixed_base", 0.9),
    Goal("(b) one stream, rank-8 adapter (all 7) vs none", "single_lora", "single_base", 0.95),
    Goal("(b) one stream, rank-8 adapter (q/v) vs none", "single_lora_qv", "single_base", 0.95),
)

Jobs = list[tuple[str, LoRARequest | None]]


def paired(
    engines: tuple[LLMEngine, LLMEngine], jobs: tuple[Jobs, Jobs], new_tokens: int
) -> tuple[float, list[float]]:
    """``engines[i]`` takes ``jobs[i]`` (prompt, adapter); then both step, one after the
    other, until both are done, the first of each pair alternating. Returns the ratio of
    the two sides' throughputs (side 0 over side 1, each over its own steps' time) and the
    per-step time ratios (side 1's step over side 0's, step by step)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for engine, side in zip(engines, jobs, strict=True):
        for prompt, lora in side:
            engine.add_request(uuid.uuid4().hex, prompt, params, lora)
    times: tuple[list[float], list[float]] = ([], [])
    order = (0, 1)
    while any(engine.has_unfinished() for engine in engines):
        for i in order:
            if engines[i].has_unfinished():
                start = time.perf_counter()
                engines[i].step()
                times[i].append(time.perf_counter() - start)
        order = order[::-1]
    tokens = [len(side) * new_tokens for side in jobs]
    ratio = (tokens[0] / sum(times[0])) / (tokens[1] / sum(times[1]))
    return ratio, [theirs / ours for ours, theirs in zip(times[0], times[1], strict=False)]


def warm(engine: LLMEngine, jobs: dict[str, Jobs], new_tokens: int) -> None:
    """Every side's requests once, untimed: a fresh engine then holds what the measured one
    holds by now (every adapter in a slot, the single streams' adapters merged)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for side in jobs.values():
        for prompt, lora in side:
            engine.add_request(uuid.uuid4().hex, prompt, params, lora)
        while engine.has_unfinished():
            engine.step()


def measure_paired(
    engines: tuple[LLMEngine, LLMEngine], jobs: dict[str, Jobs], new_tokens: int, rounds: int
) -> list[dict]:
    """Every ``PAIRED_GOALS`` goal, ``rounds`` times (the engines swap sides each round)."""
    found = []
    for goal in PAIRED_GOALS:
        ratios, steps = [], []
        for i in range(rounds):
            pair = engines if i % 2 == 0 else engines[::-1]
            ratio, step_ratios = paired(pair, (jobs[goal.ours], jobs[goal.baseline]), new_tokens)
            ratios.append(ratio)
            steps += step_ratios
            print(f"paired round {i + 1}/{rounds}: {goal.name}: {ratio:.3f}x", file=sys.stderr)
        ratio = statistics.median(ratios)
        found.append(
            {
                "goal": goal.name,
                "ours": goal.ours,
                "baseline": goal.baseline,
                "ratio": ratio,
                "step_ratio": statistics.median(steps),
                "rounds": ratios,
                "target": goal.target,
                "met": ratio >= goal.target,
            }
        )
    return found


def measure(
    sides: dict[str, Callable[[], tuple[float, float]]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """tokens/s and tokens per CPU-second of every side, ``rounds`` times, the sides
    alternating within each round (each run reported on stderr as it ends: a whole run
    takes minutes)."""
    results: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(rounds):
        for name, run in sides.items():
            wall, per_cpu = run()
            results[name].append(wall)
            cpu[name].append(per_cpu)
            print(
                f"round {i + 1}/{rounds}: {name} {wall:,.1f} tokens/s, "
                f"{per_cpu:,.1f} tokens per CPU-second",
                file=sys.stderr,
            )
    return results, cpu


def summary(results: dict[str, list[float]], cpu: dict[str, list[float]] | None = None) -> dict:
    """Best and median tokens/s per side; per goal, the ratio of the two sides' bests, the
    median of their per-round ratios (paired: the two ran a moment apart, so a load that
    drifts over minutes moves both) and, given ``cpu`` (tokens per CPU-second, same shape),
    the median of the per-round ratios of that."""
    best = {name: max(values) for name, values in results.items()}
    goals = []
    for goal in GOALS:
        if goal.ours in best and goal.baseline in best:
            ratio = best[goal.ours] / best[goal.baseline]
            pairs = zip(results[goal.ours], results[goal.baseline], strict=True)
            paired = statistics.median(ours / theirs for ours, theirs in pairs)
            cpu_paired = None
            if cpu is not None:
                cpu_pairs = zip(cpu[goal.ours], cpu[goal.baseline], strict=True)
                cpu_paired = statistics.median(ours / theirs for ours, theirs in cpu_pairs)
            goals.append(
                {
                    "goal": goal.name,
                    "ours": goal.ours,
                    "baseline": goal.baseline,
                    "ratio": ratio,
                    "paired_ratio": paired,
                    "cpu_paired_ratio": cpu_paired,
                    "target": goal.target,
                    "met": ratio >= goal.target,
                }
            )
    sides = {
        name: {"best": best[name], "median": statistics.median(values), "rounds": values}
        | ({} if cpu is None else {"cpu_rounds": cpu[name]})
        for name, values in results.items()
    }
    return {"sides": sides, "goals": goals}


def print_tables(report: dict) -> None:
    """The sides and the goals, with ``rich`` when it is installed, else aligned text."""
    side_rows = [
        [name, SIDES[name], f"{s['best']:,.1f}", f"{s['median']:,.1f}"]
        for name, s in report["sides"].items()
    ]
    goal_rows = [
        [
            g["goal"],
            f"{g['ratio']:.3f}x",
            f"{g['paired_ratio']:.3f}x",
            "-" if g["cpu_paired_ratio"] is None else f"{g['cpu_paired_ratio']:.3f}x",
            f">= {g['target']:g}x",
            "met" if g["met"] else "NOT met",
        ]
        for g in report["goals"]
    ]
    side_head = ["side", "what", "tokens/s (best)", "tokens/s (median)"]
    goal_head = [
        "goal",
        "best / best",
        "median of round ratios",
        "same, per CPU-second",
        "target",
        "(best / best)",
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for head, rows in ((side_head, side_rows), (goal_head, goal_rows)):
            widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
            for row in (head, *rows):
                print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
            print()
        return
    console = Console(width=150)
    for head, rows in ((side_head, side_rows), (goal_head, goal_rows)):
        table = Table(*head)
        for row in rows:
            table.add_row(*row)
        console.print(table)


def machine(threads: int) -> dict:
    return {
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="catalog name or Hugging Face folder")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, every side")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8, help="at least 3")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; best kept")
    ap.add_argument("--skip-peft", action="store_true", help="leave out transformers + PEFT")
    ap.add_argument("--paired-rounds", type=int, default=2, help="step-by-step rounds (0: none)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.adapters < 3:
        ap.error("--adapters must be at least 3 (the single streams use adapters 0 and 2)")
    if args.requests < args.adapters:
        ap.error("--requests must be at least --adapters (every adapter serves a request)")
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    info = machine(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        sides, jobs, llm = build_sides(args, model_dir, Path(tmp))
        results, cpu = measure(sides, args.rounds)
        pairs: list[dict] = []
        if args.paired_rounds > 0:
            config = json.loads((model_dir / "config.json").read_text())
            twin = make_engine(model_dir, args, args.adapters, config)
            warm(twin.engine, jobs, args.new_tokens)
            engines = (llm.engine, twin.engine)
            pairs = measure_paired(engines, jobs, args.new_tokens, args.paired_rounds)
    report = {"model": str(model_dir), "args": vars(args) | {"json": str(args.json)}}
    report |= info | {"load_average_after": os.getloadavg()} | summary(results, cpu)
    report["paired"] = pairs
    print(
        f"{model_dir.name}: {info['machine']}, {info['cpus']} CPUs, torch {info['torch']}, "
        f"{args.threads} threads; load average {info['load_average'][0]:.2f} before, "
        f"{report['load_average_after'][0]:.2f} after"
    )
    print(
        f"{args.requests} requests over {args.adapters} adapters, {args.new_tokens} new tokens "
        f"each, greedy; best of {args.rounds} alternating rounds"
    )
    print_tables(report)
    if pairs:
        print(f"step by step, two engines alike, {args.paired_rounds} rounds:")
        for g in pairs:
            verdict = "met" if g["met"] else "NOT met"
            print(
                f"  {g['goal']}: {g['ratio']:.3f}x (median of rounds; per step "
                f"{g['step_ratio']:.3f}x), target >= {g['target']:g}x: {verdict}"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
