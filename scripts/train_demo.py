"""Train the demo's tiny base model and its task adapters (CPU, fixed seeds, a few minutes).

    python scripts/train_demo.py --out worker/demo/assets/demo

writes, under ``--out``:

- ``base/``: a from-scratch ``LlamaForCausalLM`` with a character-level tokenizer that
  copies a word: ``<s>hello>`` -> ``hello</s>``;
- ``adapters/<task>/``: one PEFT LoRA adapter per task in
  ``lorafleet.worker.demo.demo_assets.TASKS`` (other than ``copy``), trained on the frozen base;
- ``words.json``: the held-out words and how training words are sampled.

The task functions, prompt format and held-out words come from
``lorafleet.worker.demo.demo_assets``, the same module the demo and the tests read, so what is
trained is what is checked. Training words are random lowercase strings drawn on the fly
from a seeded RNG (never a held-out word); held-out words are real English words, so the
demo output is readable and accuracy measures generalisation, not memorisation.

Determinism: every phase reseeds torch and its own ``random.Random``; with the same torch
build and thread count the weights are identical, across thread counts they agree to float
rounding.
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

from lorafleet.worker.demo.demo_assets import (
    ALPHABET,
    BASE_MODEL_NAME,
    BASE_TASK,
    MAX_WORD_LEN,
    MIN_WORD_LEN,
    PROMPT_SUFFIX,
    TASKS,
    demo_prompt,
    expected_output,
)

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, in this order
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
# Then the separator and the letters: ids 4 ('>') and 5..30 ('a'..'z').
PROMPT_CHARS = PROMPT_SUFFIX + ALPHABET
# Chance that a letter repeats an earlier letter of the word instead of being uniform:
# uniform strings rarely repeat letters, yet "coffee" and "banana" must copy, sort and
# dedupe correctly, and dedupe has nothing to learn without repeats.
REPEAT_P = 0.2
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Real English words of 3-8 letters, never used for training (the sampler rejects them).
# fmt: off
HELD_OUT = [
    "hello", "world", "banana", "python", "queue", "redis", "worker", "adapter", "kernel",
    "tensor", "batch", "token", "model", "server", "cache", "paged", "stream", "metric",
    "rotate", "mirror", "letter", "coffee", "garden", "planet", "rocket", "silver",
    "winter", "summer", "orange", "purple", "yellow", "button", "pencil", "candle",
    "dragon", "forest", "island", "jungle", "kitten", "ladder", "meadow", "nickel",
    "oyster", "parrot", "quartz", "rabbit", "saddle", "turtle", "violin", "walrus",
    "zipper", "apple", "bread", "cloud", "dance", "eagle", "flame", "grape", "house",
    "juice", "lemon", "mango", "night", "ocean", "piano", "river", "snake", "tiger",
    "zebra", "cat", "dog", "sun", "sky", "owl", "fox", "jazz", "quiz", "lamp", "frog",
    "moon", "star",
]
# fmt: on


@dataclass(frozen=True)
class AdapterPlan:
    """How one task adapter is trained."""

    task: str
    rank: int
    alpha: float
    steps: int
    lr: float
    seed: int


# Different ranks on purpose: the server must handle a mix. Harder tasks get the larger
# rank and more steps: sort must rank letters and dedupe must look back over the whole
# word, where reverse and rot13 only route or relabel one letter (measured: dedupe at 900
# steps reached 94% held-out, at 2000 steps 100%).
ADAPTERS = (
    AdapterPlan("reverse", rank=8, alpha=16, steps=800, lr=3e-3, seed=11),
    AdapterPlan("rot13", rank=8, alpha=16, steps=800, lr=3e-3, seed=12),
    AdapterPlan("sort", rank=16, alpha=32, steps=1200, lr=3e-3, seed=13),
    AdapterPlan("dedupe", rank=16, alpha=32, steps=2000, lr=3e-3, seed=14),
)


def build_tokenizer():
    """Character-level tokenizer: one token per character, BOS prepended, exact decoding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in PROMPT_CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character is its own pre-token (WordLevel then maps it to one id); "isolated"
    # keeps each match as a piece instead of dropping it as a delimiter.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins tokens with no separator; the default would put spaces between chars.
    tok.decoder = decoders.Fuse()
    # Prompts start with BOS like any Llama prompt; the model was trained that way.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        # Decoder-only batched generation needs left padding.
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )
    return fast, vocab


def sample_word(rng: random.Random, exclude: frozenset[str]) -> str:
    """A random lowercase word of MIN_WORD_LEN..MAX_WORD_LEN letters, never one in ``exclude``."""
    while True:
        n = rng.randint(MIN_WORD_LEN, MAX_WORD_LEN)
        letters: list[str] = []
        for _ in range(n):
            if letters and rng.random() < REPEAT_P:
                letters.append(rng.choice(letters))
            else:
                letters.append(rng.choice(ALPHABET))
        word = "".join(letters)
        if word not in exclude:
            return word


def encode_batch(
    words: list[str], task: str, vocab: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``<s>word>answer</s>`` ids, attention mask, and answer-only labels."""
    rows, label_rows = [], []
    for w in words:
        prompt = [BOS_ID] + [vocab[c] for c in demo_prompt(w)]
        answer = [vocab[c] for c in expected_output(task, w)] + [EOS_ID]
        rows.append(prompt + answer)
        # Loss on the answer and EOS only: the prompt is random, there is nothing to learn.
        label_rows.append([-100] * len(prompt) + answer)
    return pad_batch(rows, label_rows, PAD_ID)


def train(
    model: torch.nn.Module,
    task: str,
    vocab: dict[str, int],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    exclude: frozenset[str],
    label: str,
) -> float:
    """Train the model's trainable parameters on ``task``; returns seconds spent."""
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    t0 = time.perf_counter()
    running = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        words = [sample_word(rng, exclude) for _ in range(batch_size)]
        ids, mask, labels = encode_batch(words, task, vocab)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == steps - 1:
            print(
                f"  [{label}] step {step:5d}/{steps} loss {running:.4f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    model.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task: str, words: list[str]) -> tuple[float, list[str]]:
    """Greedy transformers ``generate`` on ``words`` (one left-padded batch) vs the task."""
    enc = tokenizer([demo_prompt(w) for w in words], return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_WORD_LEN + 2)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    wrong = [
        f"{w}->{t}" for w, t in zip(words, texts, strict=True) if t != expected_output(task, w)
    ]
    return 1 - len(wrong) / len(words), wrong


#: Where the assets are written (the package's shipped copy), and why one thread.
OUT = Path("worker/demo/assets/demo")
THREADS_WHY = (
    "torch threads; 1 by default: a model this small gains little from more, "
    "they thrash on a shared CPU, and bit-identical reruns need the same count"
)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, train the base and every adapter, save, and report accuracy."""
    ap = training_parser(__doc__, out=OUT, batch_size=64, threads_help=THREADS_WHY)
    ap.add_argument("--base-steps", type=int, default=800)
    ap.add_argument(
        "--adapter-steps-scale",
        type=float,
        default=1.0,
        help="multiply every adapter's step count (quick experiments)",
    )
    ap.add_argument(
        "--tasks",
        nargs="*",
        default=[a.task for a in ADAPTERS],
        help="adapters to train (default: all)",
    )
    ap.add_argument("--seed", type=int, default=0, help="base model seed")
    ap.add_argument(
        "--reuse-base",
        action="store_true",
        help="keep the base already in --out and train adapters only (iterating)",
    )
    args = ap.parse_args(argv)

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per from_pretrained buries the log
    torch.set_num_threads(args.threads)
    assert set(TASKS) == {BASE_TASK, *(a.task for a in ADAPTERS)}, "plan must cover TASKS"
    exclude = frozenset(HELD_OUT)
    # A second, random held-out set (never sampled for training either) gives a steadier
    # accuracy estimate than the real words alone.
    eval_rng = random.Random(1234)
    random_eval = sorted({sample_word(eval_rng, exclude) for _ in range(400)})
    exclude = exclude | frozenset(random_eval)

    out: Path = args.out
    base_dir, adapters_dir = out / "base", out / "adapters"
    for d in (adapters_dir,) if args.reuse_base else (base_dir, adapters_dir):
        if d.exists():
            shutil.rmtree(d)
    base_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # ---- base model: copy -------------------------------------------------------------
    tokenizer, vocab = build_tokenizer()
    tokenizer.save_pretrained(str(base_dir))
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA on purpose: the server's attention must handle it
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    if args.reuse_base:
        model, secs = LlamaForCausalLM.from_pretrained(str(base_dir)).eval(), 0.0
    else:
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            do_sample=False,
            max_new_tokens=2 * MAX_WORD_LEN,
        )
        n_params = sum(p.numel() for p in model.parameters())
        print(f"base: {n_params:,} parameters, vocab {len(vocab)}", flush=True)
        secs = train(
            model, BASE_TASK, vocab,
            steps=args.base_steps, lr=3e-3, batch_size=args.batch_size, seed=args.seed + 1,
            exclude=exclude, label="copy",
        )  # fmt: skip
        model.config._name_or_path = BASE_MODEL_NAME
        model.save_pretrained(str(base_dir))
    report: dict[str, dict[str, float]] = {}
    acc_words, wrong = greedy_accuracy(model, tokenizer, BASE_TASK, HELD_OUT)
    acc_rand, _ = greedy_accuracy(model, tokenizer, BASE_TASK, random_eval)
    report[BASE_TASK] = {"held_out": acc_words, "random": acc_rand, "seconds": secs}
    print(f"copy: held-out {acc_words:.1%} random {acc_rand:.1%} wrong={wrong[:8]}", flush=True)

    # ---- adapters: each trained on the frozen base -------------------------------------
    for plan in ADAPTERS:
        if plan.task not in args.tasks:
            continue
        base = LlamaForCausalLM.from_pretrained(str(base_dir))
        torch.manual_seed(plan.seed)  # LoRA A init
        lora = LoraConfig(
            r=plan.rank,
            lora_alpha=plan.alpha,
            lora_dropout=0.0,
            target_modules=list(TARGETS),
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(base, lora)
        steps = max(1, round(plan.steps * args.adapter_steps_scale))
        secs = train(
            peft_model, plan.task, vocab,
            steps=steps, lr=plan.lr, batch_size=args.batch_size, seed=plan.seed,
            exclude=exclude, label=plan.task,
        )  # fmt: skip
        # A stable name, not this machine's path: the server is handed the base itself.
        peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL_NAME
        peft_model.peft_config["default"].inference_mode = True
        dest = adapters_dir / plan.task
        # No embedding check: it would try to fetch BASE_MODEL_NAME's config from the hub.
        peft_model.save_pretrained(str(dest), save_embedding_layers=False)
        (dest / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
        # PEFT keeps target_modules as a set, so its JSON order follows string hashing:
        # sort it so that reruns write identical files.
        cfg_path = dest / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        # Measure what users get: a fresh base plus the saved adapter.
        fresh = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base_dir)), dest)
        fresh.eval()
        acc_words, wrong = greedy_accuracy(fresh, tokenizer, plan.task, HELD_OUT)
        acc_rand, _ = greedy_accuracy(fresh, tokenizer, plan.task, random_eval)
        report[plan.task] = {"held_out": acc_words, "random": acc_rand, "seconds": secs}
        print(
            f"{plan.task} (r={plan.rank}): held-out {acc_words:.1%} random {acc_rand:.1%} "
            f"wrong={wrong[:8]}",
            flush=True,
        )

    words = {
        "held_out": HELD_OUT,
        "training": {
            "source": "random lowercase strings sampled on the fly (scripts/train_demo.py)",
            "lengths": [MIN_WORD_LEN, MAX_WORD_LEN],
            "repeat_p": REPEAT_P,
            "excludes": "every held_out word, and 400 random words kept for evaluation",
        },
    }
    (out / "words.json").write_text(json.dumps(words, indent=1) + "\n", encoding="utf-8")
    print(f"total {time.perf_counter() - t_start:.0f}s; accuracy {json.dumps(report)}")


if __name__ == "__main__":
    main()
