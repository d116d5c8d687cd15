"""Data: TOFU splits and user files, the chat template split into prompt and response, padding, pairing,
and clear errors for bad rows."""

import json

import pytest
import torch

from mdu_dist.data import (TINY_IDS, DataError, ForgetRetainData, QA, build_tokenizer, collate, collate_parts,
                           encode_pair, load_lines, load_pairs, load_tokenizer)

TOFU = "../shared/data/tofu"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [q.question + " " + q.answer for q in load_pairs("forget10", TOFU)]
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(texts, 600, out)
    return load_tokenizer(out)


def test_tofu_splits_match_manifest():
    manifest = json.load(open(f"{TOFU}/MANIFEST.json"))
    for split in ("forget10", "retain90", "real_authors"):
        assert len(load_pairs(split, TOFU)) == manifest[f"{split}.json"]["rows"]
    assert len(load_pairs("full", TOFU, limit=17)) == 17
    assert load_lines(f"{TOFU}/idontknow.jsonl")[0] == "I'm not certain about that."


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
    data = ForgetRetainData(tokenizer, forget, retain, 96, idk_answers=load_lines(f"{TOFU}/idontknow.jsonl"),
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
