"""Hugging Face models: ``final/`` and ``zeroloop consolidate`` load with ``from_pretrained``.

A tiny GPT-2 built from a config (no download) trains at ZeRO-3 on 2 ranks; rank 0 then
loads ``final/`` and the consolidated checkpoint with ``GPT2LMHeadModel.from_pretrained``
and compares their logits with the trained parameters' (gathered from the engine). A
second loop freezes the embeddings (LoRA-style) and writes only the trainable tensors.
"""

import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from zeroloop import LogSettings, TrainerLoop, consolidate
from zeroloop.checkpoint import CheckpointSettings
from zeroloop.safetensors_io import load_state_dict
from zeroloop.pretrained import copy_pretrained_configs, save_pretrained_configs
from zeroloop.testing import full_parameters, run_ranks, tiny_config

VOCAB, SEQ = 64, 16


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


class TokenData(Dataset):
    """Random token sequences as Hugging Face batches (the model computes the loss)."""

    def __init__(self, n: int = 32):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class KeepTrained(TrainerLoop):
    def on_train_end(self, summary):
        self.trained = full_parameters(self.engine)  # collective under ZeRO-3


def logits_of(model) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(TokenData(2).ids).logits.numpy()


def from_pretrained(folder):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder)


def hf_ranks(rank, root):
    import deepspeed

    deepspeed.init_distributed()  # one process group for both loops
    log = LogSettings(every=1, progress_bar=False)
    loop = KeepTrained(tiny_gpt2(), tiny_config(stage=3, micro=2, lr=1e-2), train_data=TokenData(),
                       output_dir=os.path.join(root, "full"), max_steps=3, log=log,
                       checkpoint=CheckpointSettings())
    loop.train()

    frozen = tiny_gpt2()
    frozen.transformer.wte.weight.requires_grad_(False)  # tied to lm_head: both frozen
    frozen.transformer.wpe.weight.requires_grad_(False)
    trainable = sorted(name for name, p in frozen.named_parameters() if p.requires_grad)
    TrainerLoop(frozen, tiny_config(stage=3, micro=2, lr=1e-2), train_data=TokenData(),
                output_dir=os.path.join(root, "frozen"), max_steps=2, log=log,
                checkpoint=CheckpointSettings(final_weights="trainable")).train()
    if rank != 0:
        return None

    reference = tiny_gpt2()
    missing, unexpected = reference.load_state_dict(loop.trained, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # the tie
    consolidate(os.path.join(root, "full", "checkpoints"), os.path.join(root, "consolidated"))
    final = from_pretrained(os.path.join(root, "full", "final"))
    consolidated = from_pretrained(os.path.join(root, "consolidated"))
    return {
        "trained_logits": logits_of(reference),
        "final_logits": logits_of(final),
        "consolidated_logits": logits_of(consolidated),
        "final_tied": final.lm_head.weight is final.transformer.wte.weight,
        "untrained_logits": logits_of(tiny_gpt2()),
        "final_files": sorted(os.listdir(os.path.join(root, "full", "final"))),
        "consolidated_files": sorted(os.listdir(os.path.join(root, "consolidated"))),
        "frozen_final_keys": sorted(load_state_dict(os.path.join(root, "frozen", "final"))),
        "frozen_trainable": trainable,
    }


@pytest.mark.multirank
def test_from_pretrained_round_trip_at_zero3(tmp_path):
    result = run_ranks(hf_ranks, 2, str(tmp_path))[0]
    for files in (result["final_files"], result["consolidated_files"]):
        assert {"config.json", "generation_config.json", "model.safetensors"} <= set(files)
    assert not np.array_equal(result["trained_logits"], result["untrained_logits"])  # it trained
    assert np.array_equal(result["final_logits"], result["trained_logits"])
    assert np.array_equal(result["consolidated_logits"], result["trained_logits"])
    assert result["final_tied"]
    assert result["frozen_final_keys"] == result["frozen_trainable"]


def test_config_files_follow_the_weights_dtype(tmp_path):
    model = tiny_gpt2()
    assert save_pretrained_configs(model, tmp_path, dtype=torch.bfloat16) == ["config.json",
                                                                               "generation_config.json"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["n_embd"] == 32
    assert "bfloat16" in {config.get("dtype"), config.get("torch_dtype")}
    out = tmp_path / "out"
    out.mkdir()
    assert copy_pretrained_configs(str(tmp_path), str(out), dtype=torch.float16) == ["config.json",
                                                                                     "generation_config.json"]
    copied = json.loads((out / "config.json").read_text())
    assert "float16" in {copied.get("dtype"), copied.get("torch_dtype")}


def test_plain_modules_get_no_config_files(tmp_path):
    assert save_pretrained_configs(torch.nn.Linear(2, 2), tmp_path) == []
    assert os.listdir(tmp_path) == []
