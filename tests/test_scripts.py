"""scripts/train.py and scripts/evaluate.py, run as a user runs them, on a tiny corpus and model."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

import longnet  # noqa: F401  (registers LongNet with the Auto classes, as a user of the package does)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "train.py")
EVALUATE = str(ROOT / "scripts" / "evaluate.py")
PUSH = str(ROOT / "scripts" / "push_to_hub.py")
TINY_ARGS = [
    "--block_size",
    "128",
    "--vocab_size",
    "300",
    "--hidden_size",
    "32",
    "--intermediate_size",
    "64",
    "--num_hidden_layers",
    "2",
    "--num_attention_heads",
    "2",
    "--segment_lengths",
    "16",
    "32",
    "64",
    "128",
    "--dilation_rates",
    "1",
    "2",
    "4",
    "8",
    "--max_position_embeddings",
    "1024",
    "--eval_context_lengths",
    "32",
    "64",
    "128",
    "256",
    "--bf16",
    "false",
    "--disable_tqdm",
    "true",
    "--learning_rate",
    "5e-3",
    "--warmup_steps",
    "0",
    "--logging_steps",
    "1",
    "--validation_split_percentage",
    "25",
    "--per_device_eval_batch_size",
    "16",
    "--seed",
    "7",
]


def run(args, cwd=None, check=True, env=None, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 30 standard library modules, as a folder of .py files."""
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email", "http"):
        for path in sorted((stdlib / package).glob("*.py")):
            shutil.copy(path, folder / f"{package}_{path.name}")
    return folder


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One LongNet and one dense Llama run of the same size on the same data."""
    runs = {}
    for attention in ("dilated", "dense"):
        out = tmp_path_factory.mktemp(attention) / "model"
        result = run(
            [
                sys.executable,
                TRAIN,
                "--train_file",
                str(corpus),
                "--output_dir",
                str(out),
                "--attention",
                attention,
                "--max_steps",
                "16",
                "--save_steps",
                "8",
                *TINY_ARGS,
            ]
        )
        runs[attention] = (out, result.stdout + result.stderr)
    return runs


def logged_losses(folder: Path) -> list[float]:
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("attention", ["dilated", "dense"])
def test_training_lowers_the_loss_and_saves_a_loadable_folder(trained, attention):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    folder, log = trained[attention]
    losses = logged_losses(folder)
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "all_results.json",
        "perplexity_by_context.md",
        "perplexity_by_context.png",
        "training_info.json",
    ):
        assert (folder / name).exists(), name
    # The model card describes LongNet: the dense baseline (a stock Llama) gets none.
    assert (folder / "README.md").exists() == (attention == "dilated")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == ("LongNetForCausalLM" if attention == "dilated" else "LlamaForCausalLM")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "def handler(self, request):\n    return None  # ünïcode\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer) <= model.config.vocab_size
    out = pipeline("text-generation", model=model, tokenizer=tokenizer)("import ", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("import ")
    assert "Validation perplexity by context length" in log and "Completion from the reloaded folder" in log


def test_fine_tune_from_a_trained_folder(trained, corpus, tmp_path):
    source = trained["dilated"][0]
    out = tmp_path / "fine-tuned"
    result = run(
        [
            sys.executable,
            TRAIN,
            "--model_name_or_path",
            str(source),
            "--train_file",
            str(corpus),
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--save_steps",
            "3",
            "--passkey_share",
            "0.5",
            "--passkey_episodes",
            "2",
            "--passkey_far",
            "0.25",
            "--passkey_far_window",
            "0.125",
            "--passkey_answer_weight",
            "4",
            *TINY_ARGS,
        ]
    )
    assert (
        "Planting pass keys in 50% of the blocks (1 to 2 per block), 25% of the needles far (in their slot's first "
        "0.125, answered in its last)" in result.stderr
    )
    config = json.loads((out / "config.json").read_text())
    assert config["segment_lengths"] == [16, 32, 64, 128] and config["hidden_size"] == 32
    assert (out / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()
    before, after = final_weights(source), final_weights(out)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_fine_tuning_with_other_branches_and_rope_base(trained, corpus, tmp_path):
    """--segment_lengths, --dilation_rates and --rope_theta with --model_name_or_path re-branch the LongNet
    being fine-tuned and give it another RoPE base (for a longer context): the saved model has the new
    branches and base and computes what a LongNet built with them from the same weights computes."""
    from transformers import AutoModelForCausalLM

    from longnet import LongNetConfig, LongNetForCausalLM

    source, out = trained["dilated"][0], tmp_path / "rebranched"
    args = ["--model_name_or_path", str(source), "--train_file", str(corpus), "--output_dir", str(out)]
    branches = ["--segment_lengths", "16", "256", "--dilation_rates", "1", "2", "--rope_theta", "1e6"]
    run([sys.executable, TRAIN, *args, "--max_steps", "1", *TINY_ARGS, *branches])
    config = json.loads((out / "config.json").read_text())
    assert config["segment_lengths"] == [16, 256] and config["dilation_rates"] == [1, 2]
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 200, (1, 200))
    built = {}
    # the new branches and base, and others (so the comparison can fail)
    for lengths, theta in (([16, 256], 1e6), ([16, 32], 1e6), ([16, 256], 10000.0)):
        fields = {"segment_lengths": lengths, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
        built[lengths[-1], theta] = LongNetForCausalLM(LongNetConfig.from_dict({**model.config.to_dict(), **fields}))
        built[lengths[-1], theta].load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, built[256, 1e6].eval()(ids).logits)
        for other in ((32, 1e6), (256, 10000.0)):
            assert not torch.allclose(logits, built[other].eval()(ids).logits, atol=1e-3)


def test_rope_base_of_a_dense_model_from_scratch(corpus, tmp_path):
    """--rope_theta reaches the config of a model built from the size flags, dense as well as dilated."""
    out = tmp_path / "dense"
    args = ["--train_file", str(corpus), "--output_dir", str(out), "--attention", "dense", "--rope_theta", "5e5"]
    run([sys.executable, TRAIN, *args, "--max_steps", "1", *TINY_ARGS])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_parameters"]["rope_theta"] == 5e5


@pytest.mark.parametrize(
    "attention, extra, message",
    [
        ("dense", [], "--segment_lengths and --dilation_rates set a LongNet's branches: '{source}' is llama"),
        ("dilated", ["--attention", "dense"], "--attention dense: --model_name_or_path '{source}' is a longnet model"),
        ("dilated", ["--hidden_size", "64"], "--hidden_size 64 differs from the 32 of --model_name_or_path '{source}'"),
    ],
)
def test_fine_tuning_refuses_flags_the_model_contradicts(trained, corpus, tmp_path, capsys, attention, extra, message):
    """A size flag or --attention that disagrees with the folder being fine-tuned, or branches for a
    dense model, stop the run with one line instead of being silently ignored."""
    source, out = trained[attention][0], tmp_path / "out"
    args = ["--model_name_or_path", str(source), "--train_file", str(corpus), "--output_dir", str(out)]
    code, output = run_main("train", [*args, "--max_steps", "1", *TINY_ARGS, *extra], capsys)
    assert code == 2 and output.strip().splitlines()[-1].startswith("error: ")
    assert message.format(source=source) in output and not out.exists()


def test_evaluate_puts_models_side_by_side(trained, corpus, tmp_path):
    out = tmp_path / "side_by_side"
    validation = sorted(corpus.glob("*.py"))[:8]
    run(
        [
            sys.executable,
            EVALUATE,
            str(trained["dilated"][0]),
            str(trained["dense"][0]),
            "--names",
            "LongNet",
            "Llama",
            "--validation_file",
            *map(str, validation),
            "--context_lengths",
            "32",
            "64",
            "128",
            "--out",
            str(out),
        ]
    )
    table = out.with_suffix(".md").read_text()
    assert "| context | LongNet | Llama |" in table
    assert all(f"| {n} |" in table for n in (32, 64, 128))
    values = json.loads(out.with_suffix(".json").read_text())
    assert set(values) == {"LongNet", "Llama"} and all(v > 1 for r in values.values() for v in r.values())
    assert out.with_suffix(".png").stat().st_size > 0


def final_weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


RESUME_ARGS = ["--max_steps", "30", "--save_steps", "3", *TINY_ARGS]
# One thread: a CPU run's sums split across threads by how many the OpenMP/MKL runtimes hand out under
# the machine's load (the polling below loads it), so two runs agree bitwise only on one thread.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> Path:
    """The resume tests' reference: a run of RESUME_ARGS on one thread, never stopped."""
    out = tmp_path_factory.mktemp("uninterrupted") / "whole"
    run([sys.executable, TRAIN, "--train_file", str(corpus), "--output_dir", str(out), *RESUME_ARGS], env=ONE_THREAD)
    return out


def assert_same_weights(got: Path, expected: Path) -> None:
    expected, got = final_weights(expected), final_weights(got)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)


def test_resume_after_sigkill_matches_an_uninterrupted_run(corpus, uninterrupted, tmp_path, capsys):
    args = ["--train_file", str(corpus), *RESUME_ARGS]
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **ONE_THREAD}
    process = subprocess.Popen(
        [sys.executable, TRAIN, "--output_dir", str(killed), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (killed / "checkpoint-6").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed"
    assert not (killed / "checkpoint-30").exists()

    # The folder is not empty: without --resume_from_checkpoint the script refuses to write into it.
    code, output = run_main("train", ["--output_dir", str(killed), *args], capsys)
    assert code == 2 and "--overwrite_output_dir" in output
    run([sys.executable, TRAIN, "--output_dir", str(killed), "--resume_from_checkpoint", "last", *args], env=ONE_THREAD)
    assert_same_weights(killed, uninterrupted)


def test_two_process_data_parallel_run_trains_and_saves_once(corpus, tmp_path):
    out = tmp_path / "ddp"
    result = run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(29500 + os.getpid() % 1000),
            TRAIN,
            "--train_file",
            str(corpus),
            "--output_dir",
            str(out),
            "--max_steps",
            "6",
            "--save_steps",
            "6",
            *TINY_ARGS,
        ]
    )
    log = result.stdout + result.stderr
    info = json.loads((out / "training_info.json").read_text())
    assert info["summary"]["processes"] == 2
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    assert log.count("Saved to ") == 1
    assert (out / "model.safetensors").exists()


def log_entries(folder: Path) -> list[dict]:
    return json.loads((folder / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]


@pytest.mark.parametrize(
    "processes, batch",
    # 35-76 s (sp2) and 45 s (four processes) on two cores: the slow target (`pytest -m slow`); the default run
    # keeps sequence parallelism's multi-process kernel and model tests (tests/test_sequence_parallel.py)
    [pytest.param(2, 2, id="sp2", marks=pytest.mark.slow), pytest.param(4, 4, id="sp2-x-dp2", marks=pytest.mark.slow)],
)
def test_sequence_parallel_training_matches_one_process(corpus, tmp_path, processes, batch):
    # Two processes per sequence (and, with four, two such groups training data parallel) against one
    # process reading the same blocks whole, with the same global batch.
    common = [
        "--train_file",
        str(corpus),
        *TINY_ARGS,
        "--max_steps",
        "4",
        "--save_steps",
        "4",
        "--document_boundaries",
        "false",
        "--bf16",
        "false",  # fp32: with bf16 rounding, AdamW's sign-like steps make the weights differ by ~lr
    ]
    single, split = tmp_path / "single", tmp_path / "split"
    run([sys.executable, TRAIN, *common, "--per_device_train_batch_size", str(batch), "--output_dir", str(single)])
    result = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(processes),
            "--master-port",
            str(29500 + os.getpid() % 1000),
            TRAIN,
            *common,
            "--sequence_parallel_size",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--output_dir",
            str(split),
        ]
    )
    expected, got = log_entries(single), log_entries(split)
    assert [e["step"] for e in got] == [e["step"] for e in expected]
    for want, have in zip(expected, got, strict=True):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in want:
                assert have[key] == pytest.approx(want[key], rel=1e-3), (key, want, have)
    assert (result.stdout + result.stderr).count("Saved to ") == 1
    info = json.loads((split / "training_info.json").read_text())
    assert info["summary"]["processes"] == processes and info["summary"]["sequence parallel size"] == 2
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(split)
    trained = AutoModelForCausalLM.from_pretrained(single)
    ids = torch.randint(0, 300, (1, 128), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reloaded(ids).logits, trained(ids).logits, atol=2e-3, rtol=0)


def bad_inputs(folder: Path) -> dict[str, str]:
    """Small inputs a user gets wrong, made in ``folder``; the keys are the placeholders of the cases below."""
    from transformers import LlamaConfig

    from longnet import LongNetConfig

    code = "".join(f"square_{i} = {i} * {i}\n" for i in range(40))
    paths = {name: folder / name for name in ("one.py", "two", "unreadable", "mixed", "untokenized", "small.json")}
    paths["one.py"].write_text(code)
    for name in ("two", "unreadable", "mixed", "untokenized"):
        paths[name].mkdir()
    for name in ("a.py", "b.py"):
        (paths["two"] / name).write_text(code)
    (paths["unreadable"] / "image.txt").write_bytes(bytes(range(256)) * 4)  # binary
    (paths["unreadable"] / "old.py").write_bytes("caf\xe9 = 1\n".encode("latin-1") * 20)  # not UTF-8
    (paths["unreadable"] / "notes.bin").write_text(code)  # not a data file kind
    (paths["mixed"] / "a.py").write_text(code)
    (paths["mixed"] / "b.jsonl").write_text(json.dumps({"text": code}) + "\n")
    small = LongNetConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=1024,
        segment_lengths=[16],
        dilation_rates=[1],
    )  # the size TINY_ARGS gives
    small.to_json_file(paths["small.json"])
    small.save_pretrained(paths["untokenized"])
    LlamaConfig(hidden_size=32, num_attention_heads=2).to_json_file(folder / "llama.json")
    paths["llama.json"] = folder / "llama.json"
    return {name.split(".")[0]: str(path) for name, path in paths.items()}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_file", "/no/such/folder"], "--train_file '/no/such/folder' does not exist"),
        (["--block_size", "2048"], "--block_size 2048 is larger than the model supports"),
        (["--vocab_size", "2000", "--config_name", "{small}"], "the tokenizer has"),
        (["--config_name", "{llama}"], "--config_name: '{llama}' holds a llama config, not a LongNet one"),
        (
            ["--config_name", "{small}", "--num_hidden_layers", "3"],
            "--num_hidden_layers 3 differs from the 2 of --config_name '{small}'",
        ),
        (
            ["--config_name", "{small}", "--dilation_rates", "1", "2"],
            "--segment_lengths 16 32 64 128 --dilation_rates 1 2: ",
        ),
        (["--attention", "sparse"], "--attention must be 'dilated' or 'dense'"),
        (["--rope_theta", "0"], "--rope_theta must be above 0, got 0.0"),
        (["--sequence_parallel_size", "3"], "--sequence_parallel_size 3 must divide the number of processes (1)"),
        (["--sequence_parallel_size", "2", "--attention", "dense"], "needs --attention dilated"),
        (
            ["--sequence_parallel_size", "2", "--document_boundaries", "true"],
            "it cannot keep packed documents apart",
        ),
        (["--train_file", "{one}"], "one data file ({one}) cannot be split by file into train and validation"),
        (
            ["--train_file", "{two}", "--validation_split_percentage", "0.01"],
            "--validation_split_percentage 0.01 holds out none of the 2 data files",
        ),
        (["--train_file", "{unreadable}"], "no readable data files in {unreadable}"),
        (
            ["--train_file", "{one}", "--validation_file", "{one}", "--text_column", "code"],
            "--text_column 'code' is not a column of the data",
        ),
        (["--train_file", "{mixed}", "--validation_file", "{one}"], "a mix of file kinds: json ({mixed}/b.jsonl)"),
        (["--dilation_rates", "1", "2", "0"], "--dilation_rates 1 2 0: dilation_rates must hold positive integers"),
        (["--model_name_or_path", "{untokenized}"], "--model_name_or_path '{untokenized}' has no tokenizer"),
        (["--no_such_flag", "1"], "error: unrecognized arguments: --no_such_flag 1"),
        (["--segment_length", "16"], "error: unrecognized arguments: --segment_length 16"),  # no abbreviations
        (["--hidden_size", "33"], "hidden_size (33) must be a multiple of num_attention_heads (2)"),
        (["--passkey_share", "1.5"], "--passkey_share must be between 0 and 1, got 1.5"),
        (["--passkey_share", "0.5", "--block_size", "40"], "--block_size 40 is too short to plant pass keys"),
        (["--passkey_share", "0.5", "--passkey_episodes", "0"], "--passkey_episodes must be at least 1, got 0"),
        (["--passkey_episodes", "4"], "--passkey_episodes needs --passkey_share above 0"),
        (["--passkey_answer_weight", "5"], "--passkey_answer_weight needs --passkey_share above 0"),
        (["--passkey_boundary", "256"], "--passkey_boundary needs --passkey_share above 0"),
        (
            ["--passkey_share", "1", "--passkey_boundary", "-1"],
            "--passkey_boundary must be 0 (off) or a segment length, got -1",
        ),
        (
            ["--passkey_share", "1", "--passkey_boundary", "128"],
            "--passkey_boundary 128 leaves no boundary inside a block of --block_size 128",
        ),
        (["--passkey_hop", "0.5"], "--passkey_hop needs --passkey_share above 0"),
        (["--passkey_share", "1", "--passkey_hop", "2"], "--passkey_hop must be between 0 and 1, got 2.0"),
        (["--passkey_far", "0.5"], "--passkey_far needs --passkey_share above 0"),
        (["--passkey_both_copies", "0.5"], "--passkey_both_copies needs --passkey_share above 0"),
        (
            ["--passkey_share", "1", "--passkey_both_copies", "-0.5"],
            "--passkey_both_copies must be between 0 and 1, got -0.5",
        ),
        (
            ["--passkey_share", "1", "--passkey_hop", "0.5", "--passkey_both_copies", "0.75"],
            "--passkey_hop and --passkey_both_copies are shares of the episodes: together at most 1, got 1.25",
        ),
        (["--passkey_cut", "0.5"], "--passkey_cut needs --passkey_share above 0"),
        (
            ["--passkey_share", "1", "--passkey_boundary", "64", "--passkey_cut", "2"],
            "--passkey_cut must be between 0 and 1, got 2.0",
        ),
        (["--passkey_share", "1", "--passkey_cut", "0.5"], "--passkey_cut needs --passkey_boundary"),
        (
            ["--passkey_share", "1", "--passkey_cut_between_copies", "0.5"],
            "--passkey_cut_between_copies needs --passkey_cut above 0",
        ),
        (
            [
                "--passkey_share",
                "1",
                "--passkey_boundary",
                "64",
                "--passkey_cut",
                "1",
                "--passkey_cut_between_copies",
                "2",
            ],
            "--passkey_cut_between_copies must be between 0 and 1, got 2.0",
        ),
        (["--passkey_share", "1", "--passkey_far", "1.5"], "--passkey_far must be between 0 and 1, got 1.5"),
        (
            ["--passkey_share", "1", "--passkey_far", "1", "--passkey_far_window", "0"],
            "--passkey_far_window must be above 0 and at most 0.5, got 0.0",
        ),
        (["--passkey_share", "1", "--passkey_far_window", "0.1"], "--passkey_far_window needs --passkey_far above 0"),
        (
            ["--passkey_share", "1", "--passkey_hop", "1", "--attention", "dense"],
            "--passkey_hop needs a LongNet: a llama model reads every copy of the key directly",
        ),
        (
            ["--passkey_share", "1", "--passkey_both_copies", "1", "--attention", "dense"],
            "--passkey_both_copies needs a LongNet: a llama model reads every copy of the key directly",
        ),
        (["--passkey_share", "1", "--passkey_answer_weight", "-1"], "--passkey_answer_weight must be at least 0"),
        (["--eval_max_documents", "0"], "--eval_max_documents must be at least 1, got 0"),
        (["--dataset_name", "wikitext"], "--dataset_name and --train_file are two sources of data: give one"),
        (
            ["--passkey_share", "1", "--passkey_answer_weight", "5", "--sequence_parallel_size", "2"],
            "--passkey_answer_weight does not work with --sequence_parallel_size above 1",
        ),
    ],
)
def test_bad_arguments_stop_before_training(corpus, tmp_path, capsys, extra, message):
    """Each bad input is one error line naming the flag or file, exit code 2, and no output_dir left behind
    to block the corrected rerun. Run in this process (train.main, imports paid once); the test below runs
    one case as a process."""
    inputs = bad_inputs(tmp_path)
    extra, message = [e.format(**inputs) for e in extra], message.format(**inputs)
    out = tmp_path / "out"
    args = ["--train_file", str(corpus), *TINY_ARGS, "--output_dir", str(out), "--max_steps", "4", *extra]
    code, output = run_main("train", args, capsys)
    assert code == 2, output[-2000:]
    assert output.strip().splitlines()[-1].startswith("error: ") and message in output
    assert not out.exists()
    if "unreadable" in extra[-1]:
        assert "warning: skipped 2 file(s) that are not UTF-8 text" in output


def test_a_bad_argument_stops_the_process_with_one_error_line(corpus, tmp_path):
    out = tmp_path / "out"
    args = ["--train_file", str(corpus), *TINY_ARGS, "--output_dir", str(out), "--attention", "sparse"]
    result = run([sys.executable, TRAIN, *args], check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == ["error: --attention must be 'dilated' or 'dense', got 'sparse'"]
    assert not out.exists()


def run_main(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """``scripts/<script>.py``'s main(argv) in this process: its exit code (0 when it returns) and what it
    printed, stdout then stderr. Any exception but SystemExit fails the test, as a traceback would."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        main = importlib.import_module(script).main
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random LongNet too small to mean anything, with a tokenizer trained on two lines: for evaluate.py."""
    from longnet import LongNetConfig, LongNetForCausalLM
    from longnet.training import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny_model")
    tokenizer = train_tokenizer(iter(["def f(x):\n    return x + 1\n", "square = 3 * 3\n"]), 300)
    config = LongNetConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        segment_lengths=[16, 32],
        dilation_rates=[1, 2],
    )
    LongNetForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "extra, message, code",
    [
        (
            ["--context_lengths", "32", "0", "-64"],
            "error: --context_lengths must be at least 2 tokens each, got 0 -64",
            2,
        ),
        (["--context_lengths", "32", "64", "100000"], "Context length 100000 skipped: longer than every document", 0),
        (["--tokenizer_name", "{untokenized}"], "'{untokenized}' has no tokenizer", 2),
        (["--device", "gpu0"], "error: --device 'gpu0' is not a device", 2),
    ],
)
def test_evaluate_bad_inputs(tiny_model, tmp_path, capsys, extra, message, code):
    """A bad input is one error line and writes no report; a length longer than every document is reported."""
    inputs = bad_inputs(tmp_path)
    extra, message = [e.format(**inputs) for e in extra], message.format(**inputs)
    out = tmp_path / "report" / "perplexity"
    args = [str(tiny_model), "--validation_file", inputs["two"], "--out", str(out), *extra]
    got, output = run_main("evaluate", args, capsys)
    assert got == code, output[-2000:]
    assert message in output
    if code:
        assert output.strip().splitlines()[-1].startswith("error: ") and not out.parent.exists()
    else:
        assert message in out.with_suffix(".md").read_text() and "| 64 |" in out.with_suffix(".md").read_text()


def test_evaluate_writes_the_report_files_it_names(tiny_model, tmp_path, capsys):
    # --out is a prefix: a dot in it is part of the name, not a suffix to replace. Results are kept by model
    # name, so two models of one name would overwrite each other: refused.
    out = tmp_path / "report" / "run.v2"
    flags = ["--validation_file", bad_inputs(tmp_path)["two"], "--context_lengths", "32", "64", "--out", str(out)]
    code, output = run_main("evaluate", [str(tiny_model), str(tiny_model), *flags], capsys)
    assert code == 2 and output.strip().splitlines()[-1].startswith(
        f"error: two models are named {tiny_model.name!r} (results are kept by name)"
    )
    code, output = run_main("evaluate", [str(tiny_model), *flags], capsys)
    assert code == 0, output[-2000:]
    written = [tmp_path / "report" / f"run.v2.{kind}" for kind in ("json", "md", "png")]
    assert sorted((tmp_path / "report").iterdir()) == sorted(written)
    assert f"wrote {', '.join(map(str, written))}" in output


def test_evaluate_scores_the_standard_library_files_the_models_held_out(tiny_model, tmp_path, capsys):
    # train.py records the share of the standard library it held out; scoring another split would score
    # files the model was trained on.
    for name, flags in {"p25": {"validation_split_percentage": 25}, "p10": {"validation_split_percentage": 10}}.items():
        shutil.copytree(tiny_model, tmp_path / name)
        (tmp_path / name / "train_arguments.json").write_text(json.dumps(flags))
    shutil.copytree(tiny_model, tmp_path / "p5")
    (tmp_path / "p5" / "train_arguments.json").write_text(json.dumps({"max_steps": 10}))  # the default, 5 %
    common = ["--context_lengths", "32", "64", "--max_documents", "1", "--out", str(tmp_path / "report")]
    code, output = run_main("evaluate", [str(tmp_path / "p25"), *common], capsys)
    assert code == 0 and "held out: the standard library split at 25 % (as trained)" in output, output[-2000:]
    code, output = run_main("evaluate", [str(tmp_path / "p25"), str(tmp_path / "p10"), *common], capsys)
    assert code == 2 and output.strip().splitlines()[-1].startswith("error: the models held out different shares")
    code, output = run_main("evaluate", [str(tmp_path / "p5"), "--validation_split_percentage", "10", *common], capsys)
    assert (
        code == 0 and f"warning: {tmp_path / 'p5'} held out 5 % of the standard library in training, not 10 %" in output
    )


def test_evaluate_refuses_a_tokenizer_larger_than_a_models_vocabulary(tiny_model, tmp_path, capsys):
    # Its ids beyond the vocabulary would fail deep in the embedding (a device assert on a GPU).
    from longnet.training import train_tokenizer

    texts = [f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" for i in range(300)]
    larger = train_tokenizer(iter(texts), 400)
    larger.save_pretrained(tmp_path / "larger")
    flags = ["--validation_file", bad_inputs(tmp_path)["two"], "--context_lengths", "32", "64"]
    code, output = run_main(
        "evaluate",
        [str(tiny_model), "--tokenizer_name", str(tmp_path / "larger"), *flags, "--out", str(tmp_path / "r")],
        capsys,
    )
    error = output.strip().splitlines()[-1]
    assert code == 2 and error.startswith(f"error: the tokenizer ({len(larger)} tokens, from {tmp_path / 'larger'})")
    assert "must share a tokenizer" in error and "Traceback" not in output


def test_existing_output_dir_is_never_overwritten(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    code, output = run_main("train", ["--train_file", str(corpus), "--output_dir", str(out), *TINY_ARGS], capsys)
    assert code == 2 and "exists and is not empty" in output.strip().splitlines()[-1]
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_resume_skips_a_checkpoint_left_half_written(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from train import last_complete_checkpoint

    for step, state in ((3, "{}"), (6, None), (9, '{"global_st')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")


def test_resume_reuses_the_first_runs_arguments(corpus, uninterrupted, tmp_path, capsys):
    # What a crash after checkpoint 27 of the 30 steps leaves: that checkpoint and the saved arguments.
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    for path in out.iterdir():
        if path.is_dir() and path.name != "checkpoint-27":
            shutil.rmtree(path)
        elif path.is_file() and path.name != "train_arguments.json":
            path.unlink()

    changed = ["--output_dir", str(out), "--resume_from_checkpoint", "last"]
    code, output = run_main(
        "train", [*changed, "--block_size", "64", "--train_file", str(corpus / "json_decoder.py")], capsys
    )
    assert code == 2 and "Traceback" not in output
    assert output.startswith("error: --resume_from_checkpoint: --train_file [")
    assert "--block_size 64 (first run: 128)" in output
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-27", "train_arguments.json"]

    # The README's command, as written: every other flag comes from the first run.
    resumed = run([sys.executable, TRAIN, "--output_dir", str(out), "--resume_from_checkpoint", "last"], env=ONE_THREAD)
    assert "resuming with the first run's" in resumed.stdout and "--train_file" in resumed.stdout
    assert_same_weights(out, uninterrupted)


def test_the_validation_split_is_the_same_wherever_the_files_lie(corpus, tmp_path):
    # A model trained on one machine's standard library and evaluated on another's must be scored on the
    # files it held out: the split may not depend on where the files are installed.
    from longnet.training import split_by_file

    splits = []
    for root in (tmp_path / "a", tmp_path / "b" / "deeper"):
        shutil.copytree(corpus, root)
        splits.append([Path(f).name for f in split_by_file(sorted(map(str, root.glob("*.py"))), 25)[1]])
    assert splits[0] == splits[1] and 0 < len(splits[0]) < len(list(corpus.glob("*.py")))


def test_packing_keeps_every_whole_block_of_a_corpus_of_short_rows():
    # 1,500 rows of about 15 tokens: no 256 rows fill a 4,096-token block, the corpus fills several.
    from longnet.training import pack_documents, train_tokenizer

    rows = [f"value_{i} = {i} * {i % 7} + {i % 3}" for i in range(1500)]
    tokenizer = train_tokenizer(iter(rows), 300)
    stream, starts = [], []
    for row in rows:
        ids = tokenizer(row, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        stream += ids
        starts += [True] + [False] * (len(ids) - 1)
    size = 4096
    blocks = pack_documents(datasets.Dataset.from_dict({"text": rows}), tokenizer, size)
    assert len(blocks) == len(stream) // size >= 3
    for number, block in enumerate(blocks):
        at = number * size
        assert block["input_ids"] == stream[at : at + size]
        first = [True] + starts[at + 1 : at + size]  # a block starts a sequence too
        assert block["labels"] == [
            -100 if start else token for start, token in zip(first, block["input_ids"], strict=True)
        ]
        assert [position == 0 for position in block["position_ids"]] == first
        assert all(
            b == a + 1
            for a, b, start in zip(block["position_ids"][:-1], block["position_ids"][1:], first[1:], strict=True)
            if not start
        )


def test_data_smaller_than_one_batch_stops_before_anything_is_written(tmp_path, capsys):
    data = tmp_path / "tiny.py"
    data.write_text("".join(f"square_{i} = {i} * {i} + {7 * i % 5}\n" for i in range(20)))  # 128 to 255 tokens
    out = tmp_path / "out"
    args = ["--train_file", str(data), "--validation_file", str(data), "--output_dir", str(out), *TINY_ARGS]
    code, output = run_main("train", args, capsys)
    assert code == 2
    error = [line for line in output.splitlines() if line.startswith("error:")]
    assert error == [output.strip().splitlines()[-1]]
    assert error[0].startswith("error: the training data makes 1 block of 128 tokens")
    for hint in ("--per_device_train_batch_size 2", "--dataloader_drop_last false", "lower --block_size"):
        assert hint in error[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the default follows the GPU")
@pytest.mark.parametrize("flag", [[], ["--bf16", "false"], ["--fp16", "true"]], ids=["default", "given", "fp16"])
def test_bf16_is_the_default_only_where_the_cpu_multiplies_it_in_hardware(tmp_path, capsys, flag, cpu_bf16_in_hardware):
    # Emulated bf16 made the main job 16x slower than float32 on an AVX2 CPU.
    native = cpu_bf16_in_hardware
    if native is None:
        pytest.skip("the reference reads a Linux CPU's flags in /proc/cpuinfo")
    at = TINY_ARGS.index("--bf16")
    tiny = TINY_ARGS[:at] + TINY_ARGS[at + 2 :]
    data = tmp_path / "tiny.py"
    data.write_text("square = 3 * 3\n")
    args = ["--train_file", str(data), "--validation_file", str(data), "--output_dir", str(tmp_path / "out"), *tiny]
    code, output = run_main("train", args + flag, capsys)  # stops at too little data, after choosing the precision
    assert code == 2 and "the training data makes" in output.strip().splitlines()[-1]
    lines = [line for line in output.splitlines() if line.startswith("precision: ")]
    if flag:  # a given --bf16 or --fp16 is obeyed (with --fp16, bf16 stays off), and nothing is said
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(f"precision: {'bf16 mixed' if native else 'float32'} (")
        assert ("run in hardware" in lines[0]) == native


def test_the_precision_default_follows_the_device_trained_on(cpu_bf16_in_hardware, monkeypatch):
    # --fp16 keeps bf16 off (transformers refuses both at once); --use_cpu asks the CPU, even beside a GPU
    # (one that answers the other way is faked here through torch's public CUDA queries).
    if cpu_bf16_in_hardware is None:
        pytest.skip("the reference reads a Linux CPU's flags in /proc/cpuinfo")
    sys.path.insert(0, str(ROOT / "scripts"))
    from train import with_default_precision

    assert with_default_precision({"fp16": True}) == {"fp16": True}
    assert with_default_precision({"bf16": True, "use_cpu": True}) == {"bf16": True, "use_cpu": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: not cpu_bf16_in_hardware)
    assert with_default_precision({"use_cpu": True}) == {"use_cpu": True, "bf16": cpu_bf16_in_hardware}
    assert with_default_precision({"use_cpu": False}) == {"use_cpu": False, "bf16": not cpu_bf16_in_hardware}


def test_no_token_is_written_or_printed(corpus, tmp_path):
    token, environment_token = "hf_FAKEtoken1234567890abcdef", "hf_FAKEenvironment0987654321zyx"
    out, staging = tmp_path / "out", tmp_path / "staging"
    env = {"HF_TOKEN": environment_token}
    args = ["--train_file", str(corpus), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "2"]
    trained = run([sys.executable, TRAIN, *args, "--hub_token", token, *TINY_ARGS], env=env)
    dry_run = [str(out), "someone/tiny-longnet", "--dry-run", "--staging_dir", str(staging)]
    pushed = run([sys.executable, PUSH, *dry_run], env=env)
    files = [path for folder in (out, staging) for path in folder.rglob("*") if path.is_file()]
    for path in files:
        content = path.read_bytes()
        assert token.encode() not in content and environment_token.encode() not in content, path
    assert {"training_args.bin", "training_info.json", "train_arguments.json", "README.md"} <= {p.name for p in files}
    for output in (trained.stdout, trained.stderr, pushed.stdout, pushed.stderr):
        assert token not in output and environment_token not in output
    # The command is recorded, with the token's value replaced.
    command = json.loads((out / "training_info.json").read_text())["command"]
    assert "--hub_token '<redacted>'" in command and "--max_steps 2" in command
    assert "--hub_token '<redacted>'" in (staging / "README.md").read_text()
