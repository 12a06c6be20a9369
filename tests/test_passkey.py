"""Pass key retrieval (longnet.passkey, ``evaluate.py --task passkey``): prompts, scoring and the report.

The scorer is checked with two stand-in models whose answers are known: one that reads the key from its
prompt (accuracy must be 1) and one that answers another number (accuracy must be 0).
"""

import json
import re

import pytest
import torch
from conftest import make_model, stdlib_text

from longnet.passkey import (
    NEEDLE,
    QUESTION,
    check_grid,
    make_prompt,
    passkey_accuracy,
    plant_passkeys,
    write_passkey_report,
)


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return tokenizer(stdlib_text(60_000), add_special_tokens=False)["input_ids"]


class StandIn(torch.nn.Module):
    """Answers with the key written in its prompt (``reads=True``) or with a wrong 5-digit number."""

    def __init__(self, tokenizer, reads: bool):
        super().__init__()
        self.tokenizer, self.reads = tokenizer, reads
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, ids, max_new_tokens, **kwargs):
        rows = []
        for text in self.tokenizer.batch_decode(ids):
            key = re.search(r"pass key is (\d{5})", text).group(1)
            said = key if self.reads else str(100000 - int(key) + 1).zfill(5)[-5:]
            new = self.tokenizer(" " + said, add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(torch.cat([torch.tensor(new), torch.zeros(max_new_tokens - len(new), dtype=torch.long)]))
        return torch.cat([ids, torch.stack(rows)], 1)


@pytest.mark.parametrize("depth", [0, 25, 50, 100])
def test_prompt_has_the_length_and_the_needle_at_the_depth(tokenizer, haystack, depth):
    import random

    prompt = make_prompt(tokenizer, haystack, 400, depth, random.Random(0))
    assert len(prompt.ids) == 400 and len(prompt.key) == 5
    text = tokenizer.decode(prompt.ids)
    assert text.count(prompt.key) == 2 and text.endswith("The pass key is")
    needle = tokenizer(NEEDLE.format(key=prompt.key), add_special_tokens=False)["input_ids"]
    assert prompt.ids[prompt.needle_start : prompt.needle_start + len(needle)] == needle
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    assert prompt.ids[-len(question) :] == question
    assert prompt.needle_start == round((400 - len(needle) - len(question)) * depth / 100)


@pytest.mark.parametrize("reads, expected", [(True, 1.0), (False, 0.0)])
def test_accuracy_is_the_share_of_keys_answered(tokenizer, haystack, reads, expected):
    model = StandIn(tokenizer, reads)
    results = passkey_accuracy(model, tokenizer, haystack, [128, 256], [0, 50, 100], 5, batch_size=2)
    assert results == {length: {depth: expected for depth in (0, 50, 100)} for length in (128, 256)}


def test_report_files(tmp_path):
    results = {
        "LongNet": {128: {0.0: 1.0, 100.0: 0.5}, 256: {0.0: 0.25, 100.0: 1.0}},
        "Llama": {128: {0.0: 0.0, 100.0: 0.0}},
    }
    write_passkey_report(results, tmp_path, notes="two models")
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert saved["LongNet"]["256"]["0.0"] == 0.25 and saved["Llama"]["128"]["100.0"] == 0.0
    table = (tmp_path / "passkey.md").read_text()
    assert "| 0% | 1.00 | 0.25 |" in table and "## Accuracy by distance from the question" in table
    # Distances: depth 100 -> 1 token (both lengths), depth 0 -> 128 and 256 tokens.
    assert "| 1 | 0.75 | 0.00 |" in table and "| 256 | 0.25 |  |" in table
    assert (tmp_path / "passkey_LongNet.png").stat().st_size > 0 and (tmp_path / "passkey_Llama.png").exists()


@pytest.mark.parametrize(
    "lengths, depths, keys, message",
    [
        ([16], [0], 1, "--lengths must leave room"),
        ([512], [0, 120], 1, "--depths are percentages from 0 to 100, got 120"),
        ([512], [50], 0, "--keys_per_cell must be at least 1, got 0"),
    ],
)
def test_bad_grid_is_a_clear_error(lengths, depths, keys, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_grid(lengths, depths, keys, shortest=30)


def test_a_model_folder_runs_through_evaluate(tokenizer, tmp_path, capsys):
    """evaluate.py --task passkey on a saved (random) LongNet: the grid runs and the report is written."""
    import sys
    from pathlib import Path

    folder = tmp_path / "model"
    make_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "held_out.py"
    data.write_text(stdlib_text(40_000))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from evaluate import main
    finally:
        sys.path.pop(0)
    out = tmp_path / "report"
    main(
        [
            str(folder),
            "--task",
            "passkey",
            "--validation_file",
            str(data),
            "--lengths",
            "96",
            "192",
            "--depths",
            "0",
            "100",
            "--keys_per_cell",
            "3",
            "--batch_size",
            "3",
            "--names",
            "tiny",
            "--out",
            str(out),
        ]
    )
    saved = json.loads((out / "passkey.json").read_text())
    assert set(saved["tiny"]) == {"96", "192"}
    assert all(0 <= accuracy <= 1 for row in saved["tiny"].values() for accuracy in row.values())
    assert (out / "passkey_tiny.png").exists() and "mean accuracy" in capsys.readouterr().out


def haystack_blocks(haystack, count: int, length: int):
    import datasets

    return datasets.Dataset.from_dict(
        {
            "input_ids": [haystack[i * length : (i + 1) * length] for i in range(count)],
            "labels": [haystack[i * length : (i + 1) * length] for i in range(count)],
            "position_ids": [[0] * length for _ in range(count)],  # as if every token started a document
        }
    )


def test_planted_blocks_end_with_the_answer_to_their_own_key(tokenizer, haystack):
    from longnet.passkey import answer

    length = 300
    blocks = haystack_blocks(haystack, 40, length)
    planted = plant_passkeys(blocks, tokenizer, share=0.5, seed=3)
    assert planted[:] == plant_passkeys(blocks, tokenizer, share=0.5, seed=3)[:]  # the seed decides
    changed = 0
    for before, after in zip(blocks, planted, strict=True):
        if after["input_ids"] == before["input_ids"]:
            assert after["answer_mask"] == [0] * length and after["position_ids"] == before["position_ids"]
            continue
        changed += 1
        text = tokenizer.decode(after["input_ids"])
        key = re.search(r"The pass key is (\d{5})\. Remember it\.", text).group(1)
        assert answer(text.rsplit(QUESTION, 1)[1]) == key and text.count(key) == 3
        assert len(after["input_ids"]) == length and after["position_ids"] == list(range(length))
        assert after["labels"] == [-100, *after["input_ids"][1:]]
        answered = [token for token, marked in zip(after["input_ids"], after["answer_mask"], strict=True) if marked]
        assert tokenizer.decode(answered) == f" {key}\n"
    assert 10 <= changed <= 30


def test_episodes_each_ask_for_their_own_latest_key(tokenizer, haystack):
    """With ``episodes=8`` a 1,200-token block holds 1, 2, 4 or 8 episodes of equal length; every question
    is followed by the key of the needle just before it, and the answer mask marks exactly those answers."""
    length = 1200
    planted = plant_passkeys(haystack_blocks(haystack, 24, length), tokenizer, share=1.0, seed=5, episodes=8)
    counts = set()
    for block in planted:
        ids, mask = block["input_ids"], block["answer_mask"]
        text = tokenizer.decode(ids)
        episodes = text.split(QUESTION)[:-1]
        counts.add(len(episodes))
        replies = re.findall(re.escape(QUESTION) + r" (\d{5})\n", text)
        for episode, reply in zip(episodes, replies, strict=True):
            assert re.findall(r"The pass key is (\d{5})\. Remember it\.", episode)[-1] == reply
        marked = tokenizer.decode([token for token, bit in zip(ids, mask, strict=True) if bit])
        assert marked == "".join(f" {reply}\n" for reply in replies)
        ends = [i + 1 for i in range(length) if mask[i] and (i + 1 == length or not mask[i + 1])]
        assert ends == [length * (i + 1) // len(episodes) for i in range(len(episodes))]  # equal episodes
    assert counts == {1, 2, 4, 8}


def test_answer_weighted_loss_adds_weighted_answer_tokens(tokenizer, haystack):
    """AnswerWeightedTrainer's loss against the model's own loss: with N scored tokens of mean loss M, of
    which n answer tokens of mean loss A, weight W gives (N M + W n A) / (N + W n); and W = 0 gives M."""
    from transformers import TrainingArguments

    from longnet.training import AnswerWeightedTrainer

    planted = plant_passkeys(haystack_blocks(haystack, 2, 256), tokenizer, share=1.0, seed=1, episodes=4)
    batch = {name: torch.tensor(planted[name]) for name in planted.column_names}
    model = make_model(vocab_size=len(tokenizer))
    answers_only = torch.where(batch["answer_mask"].bool(), batch["labels"], -100)
    with torch.no_grad():
        everything = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        answer_loss = model(input_ids=batch["input_ids"], labels=answers_only).loss
    scored, answered = (batch["labels"][:, 1:] != -100).sum(), batch["answer_mask"][:, 1:].sum()
    for weight in (0.0, 7.0):
        trainer = AnswerWeightedTrainer(
            model=model, args=TrainingArguments("unused", report_to=[], use_cpu=True), answer_weight=weight
        )
        with torch.no_grad():
            loss = trainer.compute_loss(model, dict(batch))
        expected = (scored * everything + weight * answered * answer_loss) / (scored + weight * answered)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
