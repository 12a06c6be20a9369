"""Check a LongNet model folder, fill its model card, and upload it to the Hugging Face Hub.

    python scripts/push_to_hub.py outputs/longnet-stdlib your-name/longnet-stdlib --private
    python scripts/push_to_hub.py outputs/longnet-stdlib your-name/longnet-stdlib --dry-run --staging_dir stage/

Before anything is uploaded the folder must load with trust_remote_code=True in a fresh process that
cannot import this package, its tokenizer must load, and the card must parse with the metadata the
Hub needs. The token comes only from the usual places (HF_TOKEN, `hf auth login`) and is never
printed or written; a staged file that holds a secret-looking string (a token in a recorded command
line, say) is redacted when it is text and refused otherwise. The card's license is --license, else the
one recorded with the model (a converted model's source license). The staging folder appears only
once complete and is marked, so a rerun replaces it; a folder the script did not stage is never removed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.utils import HFValidationError, validate_repo_id

from longnet.hub import (
    TOKENIZER_VOCABULARY_FILES,
    check_loads_standalone,
    has_tokenizer,
    recorded_license,
    redact,
    remote_code_files,
    render_model_card,
    write_folder,
)
from longnet.training import fail

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "model_cards" / "longnet.md"
REQUIRED = ["config.json", *remote_code_files()]
# Training leftovers that do not belong in a model repository.
SKIPPED = {"training_args.bin"}
REQUIRED_METADATA = {"library_name": "transformers", "pipeline_tag": "text-generation"}
# Written into every staging folder, never uploaded: a folder that holds it was staged here and may be replaced.
STAGING_MARKER = ".staged-by-push_to_hub"


def check_folder(folder: Path) -> None:
    """Refuses a folder that lacks a file the upload needs, naming it."""
    missing = [name for name in REQUIRED if not (folder / name).exists()]
    if not list(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        fail(f"{folder} is missing {', '.join(missing)}")
    if not has_tokenizer(folder):
        fail(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_VOCABULARY_FILES)}): save the model's "
            f"tokenizer into it (tokenizer.save_pretrained(folder))"
        )


def stage(folder: Path, staging: Path, repo_id: str, license: str | None, datasets: list[str] | None) -> list[str]:
    """Writes exactly what will be uploaded into ``staging``, which appears only when complete; returns the
    file names."""
    with write_folder(staging) as written:
        (written / STAGING_MARKER).touch()
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in SKIPPED and path.name != "README.md":
                shutil.copy(path, written / path.name)
        card = render_model_card(TEMPLATE, folder, repo_id=repo_id, license=license, datasets=datasets)
        (written / "README.md").write_text(card)
        check_card(written / "README.md")
        for path in staged_files(written):
            remove_secrets(path)
    return [path.name for path in staged_files(staging)]


def staged_files(staging: Path) -> list[Path]:
    """The files to upload: everything staged but the marker."""
    return sorted(path for path in staging.iterdir() if path.name != STAGING_MARKER)


def remove_secrets(path: Path) -> None:
    """Redacts a staged text file that holds a secret-looking string; refuses a binary one, which cannot be
    edited safely. The model folder itself is left as it is."""
    if path.suffix == ".safetensors":  # only the JSON header can hold text; the rest is tensor data
        with path.open("rb") as file:
            data = file.read(int.from_bytes(file.read(8), "little"))
    else:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            if redact(text) != text:
                path.write_text(redact(text), encoding="utf-8")
                print(f"warning: {path.name} holds a secret-looking string (an access token?); redacted in the upload")
            return
    text = data.decode("latin-1")  # bytes as characters, one to one, so the patterns match as in text
    if redact(text) != text:
        fail(f"{path.name} holds a secret-looking string (an access token?) and is not a text file to redact")


def check_card(path: Path) -> None:
    card = ModelCard.load(path)
    metadata = card.data.to_dict()
    for key, value in REQUIRED_METADATA.items():
        if metadata.get(key) != value:
            fail(f"model card metadata {key!r} is {metadata.get(key)!r}, expected {value!r}")
    if not metadata.get("license"):
        fail("model card metadata has no license")
    if not {"longnet", "dilated-attention"} <= set(metadata.get("tags") or []):
        fail("model card metadata lacks the tags longnet and dilated-attention")
    for section in ("## Usage", "## Evaluation", "## Limitations", "## Citation", "trust_remote_code=True"):
        if section not in card.text:
            fail(f"model card has no {section!r}")


def upload(staging: Path, repo_id: str, private: bool, revision: str | None, message: str) -> tuple[str, bool]:
    """Uploads the staged files in one commit; returns its URL and whether the repository is private (an
    existing repository keeps its visibility: --private into a public one is refused, nothing uploaded)."""
    api = HfApi()  # the token: HF_TOKEN or the stored login, never passed around here
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    is_private = bool(api.repo_info(repo_id, repo_type="model").private)
    if private and not is_private:
        fail(
            f"--private: {repo_id} already exists and is public, and an upload does not change that; make it "
            "private in its settings on the Hub first, or leave out --private to upload publicly"
        )
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in staged_files(staging)]
    commit = api.create_commit(
        repo_id, operations=operations, commit_message=message, revision=revision, repo_type="model"
    )
    return getattr(commit, "commit_url", str(commit)), is_private


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a saved LongNet model folder")
    parser.add_argument("repo_id", help="the Hub repository, e.g. your-name/longnet-stdlib")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to upload to (created if missing); default main")
    parser.add_argument("--commit_message", default="Upload LongNet model")
    parser.add_argument(
        "--license",
        help="the card's license (default: the one recorded with the model: a converted model's source "
        "license, apache-2.0 for a model trained here)",
    )
    parser.add_argument("--datasets", nargs="+", help="dataset ids for the card (default: from the training run)")
    parser.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="write the staging folder and list it; upload nothing",
    )
    parser.add_argument(
        "--staging_dir", help="where to stage (default: a temporary folder; with --dry-run, FOLDER-hub-staging)"
    )
    args = parser.parse_args(argv)

    folder = Path(args.folder)
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        fail(f"repo_id {args.repo_id!r} is not a valid Hub repository id (your-name/model-name): {error}")
    if args.dry_run and not args.staging_dir:
        args.staging_dir = f"{folder.resolve()}-hub-staging"
    if not (folder / "config.json").exists():
        fail(f"{folder} is not a model folder (no config.json)")
    staging_dir = Path(args.staging_dir) if args.staging_dir else None
    if staging_dir and staging_dir.exists() and not (staging_dir / STAGING_MARKER).exists():
        if not staging_dir.is_dir() or any(staging_dir.iterdir()):
            fail(f"--staging_dir {staging_dir} exists, is not empty and was not staged by this script")
    check_folder(folder)
    if not args.license and recorded_license(folder) is None:
        fail(f"{folder} was converted from a model whose card names no license: give the source's with --license")
    print(f"checking that {folder} loads without the longnet package ...")
    try:
        loaded = check_loads_standalone(folder)
    except RuntimeError as error:
        fail(str(error))
    print(f"  ok: {loaded['class']}, tokenizer encodes")
    with tempfile.TemporaryDirectory() as temporary:
        staging = staging_dir or Path(temporary) / "staging"
        files = stage(folder, staging, args.repo_id, args.license, args.datasets)
        print(f"staged {len(files)} files in {staging}:")
        for name in files:
            print(f"  {name}  ({(staging / name).stat().st_size:,} bytes)")
        if args.dry_run:
            print(json.dumps({"dry_run": True, "repo_id": args.repo_id, "files": files}))
            return
        url, is_private = upload(staging, args.repo_id, args.private, args.revision, args.commit_message)
        print(f"uploaded to {args.repo_id} ({'private' if is_private else 'public'}): {url}")


if __name__ == "__main__":
    main()
