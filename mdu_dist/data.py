"""Question/answer data: TOFU splits or a user's JSON/JSONL, the backbone's chat template, right padding.

Each pair becomes chat messages [user: question, assistant: answer]. The prompt is the template of the user turn
with the generation prompt; the response is everything after it (the end-of-turn token included). Sequences
are right-padded with the pad token; padding belongs neither to the prompt nor to the response.

Tokenizers are always loaded from a local directory (never a hub). Real backbones use the files that come with
their HF checkpoint; tiny models use a small BPE tokenizer that ``build_tokenizer`` trains on the data and saves
next to the checkpoint, with the same shape of chat template (user/assistant turns, an end-of-turn token).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from mdu_dist.errors import ConfigError

SPECIAL_TOKENS = ["<|unk|>", "<|bos|>", "<|eos|>", "<|mask|>", "<|user|>", "<|assistant|>", "<|eot|>"]
# Token ids of the tiny tokenizer, matching configs/*_tiny.yaml (mask 3, eos = pad 2).
TINY_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
TINY_CHAT_TEMPLATE = (
    "<|bos|>{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|eot|>"
    "{% else %}<|assistant|>{{ m['content'] }}<|eot|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class DataError(ValueError):
    """Data that cannot be used; the message names the file, row and field."""


@dataclass
class DataConfig:
    """Where the pairs come from. A source is a TOFU split name (looked up in ``tofu_dir``) or a JSON/JSONL
    file of {"question", "answer"} rows."""

    tofu_dir: str = "../shared/data/tofu"  # relative to the working directory
    finetune: str = "full"  # what ``mdu-dist finetune`` teaches
    forget: str = "forget10"
    retain: str = "retain90"
    idk: str = "idontknow.jsonl"  # DPO's preferred answers, one per line (a file in tofu_dir or a path)
    max_length: int = 128  # tokens of prompt + response; longer responses are truncated, longer prompts refused
    limit: int = 0  # use only the first N rows of each source (0 = all): small CPU runs
    # Fine-tuning only: the padding after each response counts as response (masked and predicted like any answer
    # token), as in LLaDA's SFT, so the model learns to fill the rest of a generation canvas with EOS. Unlearning
    # never does this: MDU's anchor and the baselines' ELBOs cover the answer tokens only.
    pad_in_response: bool = False

    def validate(self, where: str = "data") -> None:
        if self.max_length < 2:
            raise ConfigError(f"{where}.max_length={self.max_length} must be >= 2")
        if self.limit < 0:
            raise ConfigError(f"{where}.limit={self.limit} must be >= 0")

    def idk_path(self) -> Path:
        path = Path(self.idk)
        return path if path.exists() else Path(self.tofu_dir) / self.idk


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


def resolve_source(source: str, tofu_dir: str | Path) -> Path:
    """A TOFU split name (``forget10``) or a path to a JSON/JSONL file."""
    path = Path(source)
    if path.suffix in (".json", ".jsonl") and path.exists():
        return path
    split = Path(tofu_dir) / f"{source}.json"
    if split.exists():
        return split
    known = (sorted(p.stem for p in Path(tofu_dir).glob("*.json") if p.stem != "MANIFEST")
             if Path(tofu_dir).is_dir() else [])
    raise DataError(f"data source {source!r}: neither a .json/.jsonl file nor a TOFU split in {tofu_dir}"
                    + (f" (splits: {', '.join(known)})" if known else ""))


def _rows(path: Path) -> list:
    text = path.read_text()
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def load_pairs(source: str, tofu_dir: str | Path, limit: int | None = None) -> list[QA]:
    """Question/answer rows of ``source``; every row must have non-empty string ``question`` and ``answer``."""
    path = resolve_source(source, tofu_dir)
    pairs = []
    for n, row in enumerate(_rows(path), 1):
        for key in ("question", "answer"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(f"{path}: row {n} has no {key!r} (a non-empty string is required)")
        pairs.append(QA(row["question"], row["answer"]))
    if not pairs:
        raise DataError(f"{path}: no rows")
    return pairs[:limit] if limit else pairs


def load_lines(path: str | Path) -> list[str]:
    """One answer per line (e.g. TOFU's idontknow.jsonl, which holds plain text lines)."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: no lines")
    return lines


def build_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` ids on ``texts``; save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|unk|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", pad_token="<|eos|>", mask_token="<|mask|>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(directory: str | Path):
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").exists() and not (directory / "tokenizer_config.json").exists():
        raise DataError(f"{directory}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def encode_pair(tokenizer, qa: QA, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt ⊕ response and the prompt length.

    A prompt that does not leave room for at least one response token is refused; a response that does not fit
    is truncated to ``max_length`` (its end-of-turn token is then lost, as in the authors' code).
    """
    user = [{"role": "user", "content": qa.question}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": qa.answer}], tokenize=False)
    if not full.startswith(prompt):
        raise DataError("the chat template does not extend the prompt with the answer; cannot split response")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_length:
        raise DataError(f"prompt of {len(prompt_ids)} tokens does not fit data.max_length={max_length}: "
                        f"{qa.question[:60]!r}")
    return (prompt_ids + response_ids)[:max_length], len(prompt_ids)


@dataclass
class Pairs:
    """A padded batch of (prompt, response) sequences."""

    input_ids: torch.Tensor  # [B, L]
    response_mask: torch.Tensor  # [B, L] bool: response tokens (not prompt, not padding)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(encoded: list[tuple[list[int], int]], pad_id: int, length: int, pad_in_response: bool = False
            ) -> Pairs:
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    response = torch.zeros((len(encoded), length), dtype=torch.bool)
    for row, (tokens, prompt_len) in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        response[row, prompt_len: length if pad_in_response else len(tokens)] = True
    return Pairs(ids, response)


Encoded = tuple[list[int], int]  # (token ids, prompt length)


def longest(parts: dict[str, list[Encoded]]) -> int:
    return max(len(tokens) for rows in parts.values() for tokens, _ in rows)


def collate_parts(parts: dict[str, list[Encoded]], pad_id: int, length: int | None = None,
                  pad_in_response: bool = False) -> dict[str, Pairs]:
    """Pad every part to one length (default: the longest row), since the policy and reference rows of a
    micro-batch travel through the pipeline as one tensor."""
    length = length or longest(parts)
    return {name: collate(rows, pad_id, length, pad_in_response) for name, rows in parts.items()}


class SFTData:
    """Pairs to fine-tune on, as the single batch part ``train``."""

    def __init__(self, tokenizer, pairs: list[QA], max_length: int):
        if not pairs:
            raise DataError("the fine-tuning set is empty")
        self.rows = [encode_pair(tokenizer, qa, max_length) for qa in pairs]

    def __len__(self) -> int:
        return len(self.rows)

    def parts(self, indices: list[int], epoch: int = 0) -> dict[str, list[Encoded]]:
        return {"train": [self.rows[i] for i in indices]}


class ForgetRetainData:
    """Each forget example paired with a retain example (and, for DPO, an "I don't know" answer to the same
    question), as open-unlearning and the MDU code mix them: the retain partner of forget row i is drawn at
    random, reproducibly from ``seed`` and the epoch."""

    def __init__(self, tokenizer, forget: list[QA], retain: list[QA], max_length: int,
                 idk_answers: list[str] | None = None, seed: int = 0):
        if not forget:
            raise DataError("the forget set is empty")
        if not retain:
            raise DataError("the retain set is empty")
        self.seed = seed
        self.forget = [encode_pair(tokenizer, qa, max_length) for qa in forget]
        self.retain = [encode_pair(tokenizer, qa, max_length) for qa in retain]
        self.idk = ([encode_pair(tokenizer, QA(qa.question, a), max_length)
                     for qa, a in zip(forget, _cycle(idk_answers, len(forget), seed))] if idk_answers else None)

    def __len__(self) -> int:
        return len(self.forget)

    def parts(self, indices: list[int], epoch: int = 0) -> dict[str, list[Encoded]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        partners = [rng.randrange(len(self.retain)) for _ in self.forget]
        parts = {"forget": [self.forget[i] for i in indices], "retain": [self.retain[partners[i]] for i in indices]}
        if self.idk is not None:
            parts["idk"] = [self.idk[i] for i in indices]
        return parts


def _cycle(items: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [items[rng.randrange(len(items))] for _ in range(n)]
