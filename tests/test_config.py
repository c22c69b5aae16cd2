"""Config loading, "auto" resolution and validation: pure logic, no ranks."""

import json

import pytest

from zeroloop.config import ConfigError, Hyperparameters, batch_sizes, resolve_config


def base(**overrides):
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 2},
    }
    config.update(overrides)
    return config


def resolve(config, world_size=2, **kwargs):
    return resolve_config(config, world_size=world_size, **kwargs)


# --- "auto" resolution -----------------------------------------------------------------


def test_auto_batch_triad_from_loop_arguments():
    config = base(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
                  train_batch_size="auto")
    out = resolve(config, world_size=4, hparams=Hyperparameters(micro_batch_size=3, gradient_accumulation_steps=5))
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) \
        == (3, 5, 60)


def test_auto_accumulation_defaults_to_one():
    out = resolve(base(gradient_accumulation_steps="auto"))
    assert out["gradient_accumulation_steps"] == 1
    assert out["train_batch_size"] == 8


@pytest.mark.parametrize("given, expected", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, (4, 4, 32)),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, (8, 2, 32)),
    ({"train_batch_size": 32}, (16, 1, 32)),
    ({"train_micro_batch_size_per_gpu": 4}, (4, 1, 8)),
])
def test_batch_triad_derived_like_deepspeed(given, expected):
    out = resolve(dict(given))
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"],
            out["train_batch_size"]) == expected


def test_auto_optimizer_and_clipping_use_loop_values_or_hf_defaults():
    config = base(gradient_clipping="auto",
                  optimizer={"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                         "weight_decay": "auto"}})
    out = resolve(config, hparams=Hyperparameters(lr=3e-4, weight_decay=0.1))
    assert out["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    assert out["gradient_clipping"] == 1.0


def test_auto_scheduler_uses_peak_lr_warmup_and_run_length():
    config = base(scheduler={"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto", "total_num_steps": "auto"}})
    out = resolve(config, hparams=Hyperparameters(warmup_steps=7), total_steps=100)
    assert out["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 7,
                                          "total_num_steps": 100}


def test_auto_precision_follows_loop_precision():
    config = base(bf16={"enabled": "auto"}, fp16={"enabled": "auto"})
    out = resolve(config, hparams=Hyperparameters(precision="bf16"))
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False
    out = resolve(config)  # default fp32
    assert out["bf16"]["enabled"] is False and out["fp16"]["enabled"] is False


def test_loop_precision_adds_a_missing_section():
    out = resolve(base(), hparams=Hyperparameters(precision="bf16"))
    assert out["bf16"] == {"enabled": True}


def test_auto_buckets_from_hidden_size_or_deepspeed_defaults():
    zero = {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto"}
    out = resolve(base(zero_optimization=dict(zero)), hidden_size=64)
    assert out["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 4096,
                                        "stage3_prefetch_bucket_size": 3686,
                                        "stage3_param_persistence_threshold": 640}
    out = resolve(base(zero_optimization=dict(zero)))
    assert out["zero_optimization"]["reduce_bucket_size"] == 500_000_000


def test_resolution_never_modifies_the_callers_dict():
    config = base(train_batch_size="auto")
    snapshot = json.dumps(config, sort_keys=True)
    resolve(config)
    assert json.dumps(config, sort_keys=True) == snapshot


def test_config_from_a_json_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(base()))
    assert resolve(str(path))["train_batch_size"] == 8


def test_batch_sizes_peek_returns_none_for_broken_configs():
    assert batch_sizes(base(), Hyperparameters(), 2) == (4, 1)
    assert batch_sizes(base(train_batch_size=7), Hyperparameters(), 2) is None


# --- bad configs: each error names the key ---------------------------------------------------

BAD_CONFIGS = [
    ("fp16+bf16", base(fp16={"enabled": True}, bf16={"enabled": True}), {}, "fp16.enabled and bf16.enabled"),
    ("triad", base(train_batch_size=10), {}, "train_batch_size: 10 != "),
    ("indivisible total", {"train_batch_size": 7, "gradient_accumulation_steps": 2}, {}, "train_batch_size: 7"),
    ("string batch", base(train_micro_batch_size_per_gpu="8"), {}, "train_micro_batch_size_per_gpu: must be"),
    ("zero batch", base(gradient_accumulation_steps=0), {}, "gradient_accumulation_steps: must be >= 1"),
    ("float batch", base(train_batch_size=8.0), {}, "train_batch_size: must be a positive integer"),
    ("stage 4", base(zero_optimization={"stage": 4}), {}, "zero_optimization.stage"),
    ("stage string", base(zero_optimization={"stage": "3"}), {}, "zero_optimization.stage"),
    ("nvme no path", base(zero_optimization={"stage": 3, "offload_param": {"device": "nvme"}}), {},
     "zero_optimization.offload_param.nvme_path"),
    ("offload device", base(zero_optimization={"stage": 2, "offload_optimizer": {"device": "gpu"}}), {},
     "zero_optimization.offload_optimizer.device"),
    ("top-level typo", dict(base(), zero_optimisation={"stage": 2}), {}, "did you mean 'zero_optimization'"),
    ("unknown top-level", dict(base(), learning_rate=1e-3), {}, "learning_rate: unknown key"),
    ("zero typo", base(zero_optimization={"stage": 2, "overlap_com": True}), {},
     "did you mean zero_optimization.'overlap_comm'"),
    ("stage3 key at stage 2", base(zero_optimization={"stage": 2, "stage3_max_live_parameters": 1e9}), {},
     "zero_optimization.stage3_max_live_parameters: only used by ZeRO stage 3"),
    ("offload_param at stage 1", base(zero_optimization={"stage": 1, "offload_param": {"device": "cpu"}}), {},
     "zero_optimization.offload_param: only used by ZeRO stage 3"),
    ("clipping string", base(gradient_clipping="1.0"), {}, "gradient_clipping: must be a number"),
    ("negative bucket", base(zero_optimization={"stage": 2, "reduce_bucket_size": -1}), {},
     "zero_optimization.reduce_bucket_size: must be >"),  # DeepSpeed's bound: ge=0 in 0.16, gt=0 in 0.19
    ("bool as number", base(zero_optimization={"stage": 2, "overlap_comm": "yes"}), {},
     "zero_optimization.overlap_comm: must be true or false"),
    ("enabled string", base(bf16={"enabled": "true"}), {}, "bf16.enabled: must be true, false"),
    ("section not object", base(fp16=True), {}, "fp16: must be a JSON object"),
    ("optimizer without type", base(optimizer={"params": {"lr": 1e-3}}), {}, "optimizer.type: required"),
    ("micro auto without loop value", base(train_micro_batch_size_per_gpu="auto"), {},
     "train_micro_batch_size_per_gpu: is \"auto\""),
    ("no batch size", {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, {},
     "train_micro_batch_size_per_gpu: missing"),
    ("total steps unknown", base(scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}), {},
     "scheduler.params.total_num_steps"),
    ("auto where unsupported", base(steps_per_print="auto"), {}, "steps_per_print: \"auto\" cannot be resolved"),
    ("mismatched micro", base(), {"hparams": Hyperparameters(micro_batch_size=8)},
     "train_micro_batch_size_per_gpu: the config says 4 but the loop was given micro_batch_size=8"),
    ("mismatched precision", base(bf16={"enabled": False}), {"hparams": Hyperparameters(precision="bf16")},
     "bf16.enabled: the config says false"),
    ("bad precision", base(), {"hparams": Hyperparameters(precision="fp8")}, "precision: must be one of"),
    ("negative loss scale", base(fp16={"enabled": True, "loss_scale": -1}), {}, "fp16.loss_scale: must be >= 0"),
    ("scale power", base(fp16={"enabled": True, "initial_scale_power": 100}), {},
     "fp16.initial_scale_power: must be a whole number between 0 and 64"),
    ("scale window", base(fp16={"enabled": True, "loss_scale_window": 0}), {}, "fp16.loss_scale_window"),
    ("hysteresis", base(fp16={"enabled": True, "hysteresis": "2"}), {}, "fp16.hysteresis"),
    ("min loss scale", base(fp16={"enabled": True, "min_loss_scale": 0}), {}, "fp16.min_loss_scale: must be a number > 0"),
    ("consecutive hysteresis", base(fp16={"enabled": True, "consecutive_hysteresis": 1}), {},
     "fp16.consecutive_hysteresis: must be true or false"),
    ("fp16 typo", base(fp16={"enabled": True, "loss_scale_windows": 100}), {}, "did you mean fp16.'loss_scale_window'"),
]


@pytest.mark.parametrize("name, config, kwargs, expected", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_the_key(name, config, kwargs, expected):
    with pytest.raises(ConfigError) as info:
        resolve(config, **kwargs)
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_every_problem_is_reported_at_once():
    config = dict(base(fp16={"enabled": True}, bf16={"enabled": True}, train_batch_size="8"),
                  zero_optimisation={}, steps_per_prnt=1)
    with pytest.raises(ConfigError) as info:
        resolve(config)
    problems = info.value.problems
    assert len(problems) == 4, problems
    text = str(info.value)
    for key in ("zero_optimisation", "steps_per_prnt", "train_batch_size", "fp16.enabled"):
        assert key in text


def test_every_mismatch_is_reported_at_once():
    config = base(gradient_clipping=1.0)
    hp = Hyperparameters(micro_batch_size=2, lr=5e-4, max_grad_norm=0.5)
    with pytest.raises(ConfigError) as info:
        resolve(config, hparams=hp)
    assert len(info.value.problems) == 3
    assert "optimizer.params.lr" in str(info.value) and "gradient_clipping" in str(info.value)


def test_string_batch_size_suggests_the_number():
    with pytest.raises(ConfigError, match="write 8 without quotes"):
        resolve(base(train_micro_batch_size_per_gpu="8"))


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="nope.json") as info:
        resolve(str(path))
    assert "does not exist" in str(info.value)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": true,}\n}\n')
    with pytest.raises(ConfigError) as info:
        resolve(str(path))
    assert f"{path}:3:" in str(info.value)


def test_json_top_level_must_be_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        resolve(str(path))


def test_config_of_wrong_type():
    with pytest.raises(ConfigError, match="dict or a path"):
        resolve(42)
