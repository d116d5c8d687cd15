"""``mdu-dist eval``: TOFU metrics of one checkpoint, written as ``eval.json`` and ``eval.md``.

Per split (forget, retain, real_authors, world_facts; each optionally limited to its first ``eval.limit`` rows):

- probability: LLaDA's Monte-Carlo ELBO of the answer (``eval.num_samples`` draws; 128 for the real benchmark;
  block by block in LLaDA2's two-copy layout with ``data.layout=block``, ``eval.likelihood``),
  exp(-per-token NLL); for real_authors / world_facts normalised over the answer and its wrong options
  (``perturbed_answer``), as open-unlearning's ``probability_w_options``;
- ROUGE-L recall (and F1) of a greedy low-confidence-remasking generation against the answer (the generation is
  cut at the first end-of-turn / EOS token and decoded without special tokens);
- truth ratio: perturbed answers against the paraphrased answer (forget, retain) or the answer (real_authors,
  world_facts), from the ``*_perturbed`` files;
- forget quality: KS p-value of this model's per-item forget truth ratios against those of a retain-only model,
  read from the ``eval.json`` that an earlier ``mdu-dist eval`` of that model wrote (``eval.retain_model_eval``);
- model utility: harmonic mean of the nine utility numbers (``MODEL_UTILITY_KEYS``).

Every random draw is seeded by (``eval.seed``, split, row, answer), so a row's numbers do not depend on
``eval.limit``, on the TP layout or on how answers are packed into forwards. Runs on TP x DP ranks (PP = 1).

Throughput inside a replica: the ELBO sample sequences of consecutive (row, answer) pairs share forwards of up
to ``eval.tokens_per_batch`` tokens (right padded, the padding masked out of attention), and generations of
``eval.gen_batch_size`` rows of any prompt lengths share a batch (left padded, likewise). Both are cut into
``Unit``s before the units are divided over the DP replicas, so every forward, hence every number, is the same
whatever the DP size.
"""

from __future__ import annotations

import functools
import json
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mdu_dist import distributed
from mdu_dist.checkpoint.convert import load_hf_into_stage
from mdu_dist.checkpoint.dist import load_model_checkpoint
from mdu_dist.checkpoint.hf import open_hf_checkpoint
from mdu_dist.checkpoint.lora import load_lora_checkpoint, read_lora_info
from mdu_dist.checkpoint.source import resolve_checkpoint
from mdu_dist.data import QA, DataError, encode_pair, load_tokenizer, qa_row, read_rows
from mdu_dist.distributed import device, resolve_layout
from mdu_dist.errors import ConfigError
from mdu_dist.eval import metrics as M
from mdu_dist.eval.block_sampler import block_generate
from mdu_dist.eval.config import BLOCK_SAMPLERS
from mdu_dist.eval.likelihood import ElboEstimate, sample_block_masks, sample_masks, score_packed
from mdu_dist.eval.sampler import dream_generate, generate, left_pad
from mdu_dist.inputs import check_checkpoint, check_output_dir, check_tokenizer_fits
from mdu_dist.launch.local import launched_world_size, run_ranks
from mdu_dist.layout import Layout
from mdu_dist.models.mcore import build_stage

PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}


# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Item:
    question: str
    answer: str
    correct: str  # the answer the truth ratio compares against (paraphrase for forget/retain)
    wrong: tuple[str, ...]  # perturbed answers

    def scored(self) -> list[tuple[str, str]]:
        """(key, text) of every answer whose ELBO is scored: the answer, the paraphrase when it differs, and
        each perturbed answer (wrong0, wrong1, ...)."""
        texts = [("answer", self.answer)] + ([] if self.correct == self.answer else [("correct", self.correct)])
        return texts + [(f"wrong{j}", w) for j, w in enumerate(self.wrong)]


def load_items(split: str, source: str, tofu_dir: str, limit: int, question_key: str = "question",
               answer_key: str = "answer") -> list[Item]:
    where, rows = read_rows(source, tofu_dir)
    items = []
    for n, row in enumerate(rows, 1):
        if limit and len(items) >= limit:
            break
        qa = qa_row(row, n, where, question_key, answer_key)
        wrong = row.get("perturbed_answer")
        if isinstance(wrong, str):
            wrong = [wrong]
        if not wrong or not all(isinstance(w, str) and w.strip() for w in wrong):
            raise DataError(f"{where}: row {n} has no 'perturbed_answer' (a list of strings, for the truth ratio)")
        correct = qa.answer
        if split in ("forget", "retain"):
            correct = row.get("paraphrased_answer")
            if not isinstance(correct, str) or not correct.strip():
                raise DataError(f"{where}: row {n} has no 'paraphrased_answer' (needed on the {split} split)")
        items.append(Item(qa.question, qa.answer, correct, tuple(wrong)))
    if not items:
        raise DataError(f"{where}: no rows")
    return items


def split_items(cfg, split: str) -> list[Item]:
    d = cfg.data
    return load_items(split, getattr(cfg.eval, split), d.tofu_dir, cfg.eval.limit, d.question_key, d.answer_key)


def resolve_tokenizer(cfg, ckpt: Path) -> Path:
    if cfg.eval.tokenizer:
        return Path(cfg.eval.tokenizer)
    for candidate in (ckpt / "hf_files", ckpt):
        if (candidate / "tokenizer.json").exists() or (candidate / "tokenizer_config.json").exists():
            return candidate
    raise DataError(f"{ckpt}: no tokenizer in the checkpoint; set eval.tokenizer")


def check_inputs(cfg) -> None:
    """Everything that can fail before a process starts or anything is written: the output directory, PP, the
    checkpoint (its architecture and shapes against the model config), the tokenizer (against the vocabulary),
    the data (every ELBO sequence within eval.tokens_per_batch), the retain-model file."""
    check_output_dir(cfg.eval.output_dir, "eval.output_dir")
    cfg.eval.check_block_size(cfg.model.arch, cfg.model.block_size)
    if cfg.parallel.pipeline != 1:
        raise ConfigError(f"mdu-dist eval runs on tensor-parallel ranks only: parallel.pipeline="
                          f"{cfg.parallel.pipeline} is not supported (set parallel.pipeline=1; any saved "
                          f"layout loads)")
    ckpt, _ = resolve_checkpoint(cfg.eval.checkpoint)
    check_checkpoint(ckpt, cfg.model, "eval.checkpoint")
    tokenizer_dir = resolve_tokenizer(cfg, ckpt)
    tok = load_tokenizer(tokenizer_dir)
    check_tokenizer_fits(tok, tokenizer_dir, cfg.model.vocab_size)
    items = {split: split_items(cfg, split) for split in cfg.eval.splits}
    for split, rows in items.items():
        elbo_units(cfg, tok, split, rows)
    if cfg.eval.retain_model_eval:
        retain_model_truth_ratios(cfg.eval.retain_model_eval, items.get("forget"))


def retain_model_truth_ratios(path: str, forget: list[Item] | None = None) -> list[float]:
    """The retain-only model's per-item forget truth ratios; with ``forget``, refused unless it scored the same
    forget questions (a KS test against another forget set would compare unrelated populations)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: retain-model eval file not found (eval.retain_model_eval)")
    try:
        scored = json.loads(p.read_text())["items"]["forget"]
        ratios, questions = [float(x) for x in scored["truth_ratio"]], list(scored["question"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise DataError(f"{p}: not an eval.json with items.forget.truth_ratio") from None
    if forget is not None and questions != [it.question for it in forget]:
        raise DataError(f"{p}: the retain model was evaluated on another forget set ({len(questions)} rows) than "
                        f"this run's eval.forget ({len(forget)} rows): evaluate it with the same eval.forget "
                        f"and eval.limit (eval.retain_model_eval)")
    return ratios


# ------------------------------------------------------------------------------------------- the model


def _seed(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, parts)).encode()))


class Evaluator:
    """One model on this rank's TP slice; ``logits`` is the full forward of the (PP = 1) stage."""

    def __init__(self, cfg, ckpt: Path, kind: str, tokenizer_dir: Path):
        # deferred: megatron-core costs seconds of start-up; the CLI imports this module for --help
        from megatron.core import parallel_state as ps

        self.cfg, self.e, m = cfg, cfg.eval, cfg.model
        self.tok = load_tokenizer(tokenizer_dir)
        check_tokenizer_fits(self.tok, tokenizer_dir, m.vocab_size)
        if kind == "lora":
            info = read_lora_info(ckpt)
            self.stage = build_stage(m, lora=info.lora).eval()
            load_lora_checkpoint(self.stage, info)
            kind = "loaded"
        else:
            self.stage = build_stage(m).eval()
        if kind == "dist":
            load_model_checkpoint(self.stage, ckpt)
        elif kind == "hf":
            with open_hf_checkpoint(ckpt, m, m.arch) as reader:
                load_hf_into_stage(self.stage, reader)
        tp = ps.get_tensor_model_parallel_world_size()
        self.group = ps.get_tensor_model_parallel_group() if tp > 1 else None
        self.show = self.e.progress and torch.distributed.get_rank() == 0
        stops = {m.eos_token_id, m.pad_token_id}
        for name in ("<|eot|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>"):
            tid = self.tok.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != self.tok.unk_token_id and tid >= 0:
                stops.add(tid)
        if self.tok.eos_token_id is not None:
            stops.add(self.tok.eos_token_id)
        self.stops = stops
        self.sampler = self.e.sampler_for(m.arch)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
               pad: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V_local], or [N, V_local] at the ``positions`` only (the output layer runs on those);
        ``pad`` marks padding, kept out of attention; ``position_ids`` and ``mask`` as ``DiffusionLM.forward``
        takes them (the block layout's two copies)."""
        positions, pad, position_ids, mask = (None if t is None else t.to(device())
                                              for t in (positions, pad, position_ids, mask))
        return self.stage(ids.to(device()), positions, pad, mask, position_ids).float()

    def nll(self, split: str, answers: list[tuple[int, str, torch.Tensor, torch.Tensor]]) -> dict[tuple, float]:
        """Per-token negative ELBO of each (row, which, prompt, answer), their samples packed into shared forwards."""
        e, m = self.e, self.cfg.model
        layout = Layout(self.cfg.data.layout, m.block_size)

        def masks(prompt, answer, seed):
            if layout.two_copy:
                return sample_block_masks(prompt.numel(), answer.numel(), m.block_size, e.num_samples, seed)
            return sample_masks(answer.numel(), e.num_samples, seed)

        triples = [(prompt, answer, masks(prompt, answer, _seed(e.seed, split, row, which)))
                   for row, which, prompt, answer in answers]
        scores = score_packed(self.logits, triples, mask_token_id=m.mask_token_id, vocab_size=m.vocab_size,
                              vocab_start=self.stage.vocab_start, group=self.group, batch_size=e.batch_size,
                              tokens_per_batch=e.tokens_per_batch, pad_token_id=m.pad_token_id, layout=layout)
        return {("nll", split, row, which): ElboEstimate(x, answer.numel()).nll
                for (row, which, _, answer), x in zip(answers, scores, strict=True)}

    def generate(self, prompts: list[list[int]]) -> list[str]:
        """Greedy generations of ``prompts`` (any lengths, left padded), one batch, cut at the first stop token
        and decoded."""
        e, m = self.e, self.cfg.model
        common = dict(gen_length=e.gen_length, mask_token_id=m.mask_token_id, vocab_size=m.vocab_size,
                      vocab_start=self.stage.vocab_start, group=self.group)
        if self.sampler in BLOCK_SAMPLERS:
            tokens = block_generate(self.logits, prompts, block_size=m.block_size, steps=e.block_steps,
                                    threshold=e.threshold, max_post_steps=e.max_post_steps,
                                    editing_threshold=e.editing_threshold if self.sampler == "block_edit" else None,
                                    pad_token_id=m.pad_token_id, eos_token_id=m.eos_token_id, **common)
        else:
            prompt, pad = left_pad(prompts, m.pad_token_id, e.gen_length)
            logits_fn = self.logits if pad is None else functools.partial(self.logits, pad=pad)
            if self.sampler == "low_confidence":
                tokens = generate(logits_fn, prompt, steps=e.steps, block_length=e.block_length, **common)
            else:
                tokens = dream_generate(logits_fn, prompt, steps=e.steps, alg=self.sampler, **common)
        out = []
        for seq in tokens.cpu().tolist():
            cut = next((k for k, t in enumerate(seq) if t in self.stops), len(seq))
            out.append(self.tok.decode(seq[:cut], skip_special_tokens=True).strip())
        return out

    def units(self, split: str, items: list[Item]) -> list[Unit]:
        return elbo_units(self.cfg, self.tok, split, items) + generation_units(self.cfg, self.tok, split, items)

    def run_unit(self, unit: Unit) -> dict[tuple, object]:
        """The unit's results by result key: ("nll", split, row, which) -> NLL, ("gen", split, row) -> text."""
        kind, split, _ = unit.key
        if kind == "nll":
            return self.nll(split, unit.payload)
        rows, prompts = unit.payload
        return {("gen", split, row): text for row, text in zip(rows, self.generate(prompts), strict=True)}


def encode(tok, max_length: int, question: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, answer ids) of one question and answer, as training encodes them."""
    ids, n_prompt = encode_pair(tok, QA(question, answer), max_length)
    ids = torch.tensor(ids, dtype=torch.long)
    if ids.numel() <= n_prompt:
        raise ConfigError(f"data.max_length={max_length} leaves no answer token: {question[:60]!r}")
    return ids[:n_prompt], ids[n_prompt:]


def elbo_units(cfg, tok, split: str, items: list[Item]) -> list[Unit]:
    """The split's ELBO work: consecutive (row, answer) pairs packed into units of at least
    ``eval.tokens_per_batch`` sample tokens (an answer's samples stay in one unit, so its estimate is whole),
    each unit's sample sequences then sharing forwards of at most that many tokens."""
    e = cfg.eval
    answers = []
    for row, it in enumerate(items):
        answers += [(row, which, *encode(tok, cfg.data.max_length, it.question, text)) for which, text in it.scored()]
    copies = Layout(cfg.data.layout, cfg.model.block_size).copies
    row, which, prompt, ans = max(answers, key=lambda a: a[2].numel() + a[3].numel())
    longest = copies * (prompt.numel() + ans.numel())
    if longest > e.tokens_per_batch:
        raise ConfigError(f"eval.tokens_per_batch={e.tokens_per_batch} is smaller than one ELBO sequence: the "
                          f"longest of the {split} split, row {row} ({which}), has {longest} tokens "
                          f"(prompt + answer{', two copies' if copies > 1 else ''}); set eval.tokens_per_batch "
                          f">= {longest}")
    units: list[Unit] = []
    pack: list[tuple[int, str, torch.Tensor, torch.Tensor]] = []
    cost = 0
    for answer in answers:
        pack.append(answer)
        cost += e.num_samples * copies * (answer[2].numel() + answer[3].numel())
        if cost >= e.tokens_per_batch:
            units.append(Unit(("nll", split, len(units)), cost, tuple(pack)))
            pack, cost = [], 0
    if pack:
        units.append(Unit(("nll", split, len(units)), cost, tuple(pack)))
    return units


def generation_units(cfg, tok, split: str, items: list[Item]) -> list[Unit]:
    """The split's generations: rows sorted by prompt length (so a batch pads little), cut into batches of
    ``eval.gen_batch_size``. Formed before any work is divided, so a row is generated in the same batch
    whatever the DP size (bitwise-equal results)."""
    e = cfg.eval
    prompts = [encode(tok, cfg.data.max_length, it.question, "x")[0].tolist() for it in items]
    order = sorted(range(len(items)), key=lambda r: (len(prompts[r]), r))
    units = []
    for b in range(0, len(order), e.gen_batch_size):
        rows = order[b: b + e.gen_batch_size]
        longest = max(len(prompts[r]) for r in rows)
        units.append(Unit(("gen", split, len(units)), e.steps * len(rows) * (longest + e.gen_length),
                          (tuple(rows), [prompts[r] for r in rows])))
    return units


@dataclass(frozen=True)
class Unit:
    """One piece of evaluation work: its result key, its cost in token-forwards, what it needs."""

    key: tuple
    cost: int
    payload: tuple


def assign(units: list[Unit], replicas: int) -> list[list[Unit]]:
    """Static balanced split of ``units`` over ``replicas``: longest first, each to the least-loaded replica
    (lowest index on a tie). Deterministic, so every rank computes the same assignment without talking.
    Each replica then runs its units in their original order."""
    load = [0] * replicas
    owner = {}
    for i in sorted(range(len(units)), key=lambda i: (-units[i].cost, i)):
        r = min(range(replicas), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += units[i].cost
    return [[u for i, u in enumerate(units) if owner[i] == r] for r in range(replicas)]


def split_numbers(split: str, items: list[Item], results: dict) -> tuple[dict[str, float], dict[str, list]]:
    """The split's metrics and per-item numbers from the gathered unit ``results``."""
    answer_nll = [results["nll", split, i, "answer"] for i in range(len(items))]
    correct_nll = [a if it.correct == it.answer else results["nll", split, i, "correct"]
                   for i, (a, it) in enumerate(zip(answer_nll, items))]
    wrong_nll = [[results["nll", split, i, f"wrong{j}"] for j in range(len(it.wrong))] for i, it in enumerate(items)]
    k = min(len(w) for w in wrong_nll)
    wrong = [w[:k] for w in wrong_nll]  # open-unlearning stacks the options: equal counts
    generations = [results["gen", split, i] for i in range(len(items))]
    rouge = [M.rouge_l(g, it.answer) for g, it in zip(generations, items)]
    tr = M.truth_ratios(correct_nll, wrong)
    p = PREFIX[split]
    out = {f"{p}_Q_A_ROUGE": float(sum(r.recall for r in rouge) / len(rouge)),
           f"{p}_Q_A_ROUGE_f1": float(sum(r.fmeasure for r in rouge) / len(rouge))}
    if split in ("real_authors", "world_facts"):
        out[f"{p}_Q_A_Prob_normalised"] = M.normalised_probability(answer_nll, wrong)
        out[f"{p}_Q_A_Prob"] = M.probability(answer_nll)
        out[f"{p}_Truth_Ratio"] = M.utility_truth_ratio(tr)
    elif split == "retain":
        out["retain_Q_A_Prob"] = M.probability(answer_nll)
        out["retain_Truth_Ratio"] = M.utility_truth_ratio(tr)
    else:
        out["forget_Q_A_Prob"] = M.probability(answer_nll)
        out["forget_truth_ratio"] = M.forget_truth_ratio(tr)
    per_item = {"question": [it.question for it in items], "answer": [it.answer for it in items],
                "generation": generations, "rouge_recall": [r.recall for r in rouge],
                "answer_nll": answer_nll, "correct_nll": correct_nll, "wrong_nll": wrong,
                "truth_ratio": [float(x) for x in tr]}
    return out, per_item


def evaluate(cfg) -> dict:
    """Collective over every rank (TP x DP) of an initialised process group: every split, the aggregate numbers.

    Each split's units are divided over the DP replicas (``assign``); the TP ranks of a replica compute its units
    together; the results are all-gathered over the DP group, so every rank ends with every number.
    """
    # deferred: megatron-core costs seconds of start-up; the CLI imports this module for --help
    from megatron.core import parallel_state as ps

    e = cfg.eval
    ckpt, kind = resolve_checkpoint(e.checkpoint)
    ev = Evaluator(cfg, ckpt, kind, resolve_tokenizer(cfg, ckpt))
    replicas, replica = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows_by_split = {split: split_items(cfg, split) for split in e.splits}
    local: dict[tuple, object] = {}
    busy: dict[str, float] = {}
    for split, items in rows_by_split.items():
        start = time.perf_counter()
        mine = assign(ev.units(split, items), replicas)[replica]
        desc = f"{split}" + (f" (replica 0 of {replicas})" if replicas > 1 else "")
        # The bar counts token-forwards, so its ETA weighs a long generation batch above a short ELBO.
        with tqdm(total=sum(u.cost for u in mine), desc=desc, unit="tok", unit_scale=True, disable=not ev.show,
                  leave=False) as bar:
            for unit in mine:
                local.update(ev.run_unit(unit))
                bar.update(unit.cost)
        busy[split] = round(time.perf_counter() - start, 2)
    gathered: list = [None] * replicas
    dist.all_gather_object(gathered, (local, busy), group=ps.get_data_parallel_group())
    results = {k: v for part, _ in gathered for k, v in part.items()}
    metrics: dict[str, float | None] = {}
    items: dict[str, dict] = {}
    for split, rows in rows_by_split.items():
        numbers, items[split] = split_numbers(split, rows, results)
        metrics.update(numbers)
    metrics["forget_quality"] = None
    if e.retain_model_eval and "forget" in items:
        metrics["forget_quality"] = M.forget_quality(items["forget"]["truth_ratio"],
                                                     retain_model_truth_ratios(e.retain_model_eval))
    metrics["model_utility"] = (M.model_utility({k: metrics[k] for k in M.MODEL_UTILITY_KEYS})
                                if all(k in metrics for k in M.MODEL_UTILITY_KEYS)
                                else None)
    # Seconds each replica spent on each split (the slowest replica sets the wall time).
    seconds = {split: [b[split] for _, b in gathered] for split in rows_by_split}
    return {"checkpoint": str(ckpt), "metrics": metrics, "items": items, "seconds": seconds,
            "layout": {"tensor": cfg.parallel.tensor, "data": replicas},
            "config": {"eval": asdict(e), "model": asdict(cfg.model), "max_length": cfg.data.max_length,
                       "sampler": ev.sampler}}


ROWS = (  # (label, key) in the Markdown table
    ("forget ROUGE-L recall", "forget_Q_A_ROUGE"), ("forget probability", "forget_Q_A_Prob"),
    ("forget truth ratio", "forget_truth_ratio"), ("forget quality (KS p)", "forget_quality"),
    ("retain ROUGE-L recall", "retain_Q_A_ROUGE"), ("retain probability", "retain_Q_A_Prob"),
    ("retain truth ratio", "retain_Truth_Ratio"),
    ("real authors ROUGE-L recall", "ra_Q_A_ROUGE"), ("real authors probability (normalised)", "ra_Q_A_Prob_normalised"),
    ("real authors truth ratio", "ra_Truth_Ratio"),
    ("world facts ROUGE-L recall", "wf_Q_A_ROUGE"), ("world facts probability (normalised)", "wf_Q_A_Prob_normalised"),
    ("world facts truth ratio", "wf_Truth_Ratio"), ("model utility", "model_utility"),
)


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"


def markdown(result: dict) -> str:
    m = result["metrics"]
    lines = [f"# TOFU evaluation of `{result['checkpoint']}`", "",
             f"ELBO samples: {result['config']['eval']['num_samples']}; rows per split: "
             f"{ {s: len(v['question']) for s, v in result['items'].items()} }", "",
             "| metric | key | value |", "|---|---|---|"]
    lines += [f"| {label} | `{key}` | {fmt(m.get(key))} |" for label, key in ROWS if key in m]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_eval(result: dict, out: Path) -> None:
    """``out/eval.json`` and ``out/eval.md`` of one evaluation, each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "eval.json", json.dumps(result, indent=1, sort_keys=True))
    write_atomic(out / "eval.md", markdown(result))


def run_eval(cfg) -> dict:
    """Entry point of one rank: process groups, the evaluation, rank 0 writes eval.json / eval.md."""
    distributed.init(cfg.parallel, cfg.model)
    try:
        result = evaluate(cfg)
        if dist.get_rank() == 0:
            write_eval(result, Path(cfg.eval.output_dir))
        return result["metrics"]
    finally:
        distributed.shutdown()


def main_eval(cfg, nproc: int | None = None) -> dict:
    """``mdu-dist eval`` from a parent process: validated inputs, then ``nproc`` local ranks (default TP; TP x DP)
    or this launcher's ranks."""
    world = nproc or launched_world_size() or cfg.parallel.tensor
    check_inputs(cfg)
    resolve_layout(world, cfg.parallel, cfg.model)
    return run_ranks(run_eval, world, cfg)[0]
