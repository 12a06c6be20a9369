"""Needle retrieval ("passkey"): a random 5-digit key planted in held-out text, asked for at the end.

For each context length L and depth d, a prompt of exactly L tokens is a window of haystack text with
the needle sentence inserted at fraction d of it and the question last; the model answers greedily and
is right when the first 5-digit number it writes is the key. Accuracy per (length, depth) cell, over
several keys; a heatmap per model and a table by length, depth and distance (needle to question).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

NEEDLE = "\n# The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n# What is the pass key? The pass key is"
KEY_DIGITS = 5
PLACES = ("same local segment", "earlier segment")  # where a needle lies, seen from the question


@dataclass
class Prompt:
    """One retrieval prompt: ``ids`` (exactly the context length), the key, and where the needle starts."""

    ids: list[int]
    key: str
    needle_start: int


def needle_and_question_tokens(tokenizer) -> int:
    """The tokens a prompt spends on the needle (with a 5-digit key) and the question."""
    needle = tokenizer(NEEDLE.format(key="9" * KEY_DIGITS), add_special_tokens=False)["input_ids"]
    return len(needle) + len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])


def planting_tokens(tokenizer) -> int:
    """The most tokens ``plant_passkeys`` writes into a block: the needle, the question and the answer."""
    return needle_and_question_tokens(tokenizer) + KEY_DIGITS + 2  # the answer: up to a token a digit, " ", "\n"


def check_grid(lengths: list[int], depths: list[float], keys_per_cell: int, shortest: int) -> None:
    """Raises a ValueError naming the flag of the first bad value; ``shortest`` is the needle plus question."""
    if not lengths or not depths:
        raise ValueError("--lengths and --depths need at least one value each")
    too_short = [length for length in lengths if length < shortest + 1]
    if too_short:
        raise ValueError(
            f"--lengths must leave room for haystack text beside the needle and question ({shortest} tokens), "
            f"got {' '.join(map(str, too_short))}"
        )
    outside = [depth for depth in depths if not 0 <= depth <= 100]
    if outside:
        raise ValueError(f"--depths are percentages from 0 to 100, got {' '.join(map(str, outside))}")
    if keys_per_cell < 1:
        raise ValueError(f"--keys_per_cell must be at least 1, got {keys_per_cell}")


def answer_reach(config, lengths: list[int]) -> str:
    """For a LongNet ``config``: which branches connect the answer to the prompt at each length, as report text.

    Why: segments are fixed, so a token generated at position L (right after an L-token prompt) starts a
    new segment in every branch whose segment length divides L. The key's first token is predicted from
    the prompt's last position and can see the prompt; the tokens after it reach the prompt only through
    branches with L % w != 0, one residue class of it per head. With no such branch they see nothing of the
    prompt, and a key of several tokens cannot be answered. Empty for models without dilated branches."""
    segments = getattr(config, "segment_lengths", None)
    if not segments:
        return ""
    branches = list(zip(segments, config.dilation_rates, strict=True))
    lines = []
    for length in lengths:
        reach = [f"w = {w} (r = {r})" for w, r in branches if length % w]
        lines.append(
            f"at {length}: " + (", ".join(reach) if reach else "none: tokens after the first see nothing of the prompt")
        )
    return (
        "Answer tokens after the first are generated from position L on, a new segment in every branch whose "
        "segment length w divides L; branches that still reach the prompt: " + "; ".join(lines) + "."
    )


def random_needle(tokenizer, rng: random.Random) -> tuple[str, list[int]]:
    """A random 5-digit key and the tokens of its needle sentence."""
    key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))
    return key, tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]


def make_prompt(tokenizer, haystack: list[int], length: int, depth: float, rng: random.Random) -> Prompt:
    """A prompt of ``length`` tokens: a random window of ``haystack`` with the needle at ``depth`` percent of
    it (0: right after the start, 100: right before the question)."""
    key, needle = random_needle(tokenizer, rng)
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    room = length - len(needle) - len(question)
    if room < 1 or len(haystack) < room:
        raise ValueError(f"a {length}-token prompt needs {room} haystack tokens, the haystack has {len(haystack)}")
    start = rng.randrange(0, len(haystack) - room + 1)
    window = haystack[start : start + room]
    at = round(room * depth / 100)
    return Prompt(window[:at] + needle + window[at:] + question, key, at)


def key_copies(needle: list[int], key_ids: list[int]) -> list[int]:
    """Where the key's tokens (``key_ids``, as an answer tokenizes it) start in the needle's tokens: ``NEEDLE``
    holds the key twice, though a tokenizer may merge a copy with its neighbours."""
    return [i for i in range(len(needle) - len(key_ids) + 1) if needle[i : i + len(key_ids)] == key_ids]


FAR_WINDOW = 0.25  # the part of a slot at each end where far episodes put their needle and end, unless told
PLACE_TRIES = 16  # random needle places a --passkey_hop or --passkey_both_copies episode tries before it keeps one


def plant_passkeys(
    blocks,
    tokenizer,
    share: float,
    seed: int,
    episodes: int = 1,
    boundary: int = 0,
    hop: float = 0.0,
    config=None,
    far: float = 0.0,
    far_window: float = FAR_WINDOW,
    both_copies: float = 0.0,
    cut: float = 0.0,
    cut_between_copies: float = 0.0,
):
    """Training blocks (``input_ids``, ``labels``, ``position_ids``) of which about ``share`` carry pass keys.

    A planted block is cut into n equal slots, n drawn uniformly from 1, 2, 4, ... up to ``episodes``
    (only as many as leave room for haystack text), so the needle-to-question distances the block trains
    cover every scale up to its length. Each slot holds one episode, from its start to anywhere in its
    second half: a random key's needle at a uniformly random position, then the question and its answer
    (the latest needle's key). A planted block becomes one sequence (positions 0..L-1), so nothing keeps
    the needle from the question. Every block gains ``answer_mask``: 1 on the answer tokens, else 0 (for
    ``AnswerWeightedTrainer``). The same ``seed`` plants the same keys in the same places.

    With ``boundary`` > 0, half the episodes whose slot allows it end so that their answer starts at a
    multiple of ``boundary``: for a LongNet whose shortest segment is ``boundary`` long, the answer then
    opens a new segment, as after a prompt of a multiple of w tokens, and its tokens after the first reach
    the prompt only through the sparse branches (``answer_reach``).

    With ``hop`` > 0 and the LongNet ``config`` being trained, that share of the episodes puts its needle
    where no position that predicts a key token of the answer reads a copy of that token in one attention
    step (``sees_directly``; the first of up to ``PLACE_TRIES`` random places, else the last): the model must
    move the key to its own residue in an earlier layer, a hop that needles at random places ask for too
    rarely to be learned (docs/results/passkey.md). ``both_copies`` is the share of episodes that put it, likewise,
    where every such position reads all the key's copies (two, unless a tokenizer merged one) through a dilated
    branch (r > 1), the direct read that positions of one parity learn worst. Only dilated branches count: the
    local one (r = 1) reads every copy of a needle in the answer's own segment, and searching for such places
    would move needles nearer. A key whose copies lie at different residues (in an r = 2 branch, an odd number
    of tokens apart, as a 4-token key's) cannot be placed so and keeps the last place tried.

    With ``far`` > 0, that share of the episodes puts its needle in its slot's first quarter and ends in the
    slot's last quarter: the needle lies half to all of the slot back, distances that uniform places give
    rarely (with one episode per block, about 6 % of needles lie over 3/4 of the block back; of far episodes, half).
    ``far_window`` is that part of the slot at each end (a quarter by default): 1/16 puts far needles 7/8 to all
    of the slot back, where a question at the end of a prompt as long as the block finds a needle at its start.

    With ``cut`` > 0 (and a ``boundary``), that share of the episodes puts its needle across a multiple of
    ``boundary`` (in any gap between two of its tokens): the shortest segment then splits the needle, which a
    LongNet's direct read of both key copies fails on until trained on it (its read through a hop does not
    mind). Random places cut a needle in a given gap once in ``boundary`` episodes, while every prompt of
    2^k - 8 tokens cuts it at depth 25 % in the same gap (docs/results/passkey.md). ``cut_between_copies`` is the
    share of cut needles cut in a gap between the key's two copies (the first copy whole before the multiple, the
    second whole after it), the gap that depth 25 % cuts and whose keys stayed the weakest after ``cut`` trained
    every gap alike."""
    shares = (
        ("hop", hop),
        ("far", far),
        ("both_copies", both_copies),
        ("cut", cut),
        ("cut_between_copies", cut_between_copies),
    )
    for name, value in shares:
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    if hop + both_copies > 1:
        raise ValueError(f"hop and both_copies are shares of the episodes: together at most 1, got {hop + both_copies}")
    if cut and boundary <= 0:
        raise ValueError("cut needs a boundary (the shortest segment length, whose multiples cut the needle)")
    if cut_between_copies and not cut:
        raise ValueError("cut_between_copies needs cut above 0 (it is a share of the cut needles)")
    if not 0 < far_window <= 0.5:
        raise ValueError(f"far_window must be above 0 and at most 0.5 (a part of each end of a slot), got {far_window}")
    for name, value in (("hop", hop), ("both_copies", both_copies)):
        if value and not getattr(config, "segment_lengths", None):
            raise ValueError(f"{name} needs the config of the LongNet trained (a dense model reads every copy at once)")
    shortest_episode = planting_tokens(tokenizer) + 1
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]

    def plant_episode(ids: list[int], mask: list[int], start: int, ends: range, rng: random.Random) -> None:
        """Writes one episode into ``ids[start:end]`` (in place), ``end`` drawn from ``ends``, and marks its
        answer in ``mask``; with a ``boundary``, half the time ``end`` is one where the answer starts on one."""
        nearest = ends.stop  # the needle's last place: the slot's end, or its first window's for a far episode
        if far and rng.random() < far:
            slot = ends.stop - 1 - start
            ends = range(max(ends.start, start + int(slot * (1 - far_window))), ends.stop)
            nearest = start + int(slot * far_window)
        end = ends[-1] - rng.randrange(len(ends))
        key, needle = random_needle(tokenizer, rng)
        reply = tokenizer(" " + key + "\n", add_special_tokens=False)["input_ids"]
        if boundary and rng.random() < 0.5:
            first = -(-(ends.start - len(reply)) // boundary) * boundary
            answer_starts = range(first, ends.stop - len(reply), boundary)
            if answer_starts:
                end = rng.choice(answer_starts) + len(reply)
        last = min(end - len(needle) - len(question) - len(reply), nearest)
        places = range(start, last + 1)
        key_ids = tokenizer(" " + key, add_special_tokens=False)["input_ids"]
        copies = key_copies(needle, key_ids)
        if cut and rng.random() < cut:
            gaps = range(1, len(needle))  # a multiple of boundary at at + gap cuts the needle before token gap
            if cut_between_copies and len(copies) > 1 and rng.random() < cut_between_copies:
                gaps = range(copies[0] + len(key_ids), copies[-1] + 1)
            places = [at for at in places if -at % boundary in gaps] or places
        at = rng.choice(places)
        if (hop or both_copies) and (draw := rng.random()) < hop + both_copies:
            answer_start = end - len(reply)
            wanted = 0 if draw < hop else len(copies)  # the copies every key token's position is to read

            def reads_wanted(at: int) -> bool:
                places = [at + copy for copy in copies]
                seen = copies_seen(config, answer_start - 1, places, len(key_ids), dilated_only=wanted > 0)
                return all(count == wanted for count in seen)

            for _ in range(PLACE_TRIES - 1):
                if reads_wanted(at):
                    break
                at = rng.choice(places)
        ids[at : at + len(needle)] = needle
        ids[end - len(question) - len(reply) : end] = question + reply
        mask[end - len(reply) : end] = [1] * len(reply)

    def plant(block, index):
        rng = random.Random(f"{seed}-{index}")
        length = len(block["input_ids"])
        if rng.random() >= share:
            return {**block, "answer_mask": [0] * length}
        counts = [n for n in (1 << i for i in range(episodes.bit_length())) if length // n >= shortest_episode]
        count = rng.choice(counts)
        ids, mask = list(block["input_ids"]), [0] * length
        bounds = [length * i // count for i in range(count + 1)]
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            # the episode ends anywhere in the second half of its slot, the rest stays plain text: so the
            # question does not sit at a fixed phase of LongNet's fixed segments (which tell a model its
            # position modulo w), and a model cannot learn where answers are instead of reading them
            slack = end - start - max(shortest_episode, (end - start + 1) // 2)
            plant_episode(ids, mask, start, range(end - slack, end + 1), rng)
        return {"input_ids": ids, "labels": [-100, *ids[1:]], "position_ids": list(range(length)), "answer_mask": mask}

    description = f"Planting pass keys in {share:.0%} of the blocks"
    if episodes > 1:
        description += f" (1 to {episodes} per block)"
    if far:
        description += f", {far:.0%} of the needles far"
        if far_window != FAR_WINDOW:
            description += f" (in their slot's first {far_window:g}, answered in its last)"
    if cut:
        description += f", {cut:.0%} cut by a multiple of {boundary}"
        if cut_between_copies:
            description += f" ({cut_between_copies:.0%} of them between the key's copies)"
    return blocks.map(plant, with_indices=True, desc=description)


def answer(text: str) -> str | None:
    """The first number in the model's answer if it has the key's 5 digits, else None (123456 is no answer
    to 12345)."""
    found = re.search(r"\d+", text)
    return found.group(0) if found and len(found.group(0)) == KEY_DIGITS else None


def key_in_prompt(tokenizer, prompt: Prompt) -> tuple[list[int], list[int]]:
    """The key's tokens as an answer tokenizes them, and the prompt positions where the needle holds them."""
    key_ids = tokenizer(" " + prompt.key, add_special_tokens=False)["input_ids"]
    needle = tokenizer(NEEDLE.format(key=prompt.key), add_special_tokens=False)["input_ids"]
    return key_ids, [prompt.needle_start + i for i in key_copies(needle, key_ids)]


def copies_read(config, tokenizer, prompt: Prompt) -> int | None:
    """How many of the needle's two key copies the answer reads in one attention step, the fewest over the
    key's tokens (each predicted from the position before it, ``sees_directly``); None when the needle does
    not hold the key's tokens as an answer tokenizes them. Why: in an r = 2 branch a 3-token key's copies
    (8 tokens apart) share a residue, so a prompt reads both or neither; a 4-token key's (9 apart) one."""
    key_ids, copies = key_in_prompt(tokenizer, prompt)
    if not copies:
        return None
    return min(copies_seen(config, len(prompt.ids) - 1, copies, len(key_ids)))


@torch.no_grad()
def passkey_accuracy(
    model,
    tokenizer,
    haystack: list[int],
    lengths: list[int],
    depths: list[float],
    keys_per_cell: int,
    batch_size: int = 1,
    seed: int = 0,
    description: str = "",
) -> tuple[dict[int, dict[float, float]], dict[int, tuple[int, int]]]:
    """``({length: {depth: accuracy}}, {copies read: (right, prompts)})``: greedy exact match of the key over
    ``keys_per_cell`` prompts a cell, and over all cells by ``copies_read`` (empty for a model without a
    config, e.g. a stand-in).

    The prompts depend only on the tokenizer, the haystack and ``seed``, so models that share a tokenizer
    are asked the same questions. Why the second count: a LongNet cell mixes prompts whose answer reads the
    key directly with prompts where it must be moved across residues first, in proportions set by where the
    depth puts the needle, so a cell's accuracy can say more about that mix than about the distance."""
    model.eval()
    device = next(model.parameters()).device
    config = getattr(model, "config", None)
    answer_tokens = len(tokenizer(" " + "9" * KEY_DIGITS, add_special_tokens=False)["input_ids"]) + 2
    results: dict[int, dict[float, float]] = {}
    by_copies: dict[int, list[int]] = {}
    cells = [(length, depth) for length in lengths for depth in depths]
    with tqdm(total=len(cells) * keys_per_cell, desc=f"passkey {description}".strip(), unit="key") as progress:
        for length, depth in cells:
            rng = random.Random(f"{seed}-{length}-{depth}")
            prompts = [make_prompt(tokenizer, haystack, length, depth, rng) for _ in range(keys_per_cell)]
            right = 0
            for first in range(0, len(prompts), batch_size):
                batch = prompts[first : first + batch_size]
                ids = torch.tensor([p.ids for p in batch], device=device)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=answer_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                )
                texts = tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
                for text, prompt in zip(texts, batch, strict=True):
                    correct = answer(text) == prompt.key
                    right += correct
                    if config is not None and (seen := copies_read(config, tokenizer, prompt)) is not None:
                        tally = by_copies.setdefault(seen, [0, 0])
                        tally[0] += correct
                        tally[1] += 1
                progress.update(len(batch))
            results.setdefault(length, {})[depth] = right / keys_per_cell
    return results, {seen: (right, total) for seen, (right, total) in sorted(by_copies.items())}


@torch.no_grad()
def retrieval_by_branch(
    model, tokenizer, haystack: list[int], length: int, prompts: int, seed: int = 0
) -> dict[str, dict[str, tuple[int, int]]]:
    """Which branches of a LongNet carry retrieval: ``{branches kept: {where: (right, prompts)}}``.

    Teacher-forced accuracy of the key's first token, predicted from the prompt's last position (which
    every branch serves), with every branch, with each one left out and with the first (local) branch
    alone; ``where`` says whether the needle lies in the question's segment of the first branch
    ("same local segment": visible locally) or before it ("earlier segment": visible only through the
    other branches). Why: greedy exact match is 0 for a model that gets no key whole, and then cannot
    show which branches see the needle. Branches are left out by editing the config in place, as the
    attention reads it at every call; the config is restored after."""
    config = model.config
    branches = list(zip(config.segment_lengths, config.dilation_rates, strict=True))
    kept = [tuple(range(len(branches)))]
    kept += [tuple(i for i in range(len(branches)) if i != left) for left in range(len(branches))]
    kept = list(dict.fromkeys(k for k in [*kept, (0,)] if k))  # every branch, each left out, the first alone
    rng = random.Random(f"{seed}-{length}-branches")
    asked = [make_prompt(tokenizer, haystack, length, rng.uniform(0, 100), rng) for _ in range(prompts)]
    first_tokens = [tokenizer(" " + p.key, add_special_tokens=False)["input_ids"][0] for p in asked]
    local = branches[0][0]
    places = [PLACES[p.needle_start // local < (length - 1) // local] for p in asked]
    model.eval()
    device = next(model.parameters()).device
    results = {}
    try:
        for keep in tqdm(kept, desc="branches", unit="variant"):
            config.segment_lengths = [branches[i][0] for i in keep]
            config.dilation_rates = [branches[i][1] for i in keep]
            counts = {place: [0, 0] for place in PLACES if place in places}
            for p, token, place in zip(asked, first_tokens, places, strict=True):
                logits = model(torch.tensor([p.ids], device=device), use_cache=False, logits_to_keep=1).logits[0, -1]
                counts[place][0] += int(logits.argmax().item() == token)
                counts[place][1] += 1
            label = ", ".join(f"w = {w} (r = {r})" for w, r in (branches[i] for i in keep))
            results[label] = {place: (right, total) for place, (right, total) in counts.items()}
    finally:
        config.segment_lengths, config.dilation_rates = [w for w, _ in branches], [r for _, r in branches]
    return results


def sees_directly(config, query: int, key: int, dilated_only: bool = False) -> bool:
    """Whether one attention layer of a model with ``config`` lets position ``query`` read position ``key``.

    Always (``key <= query``) for a dense model; in a LongNet only when some branch ``(w, r)`` (with
    ``dilated_only``, of r > 1) keeps both in one row set of one head: the same segment, the same residue
    ``(t mod w) mod r``, and a head ``h`` with ``h mod r`` equal to it (none when ``r`` exceeds the heads and
    the residue does too)."""
    if key > query:
        return False
    segments = getattr(config, "segment_lengths", None)
    if not segments:
        return True
    return any(
        query // w == key // w and (query % w) % r == (key % w) % r < config.num_attention_heads
        for w, r in zip(segments, config.dilation_rates, strict=True)
        if r > 1 or not dilated_only
    )


def copies_seen(config, first_query: int, copies: list[int], tokens: int, dilated_only: bool = False) -> list[int]:
    """For each of a key's ``tokens`` tokens j: how many of its copies (their first positions, ``copies``) the
    position predicting it, ``first_query + j``, reads in one attention step (``sees_directly``)."""
    return [
        sum(sees_directly(config, first_query + j, copy + j, dilated_only) for copy in copies) for j in range(tokens)
    ]


TOKEN_ROWS = ("first token", "later tokens", "later tokens, from even positions", "later tokens, from odd positions")


@torch.no_grad()
def retrieval_by_token(
    model, tokenizer, haystack: list[int], length: int, prompts: int, seed: int = 0
) -> tuple[dict[str, dict[int, tuple[int, int]]], int]:
    """Which tokens of the key a model gets, and whether it needs to see them: ``({row: {copies: (right,
    total)}}, prompts skipped)``.

    Teacher-forced accuracy of every token of the key (``row``: the first, predicted from the question's
    end, or a later one, predicted from the token before it), by how many of the needle's two copies of
    that token (``NEEDLE`` holds the key twice) the predicting position can read in one attention step
    (``sees_directly``). Why: a dilated branch joins only positions of one residue, so a copy at another
    residue must first be moved to a visible position by an earlier layer; a model that has not learned
    that gets the tokens it sees and misses the others. A dense model sees every copy. The later tokens are
    also counted by the predicting position's parity: the residues of an r = 2 branch are served by disjoint
    heads, which learn that move each on their own. A prompt whose needle does not hold the key's tokens as
    the answer tokenizes them is skipped (and counted)."""
    rng = random.Random(f"{seed}-{length}-tokens")
    asked = [make_prompt(tokenizer, haystack, length, rng.uniform(0, 100), rng) for _ in range(prompts)]
    model.eval()
    device = next(model.parameters()).device
    counts = {row: {} for row in TOKEN_ROWS}
    skipped = 0
    for prompt in tqdm(asked, desc=f"answer tokens at {length}", unit="prompt"):
        key_ids, copies = key_in_prompt(tokenizer, prompt)
        if not copies:
            skipped += 1
            continue
        ids = torch.tensor([prompt.ids + key_ids], device=device)
        # Position length - 1 + j predicts key token j.
        predicted = model(ids, use_cache=False, logits_to_keep=len(key_ids) + 1).logits[0, :-1].argmax(-1)
        seen_by_token = copies_seen(model.config, length - 1, copies, len(key_ids))
        for j, (token, seen) in enumerate(zip(key_ids, seen_by_token, strict=True)):
            rows = [TOKEN_ROWS[0]] if j == 0 else [TOKEN_ROWS[1], TOKEN_ROWS[2 + (length - 1 + j) % 2]]
            for row in rows:
                cell = counts[row].setdefault(seen, [0, 0])
                cell[0] += int(predicted[j].item() == token)
                cell[1] += 1
    return {row: {seen: tuple(cell) for seen, cell in sorted(cells.items())} for row, cells in counts.items()}, skipped


def write_passkey_report(
    results: dict[str, dict[int, dict[float, float]]],
    out: Path,
    notes: str = "",
    by_copies: dict[str, dict[int, tuple[int, int]]] | None = None,
) -> None:
    """``{model: {length: {depth: accuracy}}}`` -> ``out/passkey.json``, ``out/passkey.md`` (a table per model,
    one by distance and, given ``by_copies`` (``{model: {copies read: (right, prompts)}}``, from
    ``passkey_accuracy``), one by the key copies read) and ``out/passkey_<model>.png`` (heatmaps)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "passkey.json").write_text(
        json.dumps(
            {
                name: {str(length): {str(d): a for d, a in row.items()} for length, row in cells.items()}
                for name, cells in results.items()
            },
            indent=1,
        )
    )
    lines = ["# Pass key retrieval: greedy exact-match accuracy", ""]
    if notes:
        lines += [notes, ""]
    for name, cells in results.items():
        lengths = sorted(cells)
        depths = sorted({depth for row in cells.values() for depth in row})
        lines += [f"## {name}", "", "| depth \\ context | " + " | ".join(map(str, lengths)) + " |"]
        lines.append("|---:|" + "---:|" * len(lengths))
        for depth in depths:
            lines.append(f"| {depth:g}% | " + " | ".join(f"{cells[length][depth]:.2f}" for length in lengths) + " |")
        lines.append("")
    lines += distance_table(results)
    if by_copies := {name: counts for name, counts in (by_copies or {}).items() if counts}:
        lines += ["", *copies_table(by_copies)]
    (out / "passkey.md").write_text("\n".join(lines) + "\n")
    for name, cells in results.items():
        heatmap(name, cells, out / f"passkey_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png")


def distance_table(results: dict[str, dict[int, dict[float, float]]]) -> list[str]:
    """Accuracy by the needle's distance from the question (tokens, rounded to a power of two), per model."""
    buckets: dict[str, dict[int, list[float]]] = {}
    for name, cells in results.items():
        for length, row in cells.items():
            for depth, accuracy in row.items():
                distance = max(1, round(length * (100 - depth) / 100))
                bucket = 1 << (distance.bit_length() - 1)
                buckets.setdefault(name, {}).setdefault(bucket, []).append(accuracy)
    distances = sorted({bucket for by_bucket in buckets.values() for bucket in by_bucket})
    lines = ["## Accuracy by distance from the question", "", "| distance (tokens, ≥) | " + " | ".join(results) + " |"]
    lines.append("|---:|" + "---:|" * len(results))
    for bucket in distances:
        cells = [
            f"{sum(buckets[name][bucket]) / len(buckets[name][bucket]):.2f}" if bucket in buckets[name] else ""
            for name in results
        ]
        lines.append(f"| {bucket} | " + " | ".join(cells) + " |")
    return lines


def copies_table(by_copies: dict[str, dict[int, tuple[int, int]]]) -> list[str]:
    """Exact match over all cells by how many of the needle's two key copies the answer reads in one step."""
    counts = sorted({seen for tallies in by_copies.values() for seen in tallies})
    lines = [
        "## Exact match by the key copies the answer reads in one step",
        "",
        "All cells together; a dense model reads both copies of every prompt, a LongNet only those at the answer's "
        "residue in some branch (`copies_read`): with none it must first move the key across residues.",
        "",
        "| copies read | " + " | ".join(by_copies) + " |",
        "|---:|" + "---:|" * len(by_copies),
    ]
    for seen in counts:
        cells = []
        for tallies in by_copies.values():
            right, total = tallies.get(seen, (0, 0))
            cells.append(f"{right}/{total} ({right / total:.2f})" if total else "")
        lines.append(f"| {seen} | " + " | ".join(cells) + " |")
    return lines


def heatmap(name: str, cells: dict[int, dict[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(cells)
    depths = sorted({depth for row in cells.values() for depth in row})
    grid = [[cells[length].get(depth, float("nan")) for length in lengths] for depth in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(lengths), 1.2 + 0.35 * len(depths)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{depth:g}%" for depth in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"pass key retrieval: {name}", fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
