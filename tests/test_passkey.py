"""Pass key retrieval (longnet.passkey, ``evaluate.py --task passkey``): prompts, scoring and the report.

The scorer is checked with two stand-in models whose answers are known: one that reads the key from its
prompt (accuracy must be 1) and one that answers another number (accuracy must be 0).
"""

import json
import re

import pytest
import torch
from conftest import TINY, make_model, random_ids, stdlib_text

from longnet import LongNetConfig
from longnet.passkey import (
    NEEDLE,
    QUESTION,
    answer,
    answer_reach,
    check_grid,
    make_prompt,
    passkey_accuracy,
    plant_passkeys,
    retrieval_by_branch,
    retrieval_by_token,
    sees_directly,
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
    results, by_copies = passkey_accuracy(model, tokenizer, haystack, [128, 256], [0, 50, 100], 5, batch_size=2)
    assert results == {length: {depth: expected for depth in (0, 50, 100)} for length in (128, 256)}
    assert by_copies == {}  # a stand-in without a config


class ReadsAtItsResidue(StandIn):
    """A stand-in with one r = 2 branch over the whole prompt, right only when both key copies start at the
    residue of the prompt's last position (so every key token's copies are at its predicting position's)."""

    config = LongNetConfig(**TINY, segment_lengths=[4096], dilation_rates=[2])

    def generate(self, ids, max_new_tokens, **kwargs):
        rows = []
        for row in ids.tolist():
            key = re.search(r"pass key is (\d{5})", self.tokenizer.decode(row)).group(1)
            key_ids = self.tokenizer(" " + key, add_special_tokens=False)["input_ids"]
            starts = [i for i in range(len(row)) if row[i : i + len(key_ids)] == key_ids]
            both = len(starts) == 2 and all(start % 2 == (len(row) - 1) % 2 for start in starts)
            new = self.tokenizer(" " + (key if both else "00000"), add_special_tokens=False)["input_ids"]
            rows.append(torch.tensor(new + [0] * (max_new_tokens - len(new))))
        return torch.cat([ids, torch.stack(rows)], 1)


def test_exact_match_by_copies_read_counts_each_prompt_by_the_copies_at_the_answers_residue(tokenizer, haystack):
    model = ReadsAtItsResidue(tokenizer, reads=True)
    _, by_copies = passkey_accuracy(model, tokenizer, haystack, [128, 257], [0, 25, 50, 75, 100], 8)
    assert sum(total for _, total in by_copies.values()) == 2 * 5 * 8
    assert set(by_copies) <= {0, 1, 2} and by_copies[2][1] > 0 and by_copies[2][0] == by_copies[2][1]
    assert all(right == 0 for seen, (right, _) in by_copies.items() if seen != 2)
    assert by_copies.get(0, (0, 0))[1] + by_copies.get(1, (0, 0))[1] > 0


@pytest.mark.parametrize(
    "text, key", [(" 12345.", "12345"), (" 123456", None), (" 1234 and 12345", None), (" none", None)]
)
def test_the_answer_is_the_first_number_when_it_has_five_digits(text, key):
    # A longer number holds the key's digits but does not answer with it.
    assert answer(text) == key


def test_report_files(tmp_path):
    results = {
        "LongNet": {128: {0.0: 1.0, 100.0: 0.5}, 256: {0.0: 0.25, 100.0: 1.0}},
        "Llama": {128: {0.0: 0.0, 100.0: 0.0}},
    }
    by_copies = {"LongNet": {0: (3, 4), 2: (1, 2)}, "Llama": {}}  # a model without counts gets no column
    write_passkey_report(results, tmp_path, notes="two models", by_copies=by_copies)
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert saved["LongNet"]["256"]["0.0"] == 0.25 and saved["Llama"]["128"]["100.0"] == 0.0
    table = (tmp_path / "passkey.md").read_text()
    assert "| 0% | 1.00 | 0.25 |" in table and "## Accuracy by distance from the question" in table
    # Distances: depth 100 -> 1 token (both lengths), depth 0 -> 128 and 256 tokens.
    assert "| 1 | 0.75 | 0.00 |" in table and "| 256 | 0.25 |  |" in table
    assert "| copies read | LongNet |" in table and "| 0 | 3/4 (0.75) |" in table and "| 2 | 1/2 (0.50) |" in table
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


@pytest.fixture(scope="module")
def evaluate_main():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from evaluate import main
    finally:
        sys.path.pop(0)
    return main


def test_a_model_folder_runs_through_evaluate(tokenizer, tmp_path, capsys, evaluate_main):
    """evaluate.py --task passkey on a saved (random) LongNet: the grid runs and the report is written."""
    folder = tmp_path / "model"
    make_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "held_out.py"
    data.write_text(stdlib_text(40_000))
    main = evaluate_main
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
    # the tiny branches (4, 8, 12) all divide 96 and 192: the report says the answer cannot see the prompt
    assert "tiny: Answer tokens after the first" in (out / "passkey.md").read_text()
    assert "at 96: none: tokens after the first see nothing of the prompt" in (out / "passkey.md").read_text()


@pytest.mark.parametrize(
    "segments, rates, reaches",
    [((16, 32), (1, 2), False), ((16, 32, 128), (1, 2, 4), True), ((16, 48), (1, 2), True)],
)
def test_answer_reach_says_whether_generated_tokens_see_the_prompt(segments, rates, reaches):
    """The model itself decides: with every segment length dividing the prompt's 64 tokens, the logits from
    position 64 on do not change when the prompt changes; with a branch that does not divide it, they do."""
    model = make_model(segment_lengths=list(segments), dilation_rates=list(rates))
    prompt, other, answer = random_ids(1, 64, seed=1), random_ids(1, 64, seed=2), random_ids(1, 8, seed=3)
    with torch.no_grad():
        after = [model(torch.cat([p, answer], dim=1)).logits[0, 64:] for p in (prompt, other)]
    assert (not torch.allclose(after[0], after[1], atol=1e-6)) == reaches
    note = answer_reach(model.config, [64])
    assert ("none: tokens after the first see nothing of the prompt" not in note) == reaches
    assert all((f"w = {w} (r = {r})" in note) == (64 % w != 0) for w, r in zip(segments, rates, strict=True))


class BranchStandIn(torch.nn.Module):
    """Predicts the key's first token when it can see the needle: always with branch ``far`` kept, with only
    the local (first) branch when the needle lies in the question's local segment; else a wrong token."""

    def __init__(self, tokenizer, far: int):
        from types import SimpleNamespace

        super().__init__()
        self.tokenizer, self.far = tokenizer, far
        self.config = SimpleNamespace(segment_lengths=[128, far], dilation_rates=[1, 2])
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache, logits_to_keep):
        from types import SimpleNamespace

        text = self.tokenizer.decode(ids[0])
        key = re.search(r"pass key is (\d{5})", text).group(1)
        needle = self.tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
        start = next(i for i in range(ids.shape[1]) if ids[0, i : i + len(needle)].tolist() == needle)
        local = start // 128 == (ids.shape[1] - 1) // 128 and 128 in self.config.segment_lengths
        seen = local or self.far in self.config.segment_lengths
        first = self.tokenizer(" " + key, add_special_tokens=False)["input_ids"][0]
        logits = torch.zeros(1, ids.shape[1], len(self.tokenizer))
        logits[0, -1, first if seen else (first + 1) % len(self.tokenizer)] = 1
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


def test_retrieval_by_branch_leaves_each_branch_out(tokenizer, haystack):
    model = BranchStandIn(tokenizer, far=512)
    table = retrieval_by_branch(model, tokenizer, haystack, 256, prompts=40)
    both, local = "w = 128 (r = 1), w = 512 (r = 2)", "w = 128 (r = 1)"
    assert list(table) == [both, "w = 512 (r = 2)", local]  # every branch, each left out (= the other alone)
    for label, row in table.items():
        assert set(row) == {"same local segment", "earlier segment"}
        assert sum(total for _, total in row.values()) == 40
        for place, (right, total) in row.items():
            assert right == (0 if label == local and place == "earlier segment" else total)
    assert model.config.segment_lengths == [128, 512] and model.config.dilation_rates == [1, 2]  # restored


def test_answer_reach_is_empty_for_dense_models():
    from transformers import LlamaConfig

    assert answer_reach(LlamaConfig(), [1024]) == ""


def saved_models(tokenizer, folder):
    """A tiny LongNet (w = 16, 64; r = 1, 2) and a tiny Llama saved with the tokenizer, and held-out text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    longnet_folder, dense_folder, data = folder / "longnet", folder / "dense", folder / "held_out.py"
    make_model(segment_lengths=[16, 64], dilation_rates=[1, 2]).save_pretrained(longnet_folder)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(dense_folder)
    for saved in (longnet_folder, dense_folder):
        tokenizer.save_pretrained(saved)
    data.write_text(stdlib_text(40_000))
    return longnet_folder, dense_folder, data


def test_tokens_task_runs_through_evaluate(tokenizer, tmp_path, evaluate_main):
    """evaluate.py --task tokens: a table per model and length, any causal LM."""
    longnet_folder, dense_folder, data = saved_models(tokenizer, tmp_path)
    evaluate_main(
        [str(longnet_folder), str(dense_folder), "--names", "LongNet", "Llama", "--task", "tokens"]
        + ["--validation_file", str(data), "--lengths", "96", "--keys_per_cell", "6", "--out", str(tmp_path / "report")]
    )
    report = (tmp_path / "report" / "tokens.md").read_text()
    assert "## LongNet at 96 tokens" in report and "## Llama at 96 tokens" in report
    results = json.loads((tmp_path / "report" / "tokens.json").read_text())
    assert set(results["Llama"]["96"]["first token"]) == {"2"}  # a dense model reads both copies
    assert sum(total for _, total in results["LongNet"]["96"]["first token"].values()) == 6


def test_branches_task_runs_through_evaluate(tokenizer, tmp_path, capsys, evaluate_main):
    """evaluate.py --task branches: a row per branch set for a LongNet; a dense model is one error line."""
    longnet_folder, dense_folder, data = saved_models(tokenizer, tmp_path)
    common = ["--task", "branches", "--validation_file", str(data), "--lengths", "96", "--keys_per_cell", "4"]
    evaluate_main([str(longnet_folder), *common, "--out", str(tmp_path / "report")])
    rows = ["w = 16 (r = 1), w = 64 (r = 2)", "w = 64 (r = 2)", "w = 16 (r = 1)"]  # all, each left out
    report = (tmp_path / "report" / "branches.md").read_text()
    assert all(f"| {row} |" in report for row in rows)
    assert list(json.loads((tmp_path / "report" / "branches.json").read_text())["longnet"]["96"]) == rows
    with pytest.raises(SystemExit) as stop:
        evaluate_main([str(dense_folder), *common, "--out", str(tmp_path / "dense_report")])
    assert stop.value.code == 2 and "error: --task branches needs LongNet models" in capsys.readouterr().err
    assert not (tmp_path / "dense_report").exists()


@pytest.mark.parametrize(
    "segments, rates, heads",
    [((4, 8, 12), (1, 2, 3), 4), ((6, 20), (1, 4), 4), ((5, 7), (2, 3), 2), ((8, 32), (1, 6), 4)],
)
def test_sees_directly_matches_the_attention(segments, rates, heads):
    """Position t reads position s in one layer exactly when the output at t depends on the value at s in
    some head of ``dilated_attention`` (w % r != 0 and r > heads included)."""
    from types import SimpleNamespace

    from longnet import dilated_attention

    length = 40
    config = SimpleNamespace(segment_lengths=list(segments), dilation_rates=list(rates), num_attention_heads=heads)
    query, key = torch.randn(2, 1, heads, length, 8).unbind(0)
    value = torch.randn(1, heads, length, 8, requires_grad=True)
    out = dilated_attention(query, key, value, segments, rates, backend="eager")
    for t in range(length):
        (gradient,) = torch.autograd.grad(out[0, :, t].sum(), value, retain_graph=True)
        reads = gradient[0].abs().sum((0, 2)) > 0  # over heads and channels
        assert reads.tolist() == [sees_directly(config, t, s) for s in range(length)], t


class KeyReader(torch.nn.Module):
    """Predicts every next token right (teacher forcing makes that the prompt's own next token)."""

    def __init__(self, vocabulary: int, **config):
        from types import SimpleNamespace

        super().__init__()
        self.vocabulary, self.config = vocabulary, SimpleNamespace(num_attention_heads=2, **config)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache, logits_to_keep):
        from types import SimpleNamespace

        logits = torch.nn.functional.one_hot(torch.roll(ids, -1, 1), self.vocabulary).float()
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


def test_retrieval_by_token_counts_the_copies_a_position_reads(tokenizer, haystack):
    """A dense model reads both copies of every key token; with one branch of rate 2 over the whole prompt,
    a position reads the copies at its own parity (the same for every token of a prompt's key). Later tokens
    are also counted by the predicting position's parity."""
    import random

    dense, skipped = retrieval_by_token(KeyReader(len(tokenizer)), tokenizer, haystack, 300, prompts=12)
    assert skipped == 0 and set(dense["first token"]) == {2} and set(dense["later tokens"]) == {2}
    assert dense["first token"][2] == (12, 12)
    dilated, _ = retrieval_by_token(
        KeyReader(len(tokenizer), segment_lengths=[512], dilation_rates=[2]), tokenizer, haystack, 300, prompts=12
    )
    rng = random.Random("0-300-tokens")  # the prompts retrieval_by_token asks
    expected = {}
    for _ in range(12):
        prompt = make_prompt(tokenizer, haystack, 300, rng.uniform(0, 100), rng)
        key_ids = tokenizer(" " + prompt.key, add_special_tokens=False)["input_ids"]
        starts = [i for i in range(300) if prompt.ids[i : i + len(key_ids)] == key_ids]
        at_parity = sum((299 - start) % 2 == 0 for start in starts)
        predicting = range(300, 299 + len(key_ids))  # the positions that predict the later tokens
        even = sum(position % 2 == 0 for position in predicting)
        rows = [("first token", 1), ("later tokens", len(key_ids) - 1)]
        rows += [
            ("later tokens, from even positions", even),
            ("later tokens, from odd positions", len(predicting) - even),
        ]
        for row, tokens in rows:
            right, total = expected.setdefault(row, {}).get(at_parity, (0, 0))
            expected[row][at_parity] = (right + tokens, total + tokens)
    expected = {row: {c: cell for c, cell in cells.items() if cell[1]} for row, cells in expected.items()}
    assert {row: dict(cells) for row, cells in dilated.items()} == expected


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


@pytest.mark.parametrize("boundary", [0, 64])
def test_episodes_each_ask_for_their_own_latest_key(tokenizer, haystack, boundary):
    """With ``episodes=8`` a 1,200-token block holds 1, 2, 4 or 8 equal slots, an episode ending anywhere in
    the second half of each; every question is followed by the key of the needle just before it, and the
    answer mask marks exactly those answers. With a ``boundary``, about half the answers start on a multiple
    of it (by chance: 1 in 64)."""
    length = 1200
    blocks = haystack_blocks(haystack, 24, length)
    planted = plant_passkeys(blocks, tokenizer, share=1.0, seed=5, episodes=8, boundary=boundary)
    counts, shifts, starts = set(), [], []
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
        starts += [i for i in range(length) if mask[i] and not (i and mask[i - 1])]
        slots = [(length * i // len(episodes), length * (i + 1) // len(episodes)) for i in range(len(episodes))]
        for end, (start, stop) in zip(ends, slots, strict=True):  # equal slots, each episode ends in its 2nd half
            assert start + (stop - start) // 2 <= end <= stop
            shifts.append(stop - end)
    assert counts == {1, 2, 4, 8}
    assert len(set(shifts)) > len(shifts) // 2  # answers end at many phases, not at fixed places
    on_boundary = sum(start % 64 == 0 for start in starts) / len(starts)
    assert (0.25 <= on_boundary <= 0.6) if boundary else on_boundary < 0.1


def answers_and_key_copies(tokenizer, block: dict) -> list[tuple[int, list[int]]]:
    """Each planted answer's first position and where the two key copies of its needle start."""
    ids, mask = block["input_ids"], block["answer_mask"]
    found = []
    for start in (i for i in range(len(ids)) if mask[i] and not mask[i - 1]):
        key_ids = tokenizer(" " + tokenizer.decode(ids[start : start + 6]).split()[0], add_special_tokens=False)
        key_ids = key_ids["input_ids"]
        copies = [i for i in range(start - 1) if ids[i : i + len(key_ids)] == key_ids][-2:]
        assert len(copies) == 2
        found.append((start, copies))
    return found


@pytest.mark.parametrize(("hop", "both_copies"), [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)])
def test_hop_and_both_copies_episodes_put_the_needle_where_the_answer_reads_none_or_both(
    tokenizer, haystack, hop, both_copies
):
    """One branch of rate 2 over the whole block: a position reads the copies at its own parity. With
    ``hop=1`` every episode whose two copies share a parity puts them at the other one than the positions
    predicting the key, with ``both_copies=1`` at the same one (by chance: half each way); an episode whose
    copies differ reads one either way."""
    from types import SimpleNamespace

    config = SimpleNamespace(segment_lengths=[2048], dilation_rates=[2], num_attention_heads=2)
    length = 1200
    blocks = haystack_blocks(haystack, 24, length)
    planted = plant_passkeys(
        blocks, tokenizer, share=1.0, seed=7, episodes=8, hop=hop, config=config, both_copies=both_copies
    )
    for bad, message in (
        (dict(hop=1.5, config=config), "hop must be between 0 and 1"),
        (dict(both_copies=-0.5, config=config), "both_copies must be between 0 and 1, got -0.5"),
        (dict(hop=0.5, both_copies=0.75, config=config), "together at most 1, got 1.25"),
        (dict(hop=0.5), "hop needs the config"),
        (dict(both_copies=0.5), "both_copies needs the config"),
    ):
        with pytest.raises(ValueError, match=message):
            plant_passkeys(blocks, tokenizer, share=1.0, seed=7, **bad)
    if not hop and not both_copies:  # off, planting is what it was without the options
        assert planted[:] == plant_passkeys(blocks, tokenizer, share=1.0, seed=7, episodes=8)[:]
    unread, read = 0, 0
    for block in planted:
        for start, copies in answers_and_key_copies(tokenizer, block):
            at_parity = [(start - 1 - copy) % 2 == 0 for copy in copies]  # key token j: from start-1+j, at copy+j
            if at_parity[0] != at_parity[1]:
                continue
            if at_parity[0]:
                read += 1
            else:
                unread += 1
    assert unread + read > 20  # (whether the copies can differ in parity depends on how the key tokenizes)
    if hop:
        assert read == 0
    elif both_copies:
        assert unread == 0
    else:
        assert 0.25 <= read / (read + unread) <= 0.75


def test_both_copies_episodes_leave_keys_no_dilated_branch_reads_twice_where_they_were(tokenizer, haystack):
    """The test tokenizer's key copies lie 18 tokens apart, at different residues of an r = 4 branch: no place lets
    it read both, and ``both_copies`` must not move such needles into the answer's segment of the local branch
    (w = 128), which reads every copy there (counting that branch moved 35 % of them there, against 15 % without)."""
    from types import SimpleNamespace

    config = SimpleNamespace(segment_lengths=[128, 2048], dilation_rates=[1, 4], num_attention_heads=4)
    blocks = haystack_blocks(haystack, 24, 1200)
    local_share = []
    for both_copies in (0.0, 1.0):
        planted = plant_passkeys(blocks, tokenizer, 1.0, 7, 8, config=config, both_copies=both_copies)
        local = [
            copies[0] // 128 == (start - 1) // 128
            for block in planted
            for start, copies in answers_and_key_copies(tokenizer, block)
        ]
        local_share.append(sum(local) / len(local))
    assert local_share[1] < local_share[0] + 0.1


@pytest.mark.parametrize(("far", "window"), [(0.0, 0.25), (1.0, 0.25), (1.0, 0.0625)])
def test_far_episodes_put_the_needle_in_the_first_window_and_the_answer_in_the_last(tokenizer, haystack, far, window):
    """With ``far=1`` every episode's needle starts in its slot's first quarter (``far_window``) and its answer
    ends in the slot's last (by chance, with ``far=0``: 48 and 30 of 66 episodes in the quarters, as a needle with
    its question and answer fills up to a third of a 300-token slot); off, planting is what it was without the
    option."""
    length = 1200
    blocks = haystack_blocks(haystack, 24, length)
    planted = plant_passkeys(blocks, tokenizer, share=1.0, seed=9, episodes=4, boundary=64, far=far, far_window=window)
    with pytest.raises(ValueError, match="far must be between 0 and 1, got -0.5"):
        plant_passkeys(blocks, tokenizer, share=1.0, seed=9, far=-0.5)
    with pytest.raises(ValueError, match="far_window must be above 0 and at most 0.5 .*, got 0.75"):
        plant_passkeys(blocks, tokenizer, share=1.0, seed=9, far=1.0, far_window=0.75)
    if not far:
        assert planted[:] == plant_passkeys(blocks, tokenizer, share=1.0, seed=9, episodes=4, boundary=64)[:]
    needle_ids = tokenizer(NEEDLE[: NEEDLE.index("{key}")], add_special_tokens=False)["input_ids"]
    first_window, last_window, episodes = 0, 0, 0
    for block in planted:
        ids, mask = block["input_ids"], block["answer_mask"]
        ends = [i + 1 for i in range(length) if mask[i] and (i + 1 == length or not mask[i + 1])]
        needles = [i for i in range(length) if ids[i : i + len(needle_ids)] == needle_ids]
        slots = [(length * i // len(ends), length * (i + 1) // len(ends)) for i in range(len(ends))]
        for end, (start, stop) in zip(ends, slots, strict=True):
            needle = min(at for at in needles if start <= at < end)  # (the needle says it twice)
            first_window += needle - start <= window * (stop - start)
            last_window += end - start > (1 - window) * (stop - start) - 1
            episodes += 1
    assert episodes > 40
    if far:
        assert first_window == last_window == episodes
    else:
        assert first_window < 0.8 * episodes and last_window < 0.6 * episodes


def planted_needles(planted, tokenizer):
    """``(ids, at, key)`` for every needle in the planted blocks: the block's tokens, where the needle starts
    (found by the needle's words before the key) and the key it holds (read back from the decoded text)."""
    prefix = tokenizer(NEEDLE[: NEEDLE.index("{key}")], add_special_tokens=False)["input_ids"]
    for block in planted:
        ids = block["input_ids"]
        for at in (i for i in range(len(ids)) if ids[i : i + len(prefix)] == prefix):
            key = re.match(r"\s*# The pass key is (\d{5})\.", tokenizer.decode(ids[at : at + 80])).group(1)
            yield ids, at, key


@pytest.mark.parametrize("cut", [0.0, 1.0])
def test_cut_episodes_put_a_multiple_of_the_boundary_inside_the_needle(tokenizer, haystack, cut):
    """With ``cut=1`` a multiple of ``boundary`` falls between two tokens of every needle, at many places in it;
    at random (``cut=0``) in about (needle tokens - 1) / boundary of them (the test tokenizer's needle is ~50
    tokens long). Off, planting is what it was without the option."""
    length, boundary = 1200, 128
    blocks = haystack_blocks(haystack, 40, length)
    planted = plant_passkeys(blocks, tokenizer, share=1.0, seed=11, episodes=2, boundary=boundary, cut=cut)
    with pytest.raises(ValueError, match="cut must be between 0 and 1, got 1.5"):
        plant_passkeys(blocks, tokenizer, share=1.0, seed=11, boundary=boundary, cut=1.5)
    with pytest.raises(ValueError, match="cut needs a boundary"):
        plant_passkeys(blocks, tokenizer, share=1.0, seed=11, cut=0.5)
    if not cut:
        assert planted[:] == plant_passkeys(blocks, tokenizer, share=1.0, seed=11, episodes=2, boundary=boundary)[:]
    before, chance = [], []  # each needle's tokens before the first multiple of boundary inside it (0: none)
    for ids, at, key in planted_needles(planted, tokenizer):
        needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
        assert ids[at : at + len(needle)] == needle
        before.append(-at % boundary if -at % boundary < len(needle) else 0)
        chance.append((len(needle) - 1) / boundary)
    assert len(before) > 40
    if cut:
        assert 0 not in before and len(set(before)) > 10
    else:
        assert abs(sum(map(bool, before)) / len(before) - sum(chance) / len(chance)) < 0.15


@pytest.mark.parametrize("between", [0.0, 1.0])
def test_cut_between_copies_leaves_each_key_copy_whole_on_its_side_of_the_cut(tokenizer, haystack, between):
    """With ``cut_between_copies=1`` the multiple of ``boundary`` inside every needle falls after the first key
    copy's last token and at or before the second copy's first (found here by the key's tokens in the block);
    with 0 a cut lands in any gap of the needle, so most cuts fall elsewhere. Bad shares are errors."""
    length, boundary = 1200, 128
    blocks = haystack_blocks(haystack, 40, length)
    planted = plant_passkeys(
        blocks, tokenizer, share=1.0, seed=12, episodes=2, boundary=boundary, cut=1.0, cut_between_copies=between
    )
    with pytest.raises(ValueError, match="cut_between_copies must be between 0 and 1, got -0.5"):
        plant_passkeys(blocks, tokenizer, share=1.0, seed=12, boundary=boundary, cut=1.0, cut_between_copies=-0.5)
    with pytest.raises(ValueError, match="cut_between_copies needs cut above 0"):
        plant_passkeys(blocks, tokenizer, share=1.0, seed=12, boundary=boundary, cut_between_copies=0.5)
    apart = []  # per needle: whether the cut leaves one whole key copy on each side
    for ids, at, key in planted_needles(planted, tokenizer):
        size = len(tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"])
        key_ids = tokenizer(" " + key, add_special_tokens=False)["input_ids"]
        starts = [i for i in range(at, at + size) if ids[i : i + len(key_ids)] == key_ids]
        assert len(starts) == 2
        cut = at + (-at % boundary)  # the first multiple of boundary at or after the needle's start
        assert at < cut < at + size
        apart.append(starts[0] + len(key_ids) <= cut <= starts[1])
    assert len(apart) > 40
    if between:
        assert all(apart)
    else:
        assert 0 < sum(apart) < 0.6 * len(apart)


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
