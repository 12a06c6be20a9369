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


def test_planted_blocks_end_with_the_answer_to_their_own_key(tokenizer, haystack):
    import datasets

    from longnet.passkey import answer

    length = 300
    blocks = datasets.Dataset.from_dict(
        {
            "input_ids": [haystack[i * length : (i + 1) * length] for i in range(40)],
            "labels": [haystack[i * length : (i + 1) * length] for i in range(40)],
            "position_ids": [[0] * length for _ in range(40)],  # as if every token started a document
        }
    )
    planted = plant_passkeys(blocks, tokenizer, share=0.5, seed=3)
    assert planted[:] == plant_passkeys(blocks, tokenizer, share=0.5, seed=3)[:]  # the seed decides
    changed = 0
    for before, after in zip(blocks, planted, strict=True):
        if after == before:
            continue
        changed += 1
        text = tokenizer.decode(after["input_ids"])
        key = re.search(r"The pass key is (\d{5})\. Remember it\.", text).group(1)
        assert answer(text.rsplit(QUESTION, 1)[1]) == key and text.count(key) == 3
        assert len(after["input_ids"]) == length and after["position_ids"] == list(range(length))
        assert after["labels"] == [-100, *after["input_ids"][1:]]
    assert 10 <= changed <= 30
