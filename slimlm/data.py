"""Calibration text: where it comes from and how it becomes token windows.

`--calib self` (the default) is data-free: the model writes its own calibration text from a built-in,
varied list of instructions (several genres crossed with many topics), sampled with a fixed seed,
batched, with a KV cache. A `.txt` or `.jsonl` file, or `hf:NAME[:CONFIG[:SPLIT]]` through `datasets`,
can be used instead.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from slimlm.errors import SlimlmError
from slimlm.generate import generate_batch, repeats

# Genres x topics for self-calibration. Varied on purpose: the replacement must map hidden states of
# whatever the model will later read, so one genre (e.g. only stories) would leave it blind elsewhere.
GENRES = [
    "Write an encyclopedia article about {t}.",
    "Explain {t} to a curious student, step by step.",
    "Write a short story in which {t} plays a part.",
    "Write a news report about a recent event involving {t}.",
    "Give practical advice and a how-to guide related to {t}.",
    "Write a conversation between two people discussing {t}.",
    "Describe the history of {t} in detail.",
    "Write a persuasive essay about {t}.",
]
TOPICS = [
    "the Roman Empire", "photosynthesis", "a small fishing village", "jazz music", "volcanoes", "the stock market",
    "a football season", "medieval castles", "machine learning", "the French Revolution", "coral reefs",
    "cooking pasta", "the solar system", "a famous painter", "railway history", "the human heart", "chess",
    "climate and weather", "a national park", "ancient Egypt", "the printing press", "honey bees", "a rock band",
    "the Olympic Games", "bridges and their engineering", "a World War II battle", "tea", "the moon landing",
    "a city in South America", "vaccines", "Shakespeare", "desert animals", "the internet", "a royal family",
    "gardening", "an election campaign", "the Amazon river", "electric cars", "a hurricane", "opera",
    "the immune system", "a mountain expedition", "video games", "the Silk Road", "a hospital", "birds of prey",
    "mathematics", "a film director", "renewable energy", "a small business", "the Arctic", "religion in history",
    "a museum", "earthquakes", "a college basketball team", "poetry", "shipwrecks", "the Industrial Revolution",
    "a TV series", "friendship", "a village festival", "dinosaurs", "a scientific discovery", "the law and courts",
]
# Plain-text document openings, continued without the chat template: the model then writes text like
# its pre-training data (articles, reports, stories, notes), which the chat answers alone under-represent.
OPENINGS = [
    "{T}\n\n", "{T}\n\n{T} is", "The history of {t}\n\n", "{T}: an overview\n\nIntroduction\n\n",
    "News report: {t}\n\n", "A story about {t}\n\nChapter 1\n\n", "A guide to {t}\n\n", "Notes on {t}\n\n",
]
# Share of the plain-text samples that begin with BOS alone, where the tokenizer has one: the model's own choice of
# what a document is (for Gemma 3 270M: encyclopedia articles, source code, Japanese and Spanish pages, YAML headers),
# far more varied than any list of openings; the openings keep the text in English prose where topics are named.
SELF_FREE_FRAC = 0.5
# Longest answer sampled per instruction: long answers cost more per token (attention over a growing cache,
# finished rows idling until the longest is done) and drift; several short answers are packed per window.
SELF_MAX_NEW_TOKENS = 256
# Sampling settings for self-calibration: temperature < 1 with nucleus sampling keeps a small model's text
# fluent (pure temperature-1 samples of a 135M model drift into noise) while staying varied.
SELF_TEMPERATURE = 0.8
SELF_TOP_P = 0.95
SELF_REPETITION_PENALTY = 1.1
# A sample is cut where it starts to loop: at the first run of LOOP_NGRAM tokens it has written before. A model's
# loops ("the the the", a sentence over and over) teach the layer scores and the replacement degenerate text; a
# base model (no chat template) loops often at these settings. Ten tokens again within one sample is a loop far
# more often than prose.
LOOP_NGRAM = 10


def loop_start(ids: list[int], n: int = LOOP_NGRAM) -> int | None:
    """Index of the first run of n tokens in `ids` that occurred earlier in `ids` (where a loop begins), or None.
    The rule `generate_batch(loop_ngram=n)` applies token by token (`slimlm.generate.repeats`)."""
    seen: set[tuple[int, ...]] = set()
    for end in range(n, len(ids) + 1):
        if repeats(ids[end - n:end], seen):
            return end - n
    return None


def self_prompts(n: int, seed: int, plain_frac: float = 0.5, free_frac: float = 0.0) -> list[tuple[str, bool]]:
    """n (text, chat) prompts: chat instructions (chat=True) and plain-text openings, interleaved evenly with a
    share `plain_frac` of openings (0.5: alternating, an instruction first). A share `free_frac` of the openings,
    spread evenly among them, is the empty text: the document begins with BOS alone and the model writes
    whatever its pre-training taught it to begin a document with (`self_generate` asks for them only where the
    tokenizer has a BOS)."""
    for name, frac in (("plain_frac", plain_frac), ("free_frac", free_frac)):
        if not 0 <= frac <= 1:
            raise SlimlmError(f"{name} must be in [0, 1], got {frac}")
    rng = random.Random(seed)
    chat, plain = [], []
    for kind, templates, into in ((True, GENRES, chat), (False, OPENINGS, plain)):
        pairs = [(g, t) for g in templates for t in TOPICS]
        rng.shuffle(pairs)
        into.extend((g.format(t=t, T=t[0].upper() + t[1:]), kind) for g, t in pairs)
    if free_frac > 0:
        plain = _interleave(plain, [("", False)], free_frac, len(plain))
    return _interleave(chat, plain, plain_frac, n)


def _interleave(first: list, second: list, frac: float, n: int) -> list:
    """n items: a share `frac` from `second`, spread evenly (floor((i + 1) * frac) of the first i + 1), the rest
    from `first`; each list is taken in order and cycled."""
    out, used = [], 0
    for i in range(n):
        if int((i + 1) * frac) > used:
            out.append(second[used % len(second)])
            used += 1
        else:
            out.append(first[(i - used) % len(first)])
    return out


# Short instructions for on-policy recovery (the pruned model answers them itself): questions whose good answers
# are a sentence or a short list and then end, the kind of turn where a pruned model's answers loop or never stop.
SHORT_ASKS = [
    "What is {t}?", "Give one interesting fact about {t}.", "Name three things associated with {t}.",
    "In one sentence, why does {t} matter?", "Write a two-line poem about {t}.", "Is {t} important? Answer briefly.",
    "Summarize {t} in three bullet points.", "What question would a child ask about {t}? Answer it.",
]


def onpolicy_prompts(tokenizer, n: int, seed: int) -> list[str]:
    """n chat-formatted instructions for on-policy recovery: short asks and the long-form genres, alternating."""
    rng = random.Random(seed + 1)
    short = [(g, t) for g in SHORT_ASKS for t in TOPICS]
    long = [(g, t) for g in GENRES for t in TOPICS]
    rng.shuffle(short)
    rng.shuffle(long)
    bos = _bos_text(tokenizer)
    out = []
    for i in range(n):
        g, t = short[(i // 2) % len(short)] if i % 2 == 0 else long[(i // 2) % len(long)]
        out.append(_chat(tokenizer, g.format(t=t), bos))
    return out


def pack_stream(pieces: list[torch.Tensor], seq_len: int) -> torch.Tensor:
    """Concatenate token sequences into one stream and cut it into (n, seq_len) windows (the tail is dropped),
    as pre-training data is packed."""
    if not pieces:
        return torch.empty(0, seq_len, dtype=torch.long)
    stream = torch.cat(pieces)
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def bos_ids(tokenizer) -> list[int]:
    """[the BOS id] when the tokenizer puts a BOS token before a text by default (Gemma, Llama 3), else [] (SmolLM2,
    Qwen). Text that slimlm tokenizes without special tokens (calibration and evaluation windows, sampling prompts
    without a chat template, multiple-choice contexts) gets it back: without it such a model computes something
    else entirely (Gemma 3 270M samples "Nation\n\nNation\n\nCountry..." where with it it writes prose)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    try:
        plain, special = (tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"])
    except Exception:  # a tokenizer that cannot say: as before
        return []
    return [bos] if special[:1] == [bos] and plain[:1] != [bos] else []


def _bos_text(tokenizer) -> str:
    """What goes before a document's text: the BOS token where the tokenizer begins texts with it (`bos_ids`)."""
    return tokenizer.bos_token if bos_ids(tokenizer) else ""


def _chat(tokenizer, instruction: str, bos: str = "") -> str:
    """`instruction` in the chat template; without one, a document after `bos` (`_bos_text`)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return bos + instruction + "\n\n"


@torch.no_grad()
def self_generate(model, tokenizer, n_samples: int, seq_len: int, seed: int, batch_size: int = 64,
                  progress: bool = True, temperature: float = SELF_TEMPERATURE,
                  plain_frac: float | None = None, stats: dict | None = None) -> torch.Tensor:
    """The model writes its own calibration text: (n_samples, seq_len) token ids.

    A share `plain_frac` of the samples are plain-text continuations of document openings, the rest answers to
    instructions in the chat template (up to the end of turn); default 0.5, and 1 for a model without a chat
    template (a base model: an instruction is only odd text to continue). A sample that starts to loop is cut
    there and ended (`loop_start`; the row stops sampling at once). Each sample (prompt + text) is appended to one
    token stream, which is cut into windows, as pre-training data is packed. `stats`, when given, receives how many
    samples were written and how many of them were cut at a loop.
    """
    if plain_frac is None:
        plain_frac = 0.5 if getattr(tokenizer, "chat_template", None) else 1.0
    bos = _bos_text(tokenizer)
    free_frac = SELF_FREE_FRAC if bos else 0.0
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    sampler = sampling_model(model)
    need = n_samples * seq_len
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    stream: list[torch.Tensor] = []
    have = 0
    written = n_looped = 0
    gen = torch.Generator().manual_seed(seed)
    prompts = self_prompts(max(n_samples * 4, batch_size), seed, plain_frac, free_frac)
    # sample ends: the end-of-sequence token first (appended to samples cut by length), then any other special
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    stops = torch.tensor([i for i in [eos, *tokenizer.all_special_ids] if i is not None and (i == eos or i != pad)],
                         dtype=torch.long)
    try:
        bar = tqdm(total=need, desc="self-calibration: sampling", unit="tok", disable=not progress)
        start = 0
        while have < need:
            batch = [_chat(tokenizer, p, bos) if chat else bos + p
                     for p, chat in prompts[start % len(prompts):][:batch_size]]
            start += len(batch)
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            draws = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            looped: list[bool] = []
            answers = generate_batch(
                sampler, enc["input_ids"], enc["attention_mask"], min(seq_len, SELF_MAX_NEW_TOKENS),
                temperature=temperature, top_p=SELF_TOP_P, repetition_penalty=SELF_REPETITION_PENALTY, stops=stops,
                generator=draws, on_step=lambda n: bar.update(max(0, min(n, need - bar.n))),
                loop_ngram=LOOP_NGRAM, looped=looped,
            )
            n_looped += sum(looped)
            for ids, mask, answer in zip(enc["input_ids"].cpu(), enc["attention_mask"].cpu(), answers):
                written += 1
                # a sample ends with its first end/special token; one cut by length gets the end token
                if not len(answer) or not bool(torch.isin(answer[-1:], stops).any()):
                    answer = torch.cat([answer, stops[:1]])
                stream.append(torch.cat([ids[mask.bool()], answer]))
                have += stream[-1].numel()
            bar.n = min(need, have)  # exact count (prompts included) once the batch is done
            bar.refresh()
        bar.close()
    finally:
        tokenizer.padding_side = side
        del sampler
    if stats is not None:
        stats.update(samples=written, looping_samples=n_looped, plain_frac=plain_frac, free_frac=free_frac)
    return torch.cat(stream)[:need].view(n_samples, seq_len)


def sampling_model(model):
    """The model that writes self-calibration text: a bfloat16 copy when the model is float32 on a CPU
    with native bfloat16 matrix units (3-4x the float32 matmul rate on AVX512-BF16/AMX), else the model.

    Only the sampled token ids leave it; every hidden state used for scoring and training still comes
    from the model itself, in its own precision.
    """
    import copy

    if getattr(model, "hf_device_map", None) or not _bf16_pays(model):
        return model
    return copy.deepcopy(model).to(torch.bfloat16)


def fast_autocast(model):
    """bfloat16 autocast for passes whose small rounding is harmless (layer scoring, the distillation
    forward/backward) when the model is float32 on a CPU with native bfloat16 units; else a no-op."""
    import contextlib

    if _bf16_pays(model):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _bf16_pays(model) -> bool:
    """The model is float32 on a CPU with native bfloat16 units."""
    params = next(model.parameters())
    return params.device.type == "cpu" and params.dtype == torch.float32 and _cpu_bf16_fast()


def _cpu_bf16_fast() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def read_utf8(path, what: str = "file") -> str:
    """A text file's contents (a leading byte-order mark dropped), refused in one line when it cannot be read or
    is not UTF-8 text: a binary file, or text in another encoding."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SlimlmError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SlimlmError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
                          ) from None
    if "\x00" in text:
        raise SlimlmError(f"{what} {path} is binary, not text (it holds NUL bytes)")
    return text


def read_text(source: str) -> str:
    """Text of a .txt file, or of a .jsonl file's `text` fields (else its first string field per row)."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise SlimlmError(f"calibration file not found: {source}")
    raw = read_utf8(path, "calibration file")
    if path.suffix == ".jsonl":
        parts, rows = [], 0
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SlimlmError(f"{source}:{lineno}: not valid JSON ({exc.msg})") from exc
            text = row.get("text") if isinstance(row, dict) else None
            if text is None and isinstance(row, dict):
                text = next((v for v in row.values() if isinstance(v, str)), None)
            if isinstance(text, str):
                parts.append(text)
            rows += 1
        if rows and not parts:
            raise SlimlmError(f"calibration file {source}: none of its {rows} rows has a `text` or other string field")
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise SlimlmError(f"calibration file {source} is empty")
    return raw


def hf_text(spec: str) -> str:
    """hf:NAME[:CONFIG[:SPLIT]] through `datasets` (installed and reachable)."""
    try:
        import datasets
    except ImportError:  # no slimlm extra ships it: `hf:` is the one place it is used
        raise SlimlmError(f"--calib {spec} needs the datasets package: pip install datasets") from None
    parts = spec[3:].split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (
        parts[2] if len(parts) > 2 else "train")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types for unreachable or unknown sets
        raise SlimlmError(f"cannot load dataset {spec!r}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    column = "text" if "text" in ds.column_names else next(
        (c for c in ds.column_names if ds.features[c].dtype == "string"), None)
    if column is None:
        raise SlimlmError(f"dataset {spec!r} has no text column")
    return "\n\n".join(t for t in ds[column] if t)


def token_windows(tokenizer, text: str, n: int | None, seq_len: int, what: str = "text") -> torch.Tensor:
    """Cut the token stream of `text` into non-overlapping windows (n first ones when given). For a model whose
    tokenizer begins a text with BOS (`bos_ids`), each window is BOS and the next seq_len - 1 tokens of the text."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    bos = bos_ids(tokenizer)
    width = seq_len - len(bos)
    count = ids.numel() // width if width > 0 else 0
    if count == 0:
        raise SlimlmError(f"{what} has only {ids.numel()} tokens, fewer than one window of {seq_len}")
    if n is not None:
        count = min(count, n)
    windows = ids[: count * width].view(count, width)
    if bos:
        windows = torch.cat([torch.full((count, 1), bos[0], dtype=windows.dtype), windows], dim=1)
    return windows


def calibration_windows(model, tokenizer, source: str, n_samples: int, seq_len: int, seed: int,
                        progress: bool = True, stats: dict | None = None) -> torch.Tensor:
    """(n, seq_len) calibration token windows from `self`, a file, or `hf:...` (`stats`: see `self_generate`)."""
    if source == "self":
        return self_generate(model, tokenizer, n_samples, seq_len, seed, progress=progress, stats=stats)
    text = hf_text(source) if source.startswith("hf:") else read_text(source)
    return token_windows(tokenizer, text, n_samples, seq_len, what=f"calibration data {source}")
