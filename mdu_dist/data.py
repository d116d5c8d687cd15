"""Question/answer data: TOFU splits, a user's JSON/JSONL or Hugging Face dataset, the backbone's chat template,
right padding.

A source is one of: a TOFU split name (``forget10``; looked up in ``data.tofu_dir``, by default the copy of TOFU
that ships inside the package, ``mdu_dist/resources/tofu``: MIT licence, from locuslab/TOFU, with a MANIFEST of
every file's sha256); a ``.json`` / ``.jsonl`` file; a directory written by ``datasets``' ``save_to_disk``; or
``hf:NAME[:CONFIG][:SPLIT]``, a Hugging Face dataset read from the local ``datasets`` cache only (offline: nothing
is ever downloaded at run time). Rows are mappings with a question and an answer column (``data.question_key``,
``data.answer_key``).

Each pair becomes chat messages [user: question, assistant: answer]. The prompt is the template of the user turn
with the generation prompt; the response is everything after it (the end-of-turn token included). Sequences
are right-padded with the pad token; padding belongs neither to the prompt nor to the response.

Tokenizers are always loaded from a local directory (never a hub). Real backbones use the files that come with
their HF checkpoint; tiny models use a small BPE tokenizer that ``build_tokenizer`` trains on the data and saves
next to the checkpoint, with the same shape of chat template (user/assistant turns, an end-of-turn token).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from mdu_dist.errors import ConfigError
from mdu_dist.layout import LAYOUTS

SPECIAL_TOKENS = ["<|unk|>", "<|bos|>", "<|eos|>", "<|mask|>", "<|user|>", "<|assistant|>", "<|eot|>"]
# Token ids of the tiny tokenizer, matching configs/*_tiny.yaml (mask 3, eos = pad 2).
TINY_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
TINY_CHAT_TEMPLATE = (
    "<|bos|>{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|eot|>"
    "{% else %}<|assistant|>{{ m['content'] }}<|eot|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# The TOFU benchmark bundled as package data: the default of ``data.tofu_dir`` wherever the job runs.
BUNDLED_TOFU = Path(__file__).resolve().parent / "resources" / "tofu"
HF_PREFIX = "hf:"


class DataError(ValueError):
    """Data that cannot be used; the message names the file, row and field."""


def tofu_path(tofu_dir: str | Path) -> Path:
    """``""``: the bundled TOFU; any other directory as given (a relative one is relative to the working
    directory, as every path a user passes)."""
    return Path(tofu_dir) if str(tofu_dir) else BUNDLED_TOFU


@dataclass
class DataConfig:
    """Where the pairs come from. A source is a TOFU split name (looked up in ``tofu_dir``), a JSON/JSONL file,
    a ``save_to_disk`` directory or ``hf:NAME[:CONFIG][:SPLIT]`` (the module docstring); rows hold
    ``question_key`` and ``answer_key``."""

    tofu_dir: str = ""  # "" = the TOFU bundled with the package; else a directory (relative: to the working dir)
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
    # Each optimizer step takes rows of similar length (the epoch's rows sorted by length, cut into steps, the
    # steps shuffled; HF's group_by_length): fewer padding positions, the same rows per epoch. Unlearning
    # groups by the forget rows' lengths. Not with pad_in_response (its padding is what it teaches).
    group_by_length: bool = False
    question_key: str = "question"  # the column / field holding the question, in every source of the run
    answer_key: str = "answer"  # ... and the answer (eval sources keep TOFU's perturbed-answer field names)
    # How noisy rows meet the model (``mdu_dist.layout``): full = one sequence; block = LLaDA2's [x_t ; x_0] under
    # the block-diffusion mask of model.block_size blocks, ratio ~ U[0.3, 0.8], plain mean CE over masked tokens.
    layout: str = "full"

    def validate(self, where: str = "data") -> None:
        for name in ("question_key", "answer_key"):
            if not getattr(self, name):
                raise ConfigError(f"{where}.{name} must not be empty")
        if self.max_length < 2:
            raise ConfigError(f"{where}.max_length={self.max_length} must be >= 2")
        if self.limit < 0:
            raise ConfigError(f"{where}.limit={self.limit} must be >= 0")
        if self.group_by_length and self.pad_in_response:
            # Measured (docs/demo.md): the padding is where a fine-tune learns to fill the rest of a generation
            # canvas with EOS; steps of similar lengths keep little of it, and the demo's fine-tuned model then
            # generated past its answers (forget ROUGE 0.27-0.38 instead of 0.93-0.96).
            raise ConfigError(f"{where}.group_by_length=true with {where}.pad_in_response=true: grouping by length "
                              "removes most of the padding a fine-tune learns end-of-text from; set one of them")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{where}.layout={self.layout!r} must be one of {', '.join(LAYOUTS)}")

    def idk_path(self) -> Path:
        path = Path(self.idk)
        return path if path.exists() else tofu_path(self.tofu_dir) / self.idk


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


def resolve_source(source: str, tofu_dir: str | Path) -> Path:
    """A TOFU split name (``forget10``) or a path to a JSON/JSONL file."""
    path = Path(source)
    if path.suffix in (".json", ".jsonl") and path.exists():
        return path
    tofu = tofu_path(tofu_dir)
    split = tofu / f"{source}.json"
    if split.exists():
        return split
    known = sorted(p.stem for p in tofu.glob("*.json") if p.stem != "MANIFEST") if tofu.is_dir() else []
    raise DataError(f"data source {source!r}: neither a .json/.jsonl file nor a TOFU split in {tofu}"
                    + (f" (splits: {', '.join(known)})" if known else "")
                    + f"; nor a save_to_disk directory or {HF_PREFIX}NAME[:CONFIG][:SPLIT]")


def read_rows(source: str, tofu_dir: str | Path) -> tuple[str, list]:
    """(where the rows came from, for messages; the rows) of any source."""
    if source.startswith(HF_PREFIX):
        return source, _hf_rows(source)
    path = Path(source)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return str(path), _disk_rows(path)
    path = resolve_source(source, tofu_dir)
    return str(path), _rows(path)


def _offline_datasets():
    """The ``datasets`` library in offline mode: a source is read from the local cache, never downloaded (the
    variables act on a first import; the flag, on a library some other code imported earlier)."""
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    # deferred: datasets costs ~5 s of start-up; config imports this module for every subcommand
    import datasets

    datasets.config.HF_HUB_OFFLINE = True
    return datasets


def _quiet(datasets, load):
    """``load()`` without the library's info lines (they would break the CLI's one-line errors)."""
    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity_error()
    try:
        return load()
    finally:
        datasets.utils.logging.set_verbosity(level)


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _hf_rows(source: str) -> list:
    """``hf:NAME`` (default config, train split), ``hf:NAME:PART`` (config PART's train split, as TOFU's
    ``hf:locuslab/TOFU:forget10``; else split PART of the default config), ``hf:NAME:CONFIG:SPLIT``."""
    parts = source[len(HF_PREFIX):].split(":")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise DataError(f"data source {source!r}: expected {HF_PREFIX}NAME, {HF_PREFIX}NAME:CONFIG_OR_SPLIT or "
                        f"{HF_PREFIX}NAME:CONFIG:SPLIT")
    datasets = _offline_datasets()
    name, rest = parts[0], parts[1:]
    attempts = ([(None, "train")] if not rest else [(rest[0], "train"), (None, rest[0])] if len(rest) == 1
                else [tuple(rest)])
    failure = None
    for config, split in attempts:
        try:
            return _quiet(datasets, lambda: datasets.load_dataset(name, config, split=split).to_list())
        except (ValueError, OSError) as e:  # OSError: ConnectionError (not cached), FileNotFoundError
            failure = failure or e
    cache = datasets.config.HF_DATASETS_CACHE
    if isinstance(failure, ConnectionError):
        raise DataError(f"data source {source!r}: {name} is not in the local datasets cache ({cache}); mdu-dist "
                        f"reads Hugging Face datasets offline only: load it once where there is network "
                        f"(datasets.load_dataset), or give a save_to_disk directory") from None
    raise DataError(f"data source {source!r}: cannot be read from the local datasets cache ({cache}): "
                    f"{_one_line(failure)}") from None


def _disk_rows(path: Path) -> list:
    datasets = _offline_datasets()
    try:
        ds = _quiet(datasets, lambda: datasets.load_from_disk(str(path)))
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable save_to_disk directory: {_one_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError(f"{path}: a DatasetDict with splits {', '.join(ds)}; give one split's directory "
                            f"({path}/<split>)")
        (ds,) = ds.values()
    return ds.to_list()


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


def qa_row(row, n: int, where: str, question_key: str = "question", answer_key: str = "answer") -> QA:
    """Row ``n`` of ``where`` as a pair; both fields must be non-empty strings."""
    for key, setting in ((question_key, "question_key"), (answer_key, "answer_key")):
        if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key].strip():
            columns = f"; its fields: {', '.join(map(str, row))}" if isinstance(row, dict) else ""
            raise DataError(f"{where}: row {n} has no {key!r} (a non-empty string is required; data.{setting} "
                            f"names the field{columns})")
    return QA(row[question_key], row[answer_key])


def load_pairs(source: str, tofu_dir: str | Path, limit: int | None = None, question_key: str = "question",
               answer_key: str = "answer") -> list[QA]:
    """Question/answer rows of ``source``; every row must have a non-empty string question and answer."""
    where, rows = read_rows(source, tofu_dir)
    pairs = [qa_row(row, n, where, question_key, answer_key) for n, row in enumerate(rows, 1)]
    if not pairs:
        raise DataError(f"{where}: no rows")
    return pairs[:limit] if limit else pairs


def load_lines(path: str | Path) -> list[str]:
    """One answer per line (e.g. TOFU's idontknow.jsonl, which holds plain text lines)."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: no lines")
    return lines


def build_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path):
    """``train_tokenizer``, saved to ``out_dir``."""
    fast = train_tokenizer(texts, vocab_size)
    fast.save_pretrained(str(out_dir))
    return fast


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer of at most ``vocab_size`` ids trained on ``texts`` (in memory; deterministic:
    the same texts give the same tokenizer in every process)."""
    # deferred: transformers (with tokenizers) costs ~6 s of start-up; only tokenizer work needs it
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
    return fast


def load_tokenizer(directory: str | Path):
    # deferred: transformers costs ~6 s of start-up; only tokenizer work needs it
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

    def lengths(self) -> list[int]:
        return [len(tokens) for tokens, _ in self.rows]

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

    def lengths(self) -> list[int]:
        """The forget rows' (their retain partners change every epoch)."""
        return [len(tokens) for tokens, _ in self.forget]

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
