"""Hub helpers: fill a model card from a saved folder, check a folder loads on its own, and keep
secrets (access tokens) out of everything the scripts write or print."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

REDACTED = "<redacted>"
# Access tokens recognised by their published prefixes: Hugging Face, GitHub (classic and fine-grained).
# The boundary is ASCII (not \b), so that a token right after a non-ASCII byte of a binary file is found.
TOKEN_PATTERN = re.compile(
    r"(?<![A-Za-z0-9])(?:hf_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"
)
# Names of flags and environment variables that hold secrets: hub_token, HF_TOKEN, WANDB_API_KEY, ...
SECRET_NAME = re.compile(r"(?:^|_)(?:token|secret|password|passwd|api_key|access_key|private_key)(?:$|_)", re.I)
# Files that hold a tokenizer's vocabulary (fast, sentencepiece, BPE, WordPiece): without one it cannot load.
TOKENIZER_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
# Card license of a model trained here; a converted model records its source's in training_info.json.
DEFAULT_LICENSE = {"license": "apache-2.0"}
UNKNOWN_LICENSE = {"license": "other", "license_name": "unknown"}


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds a tokenizer's vocabulary; checked first, because AutoTokenizer's own error
    for a folder without one blames missing packages (sentencepiece, tiktoken)."""
    return any((Path(folder) / name).exists() for name in TOKENIZER_VOCABULARY_FILES)


@contextmanager
def write_folder(destination: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling of ``destination`` to write into, renamed to ``destination`` only when the
    block succeeds and removed when it fails, so a failed or interrupted run never leaves a half-written
    folder. An existing ``destination`` is replaced: the caller checks that it may be. It is moved aside
    until the new folder is in place and deleted only then, so an interruption never loses both."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    replaced = None
    try:
        yield temporary
        if destination.exists():
            replaced = temporary.with_name(temporary.name.replace(".partial-", ".replaced-", 1))
            destination.rename(replaced)
        temporary.rename(destination)
    except BaseException:
        if replaced is not None and not destination.exists():
            replaced.rename(destination)
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced)


def recorded_license(folder: str | Path) -> dict[str, str] | None:
    """The card's license metadata as ``training_info.json`` records it: a converted model's source license
    (None when the source's card named none), apache-2.0 for a model trained here (no record)."""
    info = _read_json(Path(folder) / "training_info.json")
    return info["license"] if "license" in info else dict(DEFAULT_LICENSE)


def remote_code_files() -> list[str]:
    """The package's files a model folder needs to load with ``trust_remote_code=True`` where longnet is
    not installed: the modeling module and every file it imports relatively, found the way
    ``save_pretrained`` finds what to copy (transformers' ``get_relative_import_files``). The one list
    the conversion and upload scripts use."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from . import modeling_longnet

    modeling = Path(modeling_longnet.__file__)
    return sorted({modeling.name, *(Path(path).name for path in get_relative_import_files(str(modeling)))})


def is_secret_name(name: str) -> bool:
    """Whether a flag or environment variable of this name holds a secret: ``hub_token`` does,
    ``tokenizer_name`` does not."""
    return bool(SECRET_NAME.search(name.lstrip("-")))


def redact(text: str) -> str:
    """``text`` with every token-looking string and the value of every secret environment variable replaced.

    Short values (under 8 characters, such as ``HF_HUB_DISABLE_IMPLICIT_TOKEN=1``) are not secrets and
    would match everywhere."""
    secrets = {value for name, value in os.environ.items() if is_secret_name(name) and len(value) >= 8}
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return TOKEN_PATTERN.sub(REDACTED, text)


def redact_command_line(argv: list[str]) -> list[str]:
    """``argv`` fit to record: the value of a secret flag (``--hub_token X``, ``--hub_token=X``) and any
    secret-looking string replaced by ``<redacted>``."""
    redacted, value_follows = [], False
    for arg in argv:
        name, equals, _ = arg.partition("=")
        if value_follows:
            redacted.append(REDACTED)
            value_follows = False
        elif arg.startswith("-") and is_secret_name(name):
            redacted.append(f"{name}={REDACTED}" if equals else arg)
            value_follows = not equals
        else:
            redacted.append(redact(arg))
    return redacted


def render_model_card(
    template: str | Path,
    folder: str | Path,
    repo_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
) -> str:
    """The card for ``folder``: its config, ``all_results.json`` metrics and perplexity table, if present.

    The license is ``license`` if given, else the recorded one (``recorded_license``), else "other/unknown";
    the data (rows and model-index) is what ``training_info.json`` records, word for word: it says how the
    validation documents were chosen (split off, or given), so the card claims no other split.

    Redacted of secrets: a folder written by an older version may have a token in its recorded command."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    results = _read_json(folder / "all_results.json")
    info = _read_json(folder / "training_info.json")
    perplexity = folder / "perplexity_by_context.md"
    datasets = datasets if datasets is not None else info.get("datasets", [])
    training_data = info.get("training_data", "not recorded")
    license_metadata = {"license": license} if license else recorded_license(folder) or UNKNOWN_LICENSE
    metrics = [
        {"type": "perplexity", "value": round(v, 3), "name": f"perplexity at {k} tokens"}
        for k, v in sorted(
            _read_json(folder / "perplexity_by_context.json").get("model", {}).items(),
            key=lambda kv: int(kv[0]),
        )
    ]
    metrics_yaml = ""
    if metrics:
        metrics_yaml = yaml.safe_dump(
            {
                "model-index": [
                    {
                        "name": repo_id or folder.name,
                        "results": [
                            {
                                "task": {"type": "text-generation", "name": "Causal language modelling"},
                                "dataset": {
                                    "type": datasets[0] if datasets else "custom",
                                    "name": training_data,
                                },
                                "metrics": metrics,
                            }
                        ],
                    }
                ]
            },
            sort_keys=False,
        )
    segments = config.get("segment_lengths") or []
    fields = {
        "license_yaml": yaml.safe_dump(license_metadata, sort_keys=False).strip(),
        "datasets_yaml": yaml.safe_dump({"datasets": datasets}, sort_keys=False) if datasets else "",
        "metrics_yaml": metrics_yaml,
        "model_name": repo_id or folder.name,
        "repo_id": repo_id or str(folder),
        "architecture": ", ".join(config.get("architectures", [])),
        "segment_lengths": segments,
        "dilation_rates": config.get("dilation_rates"),
        "max_segment": max(segments) if segments else "n/a",
        "vocab_size": config.get("vocab_size"),
        "parameters": f"{info['parameters']:,}" if "parameters" in info else "see config.json",
        "training_data": training_data,
        "evaluation": perplexity.read_text().split("\n", 2)[-1].strip()
        if perplexity.exists()
        else "No evaluation results were saved with this model.",
        "training": _training_section(results, info),
    }
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads"):
        fields[key] = config.get(key)
    return redact(Path(template).read_text().format(**fields))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _training_section(results: dict, info: dict) -> str:
    if not results and not info:
        return "No training record was saved with this model."
    lines = [f"- {key}: {value}" for key, value in info.get("summary", {}).items()]
    lines += [
        f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}"
        for key, value in sorted(results.items())
    ]
    if "command" in info:
        lines.append(f"\nCommand: `{info['command']}`")
    return "\n".join(lines)


STANDALONE_LOAD = """
import json, sys
class NoLongNet:  # behave as a machine without the package installed
    def find_spec(self, name, path=None, target=None):
        if name == "longnet" or name.startswith("longnet."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoLongNet())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, step = sys.argv[1], "the model does not load"
try:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    step = "the tokenizer does not load"
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    step = "a forward pass fails"
    ids = tokenizer("def main():", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all(), "the logits are not finite"
except Exception as error:
    sys.exit(f"{step}: {type(error).__name__}: {(str(error).strip() or '-').splitlines()[0]}")
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "tokens": ids.shape[1]}))
"""


def check_loads_standalone(folder: str | Path) -> dict:
    """Loads ``folder`` with trust_remote_code=True in a fresh process that cannot import ``longnet``.

    Raises RuntimeError with the failing step and its error in one line; returns what it loaded.
    """
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE_LOAD, str(Path(folder).resolve())],
        capture_output=True,
        text=True,
        cwd=Path(folder).resolve().parent,
        env={**env, "HF_HUB_OFFLINE": "1"},
    )
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise RuntimeError(f"{folder} does not work where the longnet package is not installed: {reason}")
    return json.loads(result.stdout.strip().splitlines()[-1])
