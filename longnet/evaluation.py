"""Perplexity by context length (the measurement of the paper's Table 2), as a table and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm


def check_context_lengths(lengths: list[int], flag: str) -> None:
    """A window predicts its tokens 2..L: below 2 there is nothing to score (the perplexity would divide by zero)."""
    too_short = [length for length in lengths if length < 2]
    if too_short:
        raise ValueError(f"{flag} must be at least 2 tokens each, got {' '.join(map(str, too_short))}")


def evaluation_documents(
    token_lists: list[list[int]], lengths: list[int], max_documents: int
) -> tuple[list[list[int]], list[int], str]:
    """Picks documents long enough for the longest usable context and cuts them to that length.

    Every length is then scored on exactly these documents, so the numbers compare. Lengths longer
    than every document are left out and said so in the returned note ("" when none is), for the
    output and the report: a length must not vanish from a table without a word.
    """
    longest = max((len(tokens) for tokens in token_lists), default=0)
    usable = sorted(length for length in set(lengths) if length <= longest)
    if not usable:
        raise ValueError(f"no document has {min(lengths)} tokens (the longest has {longest})")
    span = usable[-1]
    documents = [tokens[:span] for tokens in token_lists if len(tokens) >= span][:max_documents]
    skipped = sorted(set(lengths) - set(usable))
    note = (
        f"Context length{'s' if len(skipped) > 1 else ''} {', '.join(map(str, skipped))} skipped: longer than every "
        f"document (the longest has {longest} tokens)."
        if skipped
        else ""
    )
    return documents, usable, note


@torch.no_grad()
def perplexity_by_context(
    model, documents: list[list[int]], lengths: list[int], batch_size: int = 1, description: str = ""
) -> dict[int, float]:
    """Perplexity when each document is read in independent windows of each context length.

    Window ``[i, i + L)`` predicts its tokens 2..L from what precedes them inside the window, so a
    token's context is at most ``L``. Returns ``{L: perplexity}``.
    """
    model.eval()
    device = next(model.parameters()).device
    results = {}
    windows_total = sum(len(documents) * (len(documents[0]) // length) for length in lengths)
    with tqdm(total=windows_total, desc=f"perplexity {description}".strip(), unit="window") as progress:
        for length in lengths:
            windows = [doc[i : i + length] for doc in documents for i in range(0, len(doc) - length + 1, length)]
            nll, count = 0.0, 0
            for start in range(0, len(windows), batch_size):
                ids = torch.tensor(windows[start : start + batch_size], device=device)
                logits = model(input_ids=ids, use_cache=False).logits.float()
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
                )
                nll += losses.item()
                count += ids[:, 1:].numel()
                progress.update(ids.shape[0])
            results[length] = math.exp(nll / count)
    return results


def report_files(out: Path) -> dict[str, Path]:
    """The ``json``, ``md`` and ``png`` files of a report written to the prefix ``out``: a dot in it is part of
    the name (``run.v2`` gives ``run.v2.md``), a suffix .json, .md or .png names their common stem."""
    prefix = out.with_suffix("") if out.suffix in (".json", ".md", ".png") else out
    return {kind: prefix.with_name(f"{prefix.name}.{kind}") for kind in ("json", "md", "png")}


def write_report(results: dict[str, dict[int, float]], out: Path, title: str, notes: str = "") -> list[Path]:
    """``{model name: {length: perplexity}}`` -> the report files of ``out`` (``report_files``): JSON, a
    Markdown table and a plot; returns them."""
    files = report_files(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lengths = sorted({length for by_length in results.values() for length in by_length})
    files["json"].write_text(
        json.dumps({name: {str(k): v for k, v in by_length.items()} for name, by_length in results.items()}, indent=1)
    )
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| context | " + " | ".join(results) + " |", "|---:|" + "---:|" * len(results)]
    for length in lengths:
        cells = [f"{results[name][length]:.2f}" if length in results[name] else "" for name in results]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    files["md"].write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_length in results.items():
        points = sorted(by_length.items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(files["png"], dpi=110)
    plt.close(fig)
    return list(files.values())
