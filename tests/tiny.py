"""Tiny models and tokenizers built in-process for the tests (no downloads, no files in the repo).

`tests/conftest.py` wraps these in session fixtures; test modules and subprocess scripts
(e.g. `accelerate launch` workers) can import them directly.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# ChatML-style template; `{% generation %}` marks assistant tokens so TRL's
# `assistant_only_loss` can find them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

_WORDS = (
    "the a an speculative decoding draft model target token sparse prune train "
    "fast slow small large accept reject verify sample greedy mask weight layer "
    "cat dog runs jumps over under quick brown lazy hello world answer question "
    "why how what when where python code data set number one two three four five"
).split()


def corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English text used to train the tiny tokenizers."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    return lines


def build_tokenizer(vocab_size: int = 384, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a chat template; different seeds/sizes give different vocabularies."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    num_layers: int = 2,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> LlamaForCausalLM:
    """A tiny Llama (head_dim 64, which vLLM's CPU attention supports), fp32, random init."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def gemma3_model(layer_types: list[str], sliding_window: int, **config):
    """A tiny Gemma-3 (hybrid attention): one decoder block per entry of `layer_types`
    ("sliding_attention" / "full_attention"); `config`: further `Gemma3TextConfig` fields."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    sizes = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "head_dim": 16}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 1}
    layers = {"num_hidden_layers": len(layer_types), "layer_types": layer_types}
    config = Gemma3TextConfig(**sizes, **heads, **layers, sliding_window=sliding_window, **config)
    return Gemma3ForCausalLM(config)


def save_model(model, tokenizer, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# (category, first turn) of the small MT-Bench-style prompt files the evaluation tests use.
QUESTIONS = [
    ("writing", "Hello world, why is the draft model fast?"),
    ("math", "One two three four five?"),
    ("writing", "The quick brown dog runs over the lazy cat."),
    ("math", "How many sparse layers does the target prune?"),
]


def write_questions(path: str | Path, *later_turns: str) -> Path:
    """`QUESTIONS` as a FastChat `question.jsonl`, each followed by `later_turns`."""
    path = Path(path)
    rows = [
        {"question_id": i + 1, "category": cat, "turns": [q, *later_turns]}
        for i, (cat, q) in enumerate(QUESTIONS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_seed_data(directory: Path) -> None:
    """The data a tiny recipe or study names by relative paths: `seed.jsonl` (8 conversations)
    and `question.jsonl` (`QUESTIONS`), in `directory` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = conversations(8)
    (directory / "seed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_questions(directory / "question.jsonl")


def noisy_model(tokenizer, scale: float = 0.05, seed: int = 5):
    """The seed-0 model (the tests' target) with noise of `scale` × std added to its decoder
    weights: a drafter that agrees with the target part of the time."""
    model = build_model(tokenizer, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return model


def word_cycle_text(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Lines that walk the word list `_WORDS` in order (wrapping round) from a random word: text
    whose next word is determined by the last one, unlike `corpus`'s random words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        start, length = rng.randrange(len(_WORDS)), rng.randint(6, 20)
        lines.append(" ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(length)))
    return lines


_TRAINED: dict[tuple, LlamaForCausalLM] = {}


def trained_model(tokenizer, steps: int = 100, seed: int = 0) -> LlamaForCausalLM:
    """The seed's tiny Llama trained for `steps` AdamW steps on `word_cycle_text` (a few seconds;
    cached per process, a fresh copy each call). Greedy decoding then continues any prompt along
    the word cycle with clear margins between logits, so a drafter derived from it (pruned,
    quantized, a cheaper head) agrees with it where a random drafter does not. The random-init
    models' logits are near-ties that any perturbation flips: drafters derived from them agree
    little more than random ones, too little for a test to tell them apart."""
    import copy

    key = (tuple(sorted(tokenizer.get_vocab().items())), steps, seed)
    if key not in _TRAINED:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # see the `single_torch_thread` fixture: faster when shared
        try:
            _TRAINED[key] = _train_on_word_cycle(tokenizer, steps, seed)
        finally:
            torch.set_num_threads(threads)
    return copy.deepcopy(_TRAINED[key])


def _train_on_word_cycle(tokenizer, steps: int, seed: int) -> LlamaForCausalLM:
    model = build_model(tokenizer, seed=seed).train()
    ids = torch.tensor(tokenizer(" ".join(word_cycle_text(seed=seed))).input_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    length, batch = 64, 8
    for _ in range(steps):
        starts = torch.randint(len(ids) - length, (batch,), generator=generator).tolist()
        x = torch.stack([ids[i : i + length] for i in starts])
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@torch.inference_mode()
def assisted_greedy(
    target, drafter, tokenizer, prompts: list[str], k: int = 3, max_new_tokens: int = 24
) -> tuple[list[list[int]], float]:
    """Greedy transformers assisted generation of each prompt with `drafter` drafting exactly `k`
    tokens a step: the generated ids per prompt, and the MAL over all prompts, counted per
    verification step as `sd2 eval` counts it (`sd2_hf.evaluation.transformers_backend`)."""
    from sd2_hf.evaluation.assisted_steps import StepRecorder, set_draft_length
    from sd2_hf.evaluation.backend import add_counters, counters_from_steps

    set_draft_length(drafter, k)
    outputs, counters = [], []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        recorder = StepRecorder()
        hook = target.register_forward_pre_hook(recorder.on_target_forward, with_kwargs=True)
        try:
            out = target.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                assistant_model=drafter,
                streamer=recorder,
            )
        finally:
            hook.remove()
        outputs.append(out[0, inputs["input_ids"].shape[1] :].tolist())
        counters.append(counters_from_steps(recorder.steps()))
    return outputs, add_counters(counters, positions=k).mal


def decoder_linear_layers(model) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside the decoder blocks (never embeddings or lm_head)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"
    }


@torch.no_grad()
def magnitude_sparsify(model, sparsity: float = 0.5, structure: str = "unstructured"):
    """Zero the smallest-magnitude weights of every decoder linear layer.

    structure: "unstructured" (per-layer threshold) or "2:4" (2 of every 4 consecutive
    weights along the input dimension).
    """
    for module in decoder_linear_layers(model).values():
        w = module.weight
        if structure == "2:4":
            groups = w.abs().reshape(w.shape[0], -1, 4)
            idx = groups.argsort(dim=-1)[..., :2]
            mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, idx, False)
            w.mul_(mask.reshape(w.shape))
        elif structure == "unstructured":
            k = int(w.numel() * sparsity)
            if k:
                thresh = w.abs().flatten().kthvalue(k).values
                w.mul_(w.abs() > thresh)
        else:
            raise ValueError(f"structure must be 'unstructured' or '2:4', got {structure!r}")
    return model


def trainer_kwargs(output_dir, **overrides) -> dict:
    """`SD2Config` arguments for a few quick steps on the tiny models (tests, `accelerate launch`
    workers, benches): no saving, no reporting, no progress bars, CPU; `overrides` win."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        max_length=96,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


def prune(model_dir, out, dataset, **options):
    """`sd2 prune` of a tiny model, calibrated on 16 rows of 64 tokens; `options` are further
    `PruneConfig` fields (recipe, method, draft_vocab_size, ...). Returns the `PruneResult`."""
    from sd2_hf.pruning.config import PruneConfig
    from sd2_hf.pruning.runner import run_prune

    config = PruneConfig(
        model=str(model_dir),
        output=str(out),
        dataset=str(dataset),
        num_samples=16,
        max_seq_length=64,
        **options,
    )
    result = run_prune(config)
    assert result.output == str(out)
    return result


def distilling_trainer(model, tokenizer, output_dir, trainer_class=None, **args):
    """An `SD2Trainer` (or `trainer_class`) of `model` distilled from the seed-1 tiny model on 32
    conversations; `args` are `SD2Config` fields over `trainer_kwargs`."""
    from datasets import Dataset

    from sd2_hf import SD2Config, SD2Trainer

    return (trainer_class or SD2Trainer)(
        model,
        args=SD2Config(**trainer_kwargs(output_dir, **args)),
        teacher_model=build_model(tokenizer, seed=1),
        train_dataset=Dataset.from_list(conversations(32)),
        processing_class=tokenizer,
    )


def export(drafter, out, **options):
    """`sd2 export` of the checkpoint `drafter` to `out`; `options` are further `ExportConfig`
    fields (format, target, num_draft_tokens, ...). Returns the `ExportResult`."""
    from sd2_hf.export.config import ExportConfig
    from sd2_hf.export.export import run_export

    return run_export(ExportConfig(drafter=str(drafter), output=str(out), **options))


def eval_config(target, prompts, output, **options):
    """`EvalConfig` of `target` on the prompt file `prompts`, written to `output`; `options` are
    further `EvalConfig` fields."""
    from sd2_hf.evaluation.config import EvalConfig

    values = {"target": str(target), "prompts": str(prompts), "output": str(output)}
    return EvalConfig(**(values | options))


def load_script(path: Path) -> ModuleType:
    """The Python file `path` (a bench script, not a package module) imported as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def conversations(n: int = 16, seed: int = 0) -> list[dict]:
    """Small chat dataset rows in the `messages` form."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 8)))
        a = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}: {q}?"},
                    {"role": "assistant", "content": a.capitalize() + "."},
                ]
            }
        )
    return rows
