"""LongNet with the libraries around transformers models: PEFT, accelerate's device maps."""

import pytest
import torch
from conftest import make_model, random_ids, run_ranks
from transformers import AutoModelForCausalLM

import longnet  # noqa: F401  (registers LongNet with the Auto classes)


def test_lora_trains_saves_reloads_and_merges(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(make_model(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable} == set(targets)  # ...q_proj.lora_A.default.weight
    ids = random_ids(2, 40)
    losses, _ = _train(model.train(), ids)
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}

    reloaded = PeftModel.from_pretrained(make_model(), tmp_path / "adapter").eval()
    merged = reloaded.merge_and_unload()
    assert type(merged).__name__ == "LongNetForCausalLM"
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained, atol=1e-5, rtol=0)
    base = make_model().state_dict()
    changed = {name for name, tensor in merged.state_dict().items() if not torch.equal(tensor, base[name])}
    assert changed and all(name.split(".")[-2] in targets for name in changed)


def test_device_map_auto_splits_between_whole_decoder_layers(tmp_path):
    """With room in memory for about one decoder layer, accelerate offloads the rest to disk; every module
    it places is a whole layer or smaller (``_no_split_modules``), and the logits do not change."""
    model = make_model(num_hidden_layers=4)
    model.save_pretrained(tmp_path / "model")
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": 2 * layer_bytes},
        offload_folder=tmp_path / "offload",
    )
    placement = loaded.hf_device_map
    assert "disk" in placement.values() and "cpu" in placement.values()
    assert all(not name.startswith("model.layers.") or name.count(".") == 2 for name in placement)
    ids = random_ids(1, 30)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_torch_compile_forward_and_training_step_match_eager():
    """``torch.compile(model)`` (AOTAutograd, the training path, without inductor's code generation, which
    a CPU test cannot afford): outputs and gradients equal eager mode's over several lengths, and no frame
    reaches dynamo's recompile limit (the kernels are not traced: their launch plans depend on strides)."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = make_model().train()
    compiled_model = make_model().train()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=4):
        for length in (40, 56, 72, 88):
            ids = random_ids(2, length, seed=length)
            expected = eager(input_ids=ids, labels=ids)
            got = compiled(input_ids=ids, labels=ids)
            torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
            expected.loss.backward()
            got.loss.backward()
            for (name, want), have in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
                torch.testing.assert_close(have.grad, want.grad, atol=1e-5, rtol=0, msg=name)
            eager.zero_grad()
            compiled_model.zero_grad()
    torch._dynamo.reset()


def test_fsdp2_training_matches_one_process(tmp_path):
    """Two processes training under PyTorch's FSDP2 (``fully_shard`` on each decoder layer and the model,
    parameters sharded across ranks, gloo) give the losses and weights of one process reading the whole
    batch, which is what DDP computes. (On CPU the Trainer and accelerate do not apply FSDP: they fall back
    to DDP, so the sharding is applied here directly, as they do on GPUs.)"""
    run_ranks(2, _train_sharded, str(tmp_path))
    expected_losses, expected_weights = _train(make_model().train(), random_ids(4, 48))
    got = torch.load(tmp_path / "result.pt")
    assert got["losses"] == pytest.approx(expected_losses, rel=1e-5)
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(got["weights"][name], tensor, atol=1e-5, rtol=0, msg=name)


def _train(model, ids, group=None) -> tuple[list[float], dict]:
    """Four AdamW steps on ``ids`` (frozen parameters stay so); with a process group, the loss is averaged
    over its ranks. Returns the losses and the final weights."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().clone()
        if group is not None:
            torch.distributed.all_reduce(value, group=group)
            value /= torch.distributed.get_world_size(group)
        losses.append(value.item())
    weights = {name: getattr(t, "full_tensor", lambda t=t: t)().detach() for name, t in model.state_dict().items()}
    return losses, weights


def _train_sharded(rank, world, folder):
    from torch.distributed.fsdp import fully_shard

    model = make_model().train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert type(model.lm_head.weight).__name__ == "DTensor"
    ids = random_ids(4, 48).chunk(world)[rank]  # equal halves: the mean of the ranks' means is the batch's
    losses, weights = _train(model, ids, torch.distributed.group.WORLD)
    if rank == 0:
        torch.save({"losses": losses, "weights": weights}, f"{folder}/result.pt")
