"""Activation checkpointing: policy selection, reversibility, and training that is the same
with and without checkpointing for each backend and ZeRO stage (2 ranks)."""

import tempfile

import deepspeed
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import RegressionData
from zeroloop import LogSettings, TrainerLoop
from zeroloop.activation import (ActivationCheckpointing, ModuleClasses, NamePattern, Predicate,
                                 RepeatedBlocks, apply, choose_backend, reentrant_inputs, select_modules)
from zeroloop.errors import ConfigError
from zeroloop.gpt import GPT, MLP, Block
from zeroloop.testing import full_parameters, run_ranks, single_process, tiny_config

STEPS = 4
DIM = 8  # RegressionData's input width


class Residual(nn.Module):
    """A pre-norm residual MLP block; counts its forward calls (a recompute calls it again)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.drop(self.out(F.gelu(self.fc(self.norm(x)))))


class BlockNet(nn.Module):
    """Blocks over a raw float input (requires_grad=False), then a linear head; returns the MSE.

    Args:
        dropout: dropout probability inside every block.
        frozen: freeze the first block and every block's norm. The second block's input then
            does not require grad either, and ZeRO-3 must re-gather frozen weights to recompute.
    """

    def __init__(self, dropout: float = 0.0, frozen: bool = False, depth: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Residual(DIM, dropout) for _ in range(depth))
        self.head = nn.Linear(DIM, 1)
        if frozen:
            self.blocks[0].requires_grad_(False)
            for block in self.blocks:
                block.norm.requires_grad_(False)

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return F.mse_loss(self.head(x), y)


MODELS = {"dropout": dict(dropout=0.2), "frozen": dict(frozen=True)}


# --- 2 ranks: the same training with and without checkpointing ----------------------------


class WeightsAtEnd(TrainerLoop):
    def on_train_end(self, summary):
        self.final_weights = full_parameters(self.engine)


def train(stage: int, model_kind: str, settings, ds_section=None) -> dict:
    """Train BlockNet for STEPS steps; per-step losses (mean over ranks), final and initial weights."""
    config = tiny_config(stage=stage, micro=4, lr=1e-2)
    if ds_section is not None:
        config["activation_checkpointing"] = ds_section
    model = BlockNet(**MODELS[model_kind])
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    loop = WeightsAtEnd(model, config, train_data=RegressionData(), output_dir=tempfile.mkdtemp(),
                        max_steps=STEPS, seed=0, log=LogSettings(every=1, progress_bar=False),
                        activation_checkpointing=settings)
    summary = loop.train()
    handle = loop.activation_handle
    if handle is not None:
        handle.remove()
    return {"losses": [h["loss"] for h in summary.history], "weights": loop.final_weights, "initial": initial,
            "backend": handle and handle.backend, "calls": [b.calls for b in model.blocks]}


# (label, settings, the config's activation_checkpointing section or None)
CASES = [
    ("torch", ActivationCheckpointing(backend="torch"), None),
    ("deepspeed", ActivationCheckpointing(ModuleClasses(Residual)), {}),  # "auto" picks it from the section
    ("deepspeed-contiguous", ActivationCheckpointing(NamePattern(r"blocks\.\d+"), backend="deepspeed"),
     {"partition_activations": True, "contiguous_memory_optimization": True, "cpu_checkpointing": True}),
]


def with_and_without(rank, stage):
    deepspeed.init_distributed()  # shared by every loop below, torn down by run_ranks
    results = {}
    for model_kind in MODELS:
        results[model_kind, "none"] = train(stage, model_kind, None)
        for label, settings, section in CASES:
            results[model_kind, label] = train(stage, model_kind, settings, section)
    return results


@pytest.mark.multirank
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpointing_trains_exactly_like_no_checkpointing(stage):
    for results in run_ranks(with_and_without, 2, stage):
        for model_kind in MODELS:
            plain = results[model_kind, "none"]
            assert len(plain["losses"]) == STEPS
            assert plain["calls"] == [STEPS] * 3  # one micro-batch per step, no recompute
            # Every trainable block weight moved: equality below is not two runs that both
            # left the blocks untouched (the reentrant pitfall).
            for name, initial in plain["initial"].items():
                moved = not torch.equal(plain["weights"][name], initial)
                frozen = model_kind == "frozen" and (name.startswith("blocks.0.") or ".norm." in name)
                assert moved != frozen, (model_kind, name, moved)
            for label, _, _ in CASES:
                run = results[model_kind, label]
                assert run["backend"] == label.split("-")[0]
                # Each checkpointed block runs again in the backward (not the frozen first
                # one under "torch", whose output needs no backward at all).
                assert sum(run["calls"]) > sum(plain["calls"]), (model_kind, label, run["calls"])
                assert run["losses"] == pytest.approx(plain["losses"], rel=1e-6, abs=1e-7), \
                    (model_kind, label)
                for name, weight in plain["weights"].items():
                    torch.testing.assert_close(run["weights"][name], weight, rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"{model_kind}/{label}/{name}: {m}")


# --- one process: the pitfall, RNG, reversibility ---------------------------------------


def block_grads(model: BlockNet, x, y):
    model.zero_grad()
    torch.manual_seed(1)
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(got, expected):
    """The same loss and the same gradients (the same parameters having one) within fp32 rounding."""
    (loss, grads), (loss_ref, grads_ref) = got, expected
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-6, atol=1e-7, msg=name)


def test_reentrant_pitfall_is_real_and_the_deepspeed_backend_avoids_it():
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's checkpoint replays the accelerator's RNG: dropout must draw from it.
    device = torch.device(get_accelerator().current_device_name())
    x, y = torch.randn(4, DIM, device=device), torch.randn(4, 1, device=device)  # x does not require grad
    reference = BlockNet(dropout=0.2).to(device)
    loss_ref, grads_ref = block_grads(reference, x, y)

    # The pitfall: DeepSpeed's reentrant checkpoint on a block whose input needs no grad.
    raw = BlockNet(dropout=0.2).to(device)
    first = raw.blocks[0]
    first.forward = lambda t, f=type(first).forward.__get__(first): deepspeed.checkpointing.checkpoint(f, t)
    _, grads_raw = block_grads(raw, x, y)
    assert "blocks.0.fc.weight" not in grads_raw  # block 0 silently learns nothing

    model = BlockNet(dropout=0.2).to(device)
    with single_process():
        deepspeed.init_distributed()
        with apply(model, ActivationCheckpointing(backend="deepspeed"), None) as handle:
            loss, grads = block_grads(model, x, y)
    assert handle.backend == "deepspeed"
    assert_same_step((loss, grads), (loss_ref, grads_ref))


def test_torch_backend_recomputes_dropout_identically():
    x, y = torch.randn(4, DIM), torch.randn(4, 1)
    loss_ref, grads_ref = block_grads(BlockNet(dropout=0.5), x, y)
    model = BlockNet(dropout=0.5)
    handle = apply(model, ActivationCheckpointing())
    loss, grads = block_grads(model, x, y)
    assert handle.backend == "torch" and handle.names == ["blocks.0", "blocks.1", "blocks.2"]
    assert [b.calls for b in model.blocks] == [2, 2, 2]  # forward + recompute
    assert_same_step((loss, grads), (loss_ref, grads_ref))


def test_without_preserved_rng_the_recompute_draws_another_mask():
    """The control for the test above: the RNG state is what makes dropout recompute the same."""
    x, y = torch.randn(4, DIM), torch.randn(4, 1)
    _, grads_ref = block_grads(BlockNet(dropout=0.5), x, y)
    model = BlockNet(dropout=0.5)
    apply(model, ActivationCheckpointing(backend="torch", preserve_rng_state=False))
    _, grads = block_grads(model, x, y)
    assert any(not torch.allclose(grads[n], grads_ref[n]) for n in grads_ref)


def test_remove_restores_the_original_forward():
    model = GPT(n_layer=2, n_head=2, n_embd=16, block_size=8)
    ids = torch.randint(0, 256, (2, 8))
    expected = model(ids, ids).loss
    handle = apply(model, ActivationCheckpointing(Block))
    assert all("forward" in block.__dict__ for block in model.blocks)
    handle.remove()
    handle.remove()  # idempotent
    assert all("forward" not in block.__dict__ for block in model.blocks)
    assert all(block.forward.__func__ is Block.forward for block in model.blocks)
    assert torch.equal(model(ids, ids).loss, expected)


def test_remove_keeps_a_forward_the_user_had_set():
    model = BlockNet()
    own = model.blocks[1].forward = lambda x: x
    apply(model, ActivationCheckpointing()).remove()
    assert model.blocks[1].forward is own
    assert "forward" not in model.blocks[0].__dict__


# --- policies -------------------------------------------------------------------------------


def names(model, policy=None, every=1):
    return [name for name, _ in select_modules(model, policy, every)]


def test_policies_select_the_blocks():
    model = GPT(n_layer=4, n_head=2, n_embd=16, block_size=8)
    blocks = [f"blocks.{i}" for i in range(4)]
    assert names(model) == blocks  # RepeatedBlocks, the default
    assert names(model, RepeatedBlocks()) == blocks
    assert names(model, Block) == blocks
    assert names(model, "Block") == blocks
    assert names(model, "zeroloop.gpt.Block") == blocks
    assert names(model, NamePattern(r"blocks\.\d+")) == blocks
    top_level_blocks = Predicate(lambda name, m: name.startswith("blocks.") and name.count(".") == 1)
    assert names(model, top_level_blocks) == blocks
    assert names(model, lambda name, m: isinstance(m, MLP)) == [f"blocks.{i}.mlp" for i in range(4)]
    per_block = [f"blocks.{i}.{n}" for i in range(4) for n in ("ln_1", "ln_2", "mlp")]
    assert names(model, (MLP, "LayerNorm")) == per_block + ["ln_f"]


def test_every_kth_block_and_outermost_only():
    model = GPT(n_layer=5, n_head=2, n_embd=16, block_size=8)
    assert names(model, Block, every=2) == ["blocks.1", "blocks.3"]
    assert names(model, Block, every=5) == ["blocks.4"]
    assert names(model, Block, every=6) == []
    assert names(model, ModuleClasses(Block, MLP)) == [f"blocks.{i}" for i in range(5)]  # not the MLP inside
    # Never the model itself nor the ModuleList (it has no forward): its entries instead.
    assert names(model, NamePattern(".*")) == (["wte", "wpe", "drop"] + [f"blocks.{i}" for i in range(5)]
                                               + ["ln_f", "lm_head"])


def test_bad_settings_are_refused_with_the_key():
    assert ActivationCheckpointing().problems() == []
    bad = ActivationCheckpointing(policy=3, backend="reentrant", every=0)  # constructing never raises
    problems = bad.problems()
    assert len(problems) == 3
    assert problems[0].startswith("activation_checkpointing.backend: must be one of")
    assert problems[1].startswith("activation_checkpointing.every: must be a positive integer")
    assert problems[2].startswith("activation_checkpointing.policy: expected a CheckpointPolicy")
    with pytest.raises(ConfigError) as info:
        apply(BlockNet(), bad)
    assert info.value.problems == problems
    with pytest.raises(ValueError, match="regular expression"):
        NamePattern("blocks.(")
    with pytest.raises(ValueError, match="selects no module"):
        apply(BlockNet(), ActivationCheckpointing("Transformer"))
    with pytest.raises(TypeError, match="activation_checkpointing: expected ActivationCheckpointing"):
        apply(BlockNet(), Residual)


def test_auto_backend_choice():
    gpt = GPT(n_layer=1, n_head=2, n_embd=16, block_size=8)
    auto = ActivationCheckpointing()
    assert choose_backend(gpt, auto, tiny_config()) == "torch"
    assert choose_backend(gpt, auto, {**tiny_config(), "activation_checkpointing": {}}) == "deepspeed"
    assert choose_backend(FakeHFModel(), auto, {"activation_checkpointing": {}}) == "hf"
    assert choose_backend(FakeHFModel(), ActivationCheckpointing(Block), None) == "torch"  # a policy: ours
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        choose_backend(gpt, ActivationCheckpointing(backend="hf"))
    with pytest.raises(ValueError, match="its own layers"):
        choose_backend(FakeHFModel(), ActivationCheckpointing(Block, backend="hf"))


class FakeHFModel(nn.Module):
    """The two methods of a Hugging Face PreTrainedModel the "hf" backend uses."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 2)])
        self.enabled_with = None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.enabled_with = gradient_checkpointing_kwargs

    def gradient_checkpointing_disable(self):
        self.enabled_with = None


def test_zero3_with_frozen_params_on_a_deepspeed_without_the_fix_avoids_non_reentrant(monkeypatch):
    from zeroloop import activation

    zero3 = tiny_config(stage=3)
    frozen = BlockNet(frozen=True)
    assert choose_backend(frozen, ActivationCheckpointing(), zero3) == "torch"  # 0.19.8 has the fix
    monkeypatch.setattr(activation, "zero3_keeps_frozen_params_for_recompute", lambda: False)
    assert choose_backend(frozen, ActivationCheckpointing(), zero3) == "deepspeed"
    assert choose_backend(BlockNet(), ActivationCheckpointing(), zero3) == "torch"  # nothing frozen
    assert choose_backend(frozen, ActivationCheckpointing(), tiny_config(stage=2)) == "torch"
    with pytest.raises(ValueError, match="backend=\"torch\".*#8148.*backend=\"deepspeed\""):
        choose_backend(frozen, ActivationCheckpointing(backend="torch"), zero3)
    hf = FakeHFModel()
    hf.layers.requires_grad_(False)
    apply(hf, ActivationCheckpointing(), zero3)
    assert hf.enabled_with["use_reentrant"] is True


def test_hf_backend_uses_the_models_own_switch_non_reentrant():
    model = FakeHFModel()
    handle = apply(model, ActivationCheckpointing())
    assert handle.backend == "hf"
    assert model.enabled_with == {"use_reentrant": False, "preserve_rng_state": True}
    handle.remove()
    assert model.enabled_with is None


def test_reentrant_inputs_are_fresh_aliases_and_integer_only_inputs_are_refused():
    block = Residual(DIM, 0.0)
    x = torch.randn(2, DIM)
    (alias,), kwargs = reentrant_inputs("blocks.0", block, (x,), {"scale": 2})
    assert alias.requires_grad and not x.requires_grad and alias.data_ptr() == x.data_ptr()
    assert kwargs == {"scale": 2}
    wanting = torch.randn(2, DIM, requires_grad=True) * 2  # mid-graph
    (view,), _ = reentrant_inputs("blocks.0", block, (wanting,), {})
    assert view is not wanting and view.grad_fn is not None and view.data_ptr() == wanting.data_ptr()
    with pytest.raises(RuntimeError, match="'embed' \\(Embedding\\).*no gradient"):
        reentrant_inputs("embed", nn.Embedding(4, 2), (torch.tensor([1, 2]),), {})
    frozen = nn.Embedding(4, 2).requires_grad_(False)  # nothing to train: nothing lost
    ids = torch.tensor([1, 2])
    assert reentrant_inputs("embed", frozen, (ids,), {})[0][0] is ids


def test_deepspeed_backend_passes_num_checkpoints_for_contiguous_memory():
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing

    section = {"partition_activations": True, "contiguous_memory_optimization": True}
    with single_process():
        deepspeed.init_distributed()
        config = {"train_batch_size": 1, "activation_checkpointing": section}
        with apply(BlockNet(depth=3), ActivationCheckpointing(every=1), config):
            assert ds_checkpointing.num_layers == 3  # DeepSpeed asserts it is set
            assert ds_checkpointing.CONTIGUOUS_CHECKPOINTING and ds_checkpointing.PARTITION_ACTIVATIONS
        config["activation_checkpointing"] = {**section, "number_checkpoints": 5}
        with apply(BlockNet(depth=3), ActivationCheckpointing(), config):
            assert ds_checkpointing.num_layers == 5  # the config's own number wins
        for key in ("cpu_checkpointing", "contiguous_memory_optimization"):
            config["activation_checkpointing"] = {key: True}
            with pytest.raises(ValueError, match=f"activation_checkpointing.{key}: .*partition_activations"):
                apply(BlockNet(), ActivationCheckpointing(), config)
