"""Data: the bundled TOFU (checked against its MANIFEST), user files and Hugging Face datasets (written by
``datasets`` itself), the chat template split into prompt and response, padding, pairing, and clear errors for
bad rows."""

import hashlib
import json

import pytest
import torch

from mdu_dist.data import (BUNDLED_TOFU, TINY_IDS, DataConfig, DataError, ForgetRetainData, QA, build_tokenizer,
                           collate, collate_parts, encode_pair, load_lines, load_pairs, load_tokenizer,
                           train_tokenizer)

TOFU = DataConfig().tofu_dir  # the default: the copy bundled with the package


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [q.question + " " + q.answer for q in load_pairs("forget10", TOFU)]
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(texts, 600, out)
    return load_tokenizer(out)


def test_bundled_files_match_manifest_sha256():
    manifest = json.loads((BUNDLED_TOFU / "MANIFEST.json").read_text())
    files = {p.name: p.read_bytes() for p in BUNDLED_TOFU.iterdir() if p.name != "MANIFEST.json"}
    assert sorted(files) == sorted(manifest)  # every file listed, nothing listed missing
    assert "LICENSE.locuslab-tofu.MIT" in files and b"MIT License" in files["LICENSE.locuslab-tofu.MIT"]
    for name, data in files.items():
        want = manifest[name]
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (want["sha256"], want["bytes"]), name


def test_tofu_splits_match_manifest():
    manifest = json.loads((BUNDLED_TOFU / "MANIFEST.json").read_text())
    for split in ("forget10", "retain90", "real_authors"):
        assert len(load_pairs(split, TOFU)) == manifest[f"{split}.json"]["rows"]
    assert len(load_pairs("full", TOFU, limit=17)) == 17
    assert load_lines(DataConfig().idk_path())[0] == "I'm not certain about that."
    assert len(load_lines(DataConfig().idk_path())) == manifest["idontknow.jsonl"]["rows"]


def test_default_tofu_dir_is_the_bundled_copy_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [json.loads(line) for line in (BUNDLED_TOFU / "forget01.json").read_text().splitlines()]
    assert load_pairs("forget01", DataConfig().tofu_dir) == [QA(r["question"], r["answer"]) for r in rows]
    # A directory the user gives stays relative to the working directory.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "forget01.json").write_text('[{"question": "q?", "answer": "a."}]')
    assert load_pairs("forget01", "mine") == [QA("q?", "a.")]
    with pytest.raises(DataError, match=r"'forget10': neither .* TOFU split in mine"):
        load_pairs("forget10", "mine")


def test_trained_tokenizer_is_deterministic_and_survives_saving(tmp_path):
    texts = [q.question + " " + q.answer for q in load_pairs("forget01", TOFU)]
    a, b = train_tokenizer(texts, 400), train_tokenizer(texts, 400)
    assert a.get_vocab() == b.get_vocab()
    a.save_pretrained(str(tmp_path))
    saved = load_tokenizer(tmp_path)
    for qa in load_pairs("retain99", TOFU, limit=20):
        assert encode_pair(a, qa, 256) == encode_pair(saved, qa, 256)


def test_special_token_ids_match_tiny_configs(tokenizer):
    from mdu_dist.config import load_config

    m = load_config("configs/llada_tiny.yaml").model
    assert tokenizer.convert_tokens_to_ids(["<|mask|>", "<|eos|>"]) == [m.mask_token_id, m.eos_token_id]
    assert tokenizer.pad_token_id == m.pad_token_id == TINY_IDS["<|eos|>"]


def test_prompt_response_split(tokenizer):
    qa = QA("Who wrote Jaime's books?", "Jaime Vasquez did.")
    ids, prompt_len = encode_pair(tokenizer, qa, 128)
    text_prompt = tokenizer.decode(ids[:prompt_len])
    text_response = tokenizer.decode(ids[prompt_len:])
    assert text_prompt == "<|bos|><|user|>Who wrote Jaime's books?<|eot|><|assistant|>"
    assert text_response == "Jaime Vasquez did.<|eot|>"  # the end-of-turn token belongs to the response


def test_collate_right_pads_and_marks_response_only():
    pairs = collate([([9, 9, 5, 6, 7], 2), ([9, 5, 6], 1)], pad_id=2, length=6)
    assert pairs.input_ids.tolist() == [[9, 9, 5, 6, 7, 2], [9, 5, 6, 2, 2, 2]]
    assert pairs.response_mask.tolist() == [[False, False, True, True, True, False],
                                            [False, True, True, False, False, False]]
    # LLaDA's SFT: the EOS padding after the answer is response too (the prompt never is).
    pairs = collate([([9, 9, 5, 6, 7], 2), ([9, 5, 6], 1)], pad_id=2, length=6, pad_in_response=True)
    assert pairs.input_ids.tolist() == [[9, 9, 5, 6, 7, 2], [9, 5, 6, 2, 2, 2]]
    assert pairs.response_mask.tolist() == [[False, False, True, True, True, True],
                                            [False, True, True, True, True, True]]


def test_long_prompt_refused_long_answer_truncated(tokenizer):
    with pytest.raises(DataError, match="does not fit data.max_length=8"):
        encode_pair(tokenizer, QA("a very long question " * 10, "x"), 8)
    ids, prompt_len = encode_pair(tokenizer, QA("q?", "a long answer " * 50), 32)
    assert len(ids) == 32 and prompt_len < 32


def test_forget_retain_pairing_is_reproducible(tokenizer):
    forget = load_pairs("forget01", TOFU)
    retain = load_pairs("retain99", TOFU, limit=50)
    data = ForgetRetainData(tokenizer, forget, retain, 96, idk_answers=load_lines(DataConfig().idk_path()),
                            seed=3)
    pad = tokenizer.pad_token_id
    a, b = (collate_parts(data.parts([0, 5, 7], epoch=1), pad) for _ in range(2))
    assert set(a) == {"forget", "retain", "idk"}
    assert all(torch.equal(a[k].input_ids, b[k].input_ids) for k in a)
    assert not torch.equal(a["retain"].input_ids, collate_parts(data.parts([0, 5, 7], epoch=2), pad)["retain"].input_ids)
    assert collate_parts(data.parts([0], epoch=1), pad, length=100)["forget"].input_ids.shape == (1, 100)
    lengths = {p.input_ids.shape[1] for p in a.values()}
    assert len(lengths) == 1  # every part padded to one length
    # The idk row asks the forget question: same prompt tokens.
    prompt = ~a["forget"].response_mask[0] & (a["forget"].input_ids[0] != tokenizer.pad_token_id)
    assert torch.equal(a["forget"].input_ids[0][prompt], a["idk"].input_ids[0][: int(prompt.sum())])


def test_bad_rows_are_named(tmp_path, tokenizer):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2"}\n')
    with pytest.raises(DataError, match=r"mine.jsonl: row 2 has no 'answer'"):
        load_pairs(str(bad), TOFU)
    bad.write_text('{"question": "q1", "answer": "a1"}\n{oops\n')
    with pytest.raises(DataError, match=r"mine.jsonl:2: not valid JSON"):
        load_pairs(str(bad), TOFU)
    with pytest.raises(DataError, match=r"'forget99': neither .* \(splits: .*forget10"):
        load_pairs("forget99", TOFU)
    with pytest.raises(DataError, match="the forget set is empty"):
        ForgetRetainData(tokenizer, [], [QA("q", "a")], 32)
    with pytest.raises(DataError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------ Hugging Face datasets

ROWS = [{"prompt": f"Who wrote book {i}?", "completion": f"Author {i} wrote it.", "id": i} for i in range(5)]
KEYS = {"question_key": "prompt", "answer_key": "completion"}
WANT = [QA(r["prompt"], r["completion"]) for r in ROWS]


def test_save_to_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_pairs(str(tmp_path / "ds"), TOFU, **KEYS) == WANT
    assert load_pairs(str(tmp_path / "ds"), TOFU, limit=2, **KEYS) == WANT[:2]
    with pytest.raises(DataError, match=r"ds: row 1 has no 'question' .*data.question_key names the field; its "
                                        r"fields: prompt, completion, id"):
        load_pairs(str(tmp_path / "ds"), TOFU)
    both = datasets.DatasetDict({"forget": datasets.Dataset.from_list(ROWS[:2]),
                                 "retain": datasets.Dataset.from_list(ROWS[2:])})
    both.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: a DatasetDict with splits forget, retain; give one split's directory"):
        load_pairs(str(tmp_path / "dd"), TOFU, **KEYS)
    assert load_pairs(str(tmp_path / "dd" / "retain"), TOFU, **KEYS) == WANT[2:]


def _cache(datasets, root, name: str, config: str, splits: dict) -> None:
    """What ``load_dataset(name, config)`` leaves in the cache, written by ``datasets``' own JSON builder."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    for split, rows in splits.items():
        (root / f"{name}-{config}-{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    files = DataFilesDict.from_patterns({s: [f"{name}-{config}-{s}.jsonl"] for s in splits}, base_path=str(root))
    Json(cache_dir=str(root / "cache"), dataset_name=name, config_name=config, config_id=config,
         hash="0123abcd", data_files=files).download_and_prepare()


def test_hf_dataset_from_the_local_cache_only(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    # TOFU's layout (one config per split name, each a train split) and a one-config dataset with named splits.
    _cache(datasets, tmp_path, "tinyqa", "forget", {"train": ROWS[:3]})
    _cache(datasets, tmp_path, "tinyqa", "retain", {"train": ROWS[3:], "test": ROWS[:1]})
    _cache(datasets, tmp_path, "splitqa", "default", {"forget": ROWS[:2], "retain": ROWS[2:]})
    assert load_pairs("hf:tinyqa:forget", TOFU, **KEYS) == WANT[:3]
    assert load_pairs("hf:tinyqa:retain:test", TOFU, **KEYS) == WANT[:1]
    assert load_pairs("hf:splitqa:retain", TOFU, **KEYS) == WANT[2:]  # not a config: a split of the default
    with pytest.raises(DataError, match=r"'hf:splitqa'.*local datasets cache .*Unknown split \"train\""):
        load_pairs("hf:splitqa", TOFU, **KEYS)  # the default config's train split: it has none
    with pytest.raises(DataError, match=r"'hf:tinyqa:holdout'.*config 'holdout'; Available configs in the cache"):
        load_pairs("hf:tinyqa:holdout", TOFU, **KEYS)
    with pytest.raises(DataError, match=r"'hf:locuslab/TOFU:forget10': locuslab/TOFU is not in the local datasets "
                                        r"cache .*offline only"):
        load_pairs("hf:locuslab/TOFU:forget10", TOFU)  # never downloaded
    with pytest.raises(DataError, match=r"'hf:a:b:c:d': expected hf:NAME"):
        load_pairs("hf:a:b:c:d", TOFU)
