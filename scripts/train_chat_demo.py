"""Train the chat demo's task adapters on SmolLM2-135M-Instruct (CPU, fixed seeds).

    python scripts/train_chat_demo.py --out worker/demo/assets/chat_demo

(``--model`` defaults to the catalog's ``smollm2``, prepared under ``$LORAFLEET_CACHE`` on
first use. Run the script by its path, never with ``python -c``/``-m`` from the repository
root: the root's ``kernels/`` folder would shadow a Hugging Face package of that name.)

Steps, all on the CPU:

1. Questions from templates (capitals, colours, "name a ...", "what is a ...", simple
   facts), a few hundred; a seeded, per-kind split keeps a held-out set that training
   never sees.
2. The base model's own greedy answers to every question, generated with lorafleet's
   in-process engine (``LLM``), cut to their first sentence (two when short); answers that
   never finish a sentence, ramble, or already look like an adapter's format are dropped.
3. One PEFT LoRA adapter per task of ``lorafleet.worker.demo.chat_demo.TASKS``, trained on
   (chat-templated question -> ``transform(task, base answer)`` + end of turn), loss on
   the answer tokens only, saved in bfloat16 under ``adapters/<task>/``.
4. Evaluation of what users get: lorafleet's engine serves the saved adapters and the
   base model in one mixed batch of held-out questions, scored with ``chat_demo.check``
   (format) and against the transformed base answer (exact); then a few requests per
   adapter are compared token for token with transformers + PEFT greedy decoding.
5. ``questions.json``: the held-out questions, the training questions and the record
   (seeds, steps, accuracy, minutes).

Time, measured on 2 CPU cores shared with other jobs (load average about 3; torch 2.13
CPU): 15.5 minutes with ``--threads 1`` (the default), of which 1.5 for the base answers,
12 for training (json 2.2, bullets 2.0, whisper 4.2, title 3.7) and 1.5 for the held-out
batch; 33 minutes with ``--threads 2`` under the same load (whisper then had 60 steps).
The shipped assets come from the ``--threads 1`` run; ``questions.json`` records it.

Determinism: the questions and the split are fixed by seeds; greedy answers and every
adapter's training reseed torch and their own ``random.Random``. With the same torch build
and thread count a rerun writes byte-identical adapters (checked); across thread counts
they differ by float rounding (the losses printed agreed to four decimals).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lora_training import lr_at, pad_batch, training_parser

from lorafleet.producer import SamplingParams
from lorafleet.worker import LLM
from lorafleet.worker.demo import chat_demo
from lorafleet.worker.demo.shipped import lora_requests
from lorafleet.worker.model.catalog import prepare_model

# -- questions ---------------------------------------------------------------------------

# fmt: off
COUNTRIES = [
    "France", "Japan", "Kenya", "Italy", "Spain", "Germany", "Canada", "Brazil", "Egypt",
    "India", "China", "Mexico", "Peru", "Chile", "Norway", "Sweden", "Finland", "Poland",
    "Greece", "Turkey", "Portugal", "Ireland", "Austria", "Hungary", "Argentina", "Colombia",
    "Australia", "Russia", "Thailand", "Vietnam", "Indonesia", "Nigeria", "Ghana", "Morocco",
    "Denmark", "Belgium", "the Netherlands", "Switzerland", "Cuba", "South Korea", "Iran",
    "Iraq", "Ethiopia", "Ukraine", "Romania", "Scotland", "Wales", "New Zealand", "Pakistan",
    "the Philippines",
]
COLOURED = [
    "the sky", "grass", "snow", "a banana", "a ripe tomato", "a lemon", "coal", "milk",
    "a carrot", "an orange", "a fire truck", "a polar bear", "a crow", "chocolate", "the sun",
    "a lime", "blood", "an emerald", "a ruby", "a sapphire", "a flamingo", "a pumpkin",
    "a strawberry", "a cucumber", "an eggplant", "a school bus", "a zebra", "the ocean",
    "a swan", "a frog", "charcoal", "a blueberry", "a penguin", "cream", "a pea",
]
CATEGORIES = [
    "fruit", "vegetable", "planet", "colour", "musical instrument", "mammal", "bird",
    "fish", "insect", "tree", "flower", "sport", "country in Europe", "city in Asia",
    "programming language", "metal", "gemstone", "dog breed", "board game", "ocean",
    "river", "mountain", "vehicle", "kitchen tool", "piece of furniture", "shape",
    "type of cheese", "kind of bread", "spice", "reptile", "month of the year",
    "day of the week", "chemical element", "famous painter", "famous scientist",
]
THINGS = [
    "violin", "hammer", "noun", "verb", "volcano", "glacier", "desert", "comet", "galaxy",
    "telescope", "microscope", "compass", "thermometer", "calendar", "library", "museum",
    "bakery", "pharmacy", "bicycle", "submarine", "helicopter", "lighthouse", "windmill",
    "castle", "bridge", "tunnel", "canyon", "island", "peninsula", "rainbow", "tornado",
    "earthquake", "battery", "magnet", "robot", "computer", "keyboard", "password", "poem",
    "novel", "recipe", "triangle", "square", "circle", "kangaroo", "dolphin", "penguin",
    "cactus", "mushroom", "diamond",
]
OPPOSITES = [
    "hot", "big", "fast", "happy", "light", "up", "open", "old", "hard", "wet", "loud",
    "early", "full", "strong", "rich", "high", "thick", "sweet", "tall", "near", "inside",
    "day", "win", "love", "begin", "push", "true", "clean", "brave", "empty",
]
ANIMALS = [
    "spider", "dog", "cat", "bird", "horse", "ant", "cow", "chicken", "octopus", "beetle",
    "duck", "sheep", "crab", "lobster", "goat",
]
NOISY = [
    "dog", "cat", "cow", "duck", "sheep", "pig", "horse", "lion", "owl", "frog", "snake",
    "bee", "rooster", "goat", "donkey",
]
TOOLS = [
    "saw", "screwdriver", "ladder", "broom", "shovel", "needle", "spoon", "knife", "pen",
    "umbrella", "towel", "toothbrush", "kettle", "map", "clock", "key", "camera", "rake",
    "wrench", "bucket",
]
PLURALS = [
    "mouse", "child", "goose", "tooth", "foot", "box", "city", "leaf", "wolf", "knife",
    "woman", "fish", "person", "cactus", "baby", "potato", "bus", "story", "half", "man",
]
BOOKS = [
    "Hamlet", "Pride and Prejudice", "War and Peace", "Don Quixote", "The Odyssey",
    "Moby-Dick", "Romeo and Juliet", "Oliver Twist", "Frankenstein", "Dracula",
    "Little Women", "Great Expectations", "The Hobbit", "Jane Eyre", "Les Misérables",
]
# fmt: on


def _a(nouns: list[str]) -> list[str]:
    """Each noun with its indefinite article (every noun here follows the vowel rule)."""
    return [f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in nouns]


# (template, fillers): one kind of question per template, one question per filler.
TEMPLATES: tuple[tuple[str, list[str]], ...] = (
    ("What is the capital of {}?", COUNTRIES),
    ("What colour is {}?", COLOURED),
    ("Name {}.", _a(CATEGORIES)),
    ("What is {}?", _a(THINGS)),
    ("What is the opposite of {}?", OPPOSITES),
    ("How many legs does {} have?", _a(ANIMALS)),
    ("What sound does {} make?", _a(NOISY)),
    ("What do you use {} for?", _a(TOOLS)),
    ("What is the plural of {}?", PLURALS),
    ("Who wrote {}?", BOOKS),
)
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 20240615


def split_questions() -> tuple[list[str], list[str]]:
    """(training, held-out) questions: a seeded ``HELD_OUT_FRACTION`` of each kind is held
    out; held-out questions are interleaved across kinds so that any prefix mixes them."""
    rng = random.Random(SPLIT_SEED)
    training: list[str] = []
    held_by_kind: list[list[str]] = []
    for template, fillers in TEMPLATES:
        questions = [template.format(f) for f in fillers]
        rng.shuffle(questions)
        n_held = max(1, round(HELD_OUT_FRACTION * len(questions)))
        held_by_kind.append(questions[:n_held])
        training += questions[n_held:]
    held = [q for row in _round_robin(held_by_kind) for q in row]
    return sorted(training), held


def _round_robin(groups: list[list[str]]) -> list[list[str]]:
    """Rows of one item per group: ``[[a0, b0, c0], [a1, b1], ...]``."""
    depth = max(map(len, groups))
    return [[g[i] for g in groups if i < len(g)] for i in range(depth)]


# -- base answers ------------------------------------------------------------------------

GEN_MAX_TOKENS = 48
MAX_ANSWER_WORDS = 30
# A second sentence is kept when the first is this short (answers like "Paris." alone would
# leave bullets with little to split).
SHORT_FIRST_SENTENCE_WORDS = 8


def short_answer(text: str, finished: bool) -> str | None:
    """The base model's answer cut to its first sentence (two when the first is short), or
    None when it is unusable: no complete sentence on its first line, too long, or already
    in an adapter's format (the adapters must learn something the base does not do).

    ``finished``: the model stopped by itself (else it ran out of tokens mid-sentence)."""
    lines = text.strip().split("\n")
    # Only the first line: what follows is often a list or a digression.
    parts = chat_demo.sentences(lines[0])
    if len(lines) == 1 and not finished:
        parts = parts[:-1]  # cut off by max_tokens: its last sentence is unfinished
    complete = []
    for part in parts:
        if part[-1] not in ".!?":
            break
        complete.append(part)
    if not complete:
        return None
    answer = complete[0]
    if len(answer.split()) < SHORT_FIRST_SENTENCE_WORDS and len(complete) > 1:
        answer = f"{answer} {complete[1]}"
    if len(answer.split()) > MAX_ANSWER_WORDS or not chat_demo.check(None, answer):
        return None
    return answer


def chat_prompt(tokenizer, question: str) -> str:
    """The prompt text the server builds for ``question``: the chat template's rendering of
    ``chat_demo.messages(question)`` with the assistant turn opened."""
    return tokenizer.apply_chat_template(
        chat_demo.messages(question), add_generation_prompt=True, tokenize=False
    )


def base_answers(llm: LLM, questions: list[str]) -> dict[str, str]:
    """Question -> the base model's short greedy answer, for questions that have a usable one."""
    tokenizer = llm.get_tokenizer()
    outs = llm.generate(
        [chat_prompt(tokenizer, q) for q in questions],
        SamplingParams(max_tokens=GEN_MAX_TOKENS, temperature=0.0),
    )
    answers = {}
    for q, out in zip(questions, outs, strict=True):
        done = out.outputs[0].finish_reason == "stop"
        answer = short_answer(out.outputs[0].text, done)
        if answer is not None:
            answers[q] = answer
    return answers


# -- adapters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterPlan:
    """How one task adapter is trained. ``layers``: the decoder layers it adapts (None: all).

    Sizes: a rank-r adapter of q_proj and v_proj holds 30 * r * (576 + 576 + 576 + 192)
    parameters (2 bytes each in bfloat16)."""

    task: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    layers: tuple[int, ...] | None
    steps: int
    lr: float
    seed: int


# Ranks, targets and layers differ on purpose (the server must serve a mix), each adapter
# under 1.5 MB in bfloat16. json and bullets only wrap the base answer; whisper and title
# swap most of its tokens for their lowercase or capitalised twins (" France" -> " france"),
# so they get more steps, title the largest rank, on the upper two thirds of the layers.
# Tried and dropped: "shout" (capitals). After 120 steps 96% of held-out answers were in
# capitals, but garbled ("THE CAPITAL OF CANDIE IS BERGER"): capitals split into rare
# tokens ("CAP", "IT", "AL") that a 135M model barely spells with.
ADAPTERS = (
    AdapterPlan("json", 4, 8, ("q_proj", "v_proj"), None, steps=40, lr=2e-3, seed=21),
    AdapterPlan("bullets", 8, 16, ("q_proj", "v_proj"), None, steps=40, lr=2e-3, seed=22),
    AdapterPlan(
        "whisper", 4, 8, ("q_proj", "k_proj", "v_proj", "o_proj"), None, steps=80, lr=2e-3, seed=23
    ),
    AdapterPlan(
        "title", 16, 32, ("q_proj", "v_proj"), tuple(range(10, 30)), steps=80, lr=2e-3, seed=24
    ),
)


def encode(
    tokenizer, examples: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels for (prompt, answer) pairs.

    The prompt is tokenized as the engine does (``add_special_tokens=True``) and the answer
    separately, followed by the end-of-turn token: the model sees exactly the ids it sees
    when it generates. Labels are -100 except on the answer and end-of-turn tokens."""
    rows, label_rows = [], []
    for prompt, answer in examples:
        p = tokenizer(prompt, add_special_tokens=True).input_ids
        a = [*tokenizer(answer, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        rows.append(p + a)
        label_rows.append([-100] * len(p) + a)
    return pad_batch(rows, label_rows, tokenizer.pad_token_id)


def answer_loss(lm, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions of a causal LM.

    Projects only those positions onto the vocabulary: the tied 49k x 576 head costs as
    much as eight decoder layers, and most positions are prompt."""
    hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    return torch.nn.functional.cross_entropy(lm.lm_head(hidden[keep]), target[keep])


def train_adapter(
    model_dir: Path, tokenizer, plan: AdapterPlan, pairs: list[tuple[str, str]], batch_size: int
):
    """A PEFT model of the base with ``plan``'s LoRA trained on ``pairs`` (prompt, base
    answer), each answer rewritten by ``plan.task``'s transform. Returns it in eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(plan.seed)  # LoRA A init
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(
        r=plan.rank,
        lora_alpha=plan.alpha,
        lora_dropout=0.0,
        target_modules=list(plan.targets),
        layers_to_transform=list(plan.layers) if plan.layers else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    lm = model.get_base_model()  # LoRA layers are injected in place: train through it
    examples = [(p, chat_demo.transform(plan.task, a)) for p, a in pairs]
    rng = random.Random(plan.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
    model.train()
    order: list[int] = []
    t0 = time.perf_counter()
    running = 0.0
    for step in range(plan.steps):
        if len(order) < batch_size:  # epochs of shuffled examples
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, plan.steps, plan.lr, warmup=max(1, plan.steps // 10))
        loss = answer_loss(lm, *encode(tokenizer, batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        if step % 10 == 0 or step == plan.steps - 1:
            print(
                f"  [{plan.task}] step {step:4d}/{plan.steps} loss {running:.4f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    return model.eval()


def save_adapter(model, dest: Path) -> None:
    """Save ``model``'s adapter under ``dest`` in bfloat16 with a stable, sorted config."""
    for p in model.parameters():
        if p.requires_grad:
            # Halves the files; lorafleet and PEFT both upcast on load (the engine to its
            # own dtype). The evaluation reads the saved files: it measures what ships.
            p.data = p.data.to(torch.bfloat16)
    cfg = model.peft_config["default"]
    # The catalog name, not this machine's path: the server is handed the base itself.
    cfg.base_model_name_or_path = chat_demo.BASE_MODEL_NAME
    cfg.inference_mode = True
    # No embedding check: it would look the base model name up on the hub.
    model.save_pretrained(str(dest), save_embedding_layers=False)
    (dest / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    # safetensors writes its file owner-only (0600); package data must be world-readable.
    (dest / "adapter_model.safetensors").chmod(0o644)
    # PEFT keeps target_modules as a set: sort it so that reruns write identical files.
    cfg_path = dest / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["target_modules"] = sorted(data["target_modules"])
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- evaluation --------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Held-out results through lorafleet's engine: per task (``None``: base model) the
    fraction of answers passing ``chat_demo.check``, per adapter the fraction equal to the
    transformed base answer, every answer's text and token ids (for the printed table and
    the PEFT comparison), and how long the batch took."""

    format_accuracy: dict[str | None, float]
    exact: dict[str, float]
    token_ids: dict[tuple[str, str | None], list[int]]
    texts: dict[tuple[str, str | None], str]
    seconds: float


def evaluate(
    model_dir: Path, adapters: dict[str, Path], held: list[str], base: dict[str, str], threads: int
) -> Evaluation:
    """Serve the saved adapters and the base model in one mixed batch of held-out questions
    with lorafleet's in-process engine, as the demo does, and score the answers."""
    llm = LLM(
        model=str(model_dir),
        max_model_len=1024,
        max_loras=4,
        max_lora_rank=16,
        num_threads=threads,
    )
    tokenizer = llm.get_tokenizer()
    loras = lora_requests(adapters)
    jobs = [(q, task) for q in held for task in [None, *loras]]
    t0 = time.perf_counter()
    outs = llm.generate(
        [chat_prompt(tokenizer, q) for q, _ in jobs],
        SamplingParams(max_tokens=chat_demo.MAX_TOKENS, temperature=0.0),
        lora_request=[loras[t] if t else None for _, t in jobs],
    )
    seconds = time.perf_counter() - t0
    texts = {job: out.outputs[0].text for job, out in zip(jobs, outs, strict=True)}
    token_ids = {job: list(out.outputs[0].token_ids) for job, out in zip(jobs, outs, strict=True)}
    fmt = {
        task: sum(chat_demo.check(task, texts[q, task]) for q in held) / len(held)
        for task in [None, *loras]
    }
    answered = [q for q in held if q in base]
    exact = {
        task: sum(texts[q, task] == chat_demo.transform(task, base[q]) for q in answered)
        / len(answered)
        for task in loras
    }
    return Evaluation(fmt, exact, token_ids, texts, seconds)


@torch.no_grad()
def peft_agreement(
    model_dir: Path, adapters: dict[str, Path], questions: list[str], ev: Evaluation
) -> tuple[int, int]:
    """(agreeing, compared): the engine's greedy token ids for ``questions`` against
    transformers + PEFT greedy decoding of each request alone, for every adapter and the
    base model (fp32 on the CPU: the project's correctness reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    first, *rest = sorted(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[first]), adapter_name=first)
    for task in rest:
        model.load_adapter(str(adapters[task]), adapter_name=task)
    model.eval()
    eos = tokenizer.eos_token_id

    def strip_eos(ids: list[int]) -> list[int]:
        return ids[:-1] if ids and ids[-1] == eos else ids

    agree = total = 0
    for task in [None, *sorted(adapters)]:
        for q in questions:
            enc = tokenizer(chat_prompt(tokenizer, q), return_tensors="pt")
            kwargs = {"do_sample": False, "max_new_tokens": chat_demo.MAX_TOKENS}
            if task is None:
                with model.disable_adapter():
                    out = model.generate(**enc, **kwargs)
            else:
                model.set_adapter(task)
                out = model.generate(**enc, **kwargs)
            ref = strip_eos(out[0, enc["input_ids"].shape[1] :].tolist())
            same = ref == strip_eos(ev.token_ids[q, task])
            agree += same
            total += 1
            if not same:
                print(f"  PEFT disagrees: {task or '(base)'} {q!r}", flush=True)
    return agree, total


# -- main --------------------------------------------------------------------------------


#: Where the assets are written (the package's shipped copy), and why one thread.
OUT = Path("worker/demo/assets/chat_demo")
THREADS_WHY = (
    "torch threads (at most the cores you have). 1 by default: on 2 cores "
    "shared with other jobs, 2 threads took twice as long (33 minutes against 16), and "
    "bit-identical reruns need the same count"
)


def main(argv: list[str] | None = None) -> None:
    """Generate the base answers, train and save every adapter, evaluate, write the record."""
    ap = training_parser(__doc__, out=OUT, batch_size=8, threads_help=THREADS_WHY)
    ap.add_argument(
        "--model",
        default="smollm2",
        help="the base model: a prepared Hugging Face folder, or a catalog name to prepare",
    )
    ap.add_argument(
        "--peft-check",
        type=int,
        default=3,
        help="held-out questions per adapter compared token for token with PEFT",
    )
    args = ap.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per from_pretrained buries the log
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model_dir = Path(args.model) if Path(args.model).is_dir() else prepare_model(args.model)
    assert {p.task for p in ADAPTERS} == set(chat_demo.TASKS), "plans must cover TASKS"

    training, held = split_questions()
    assert not set(training) & set(held)
    llm = LLM(model=str(model_dir), max_model_len=1024, num_threads=args.threads)
    tokenizer = llm.get_tokenizer()
    t0 = time.perf_counter()
    base = base_answers(llm, training + held)
    del llm  # its KV cache and weights: training loads its own copy
    pairs = [(chat_prompt(tokenizer, q), base[q]) for q in training if q in base]
    print(
        f"base answers: {len(base)} usable of {len(training) + len(held)} questions "
        f"({time.perf_counter() - t0:.0f}s); {len(pairs)} training pairs",
        flush=True,
    )

    adapters_dir = args.out / "adapters"
    if adapters_dir.exists():
        shutil.rmtree(adapters_dir)
    adapters: dict[str, Path] = {}
    plans: dict[str, dict] = {}
    for plan in ADAPTERS:
        t0 = time.perf_counter()
        model = train_adapter(model_dir, tokenizer, plan, pairs, args.batch_size)
        dest = adapters_dir / plan.task
        save_adapter(model, dest)
        del model
        adapters[plan.task] = dest
        plans[plan.task] = {
            "rank": plan.rank,
            "alpha": plan.alpha,
            "targets": list(plan.targets),
            "layers": f"{plan.layers[0]}-{plan.layers[-1]}" if plan.layers else "all",
            "steps": plan.steps,
            "lr": plan.lr,
            "seed": plan.seed,
            "bytes": (dest / "adapter_model.safetensors").stat().st_size,
            "seconds": round(time.perf_counter() - t0),
        }

    ev = evaluate(model_dir, adapters, held, base, args.threads)
    for q in held[:8]:
        for task in [None, *sorted(adapters)]:
            print(f"{q[:34]:<36}{task or '(base)':<9}{ev.texts[q, task][:90]!r}")
    agree, compared = peft_agreement(model_dir, adapters, held[: args.peft_check], ev)
    for task, plan_record in plans.items():
        plan_record["held_out_format_accuracy"] = round(ev.format_accuracy[task], 3)
        plan_record["held_out_exact"] = round(ev.exact[task], 3)
    record = {
        "model": chat_demo.BASE_MODEL_NAME,
        "held_out": held,
        "training_questions": training,
        "training": {
            "command": "python scripts/train_chat_demo.py --out worker/demo/assets/chat_demo "
            f"--threads {args.threads}",
            "torch": torch.__version__,
            "threads": args.threads,
            "split_seed": SPLIT_SEED,
            "batch_size": args.batch_size,
            "usable_base_answers": len(base),
            "training_pairs": len(pairs),
            "adapters": plans,
            "base_model_format_accuracy": round(ev.format_accuracy[None], 3),
            "held_out_batch_seconds": round(ev.seconds, 1),
            "peft_token_agreement": f"{agree}/{compared}",
            "minutes": round((time.perf_counter() - t_start) / 60, 1),
        },
    }
    path = args.out / "questions.json"
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(record["training"], indent=1))


if __name__ == "__main__":
    main()
