"""Config sections checked against what DeepSpeed builds from them: pure logic, no ranks.

The optimizer and scheduler against the constructors DeepSpeed will call (zeroloop.constructors),
zero_optimization, compile, the monitors and comms_logger against DeepSpeed's pydantic models,
activation_checkpointing against its defaults table (zeroloop.schemas), numbers written as
strings everywhere (zeroloop.expected).
"""

import pytest
import torch

from zeroloop.config import ConfigError, Hyperparameters, resolve_config
from zeroloop.constructors import optimizer_names, optimizer_target, scheduler_target
from zeroloop.expected import Expected, from_annotation, value_problems


def base(**overrides):
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": 2}}
    config.update(overrides)
    return config


def problems_of(config, **kwargs):
    try:
        resolve_config(config, world_size=2, total_steps=100, **kwargs)
    except ConfigError as e:
        return e.problems
    return []


def optimizer(kind, **params):
    """The base config with an optimizer section of this type and these parameters."""
    return base(optimizer={"type": kind, "params": params})


def scheduler(kind, **params):
    """The base config with a scheduler section of this type and these parameters."""
    return base(scheduler={"type": kind, "params": params})


OFFLOAD = {"stage": 2, "offload_optimizer": {"device": "cpu"}}

# The examples of issue 16's "Why" list: each was a raw DeepSpeed or torch error inside
# deepspeed.initialize or at the first step.
ISSUE_EXAMPLES = [
    ("unknown optimizer", optimizer("Adamm", lr=1e-3),
     "optimizer.type: 'Adamm' is not an optimizer DeepSpeed can build; did you mean 'Adam'?"),
    ("optimizer param typo", optimizer("AdamW", lr=1e-3, weight_decays=0.1),
     "optimizer.params.weight_decays: FusedAdam (DeepSpeed's 'AdamW' without offload) takes no parameter "
     "'weight_decays'; did you mean 'weight_decay'?"),
    ("lr as a string", optimizer("AdamW", lr="1e-3"),
     "optimizer.params.lr: must be a number, got '1e-3'; write 1e-3 without quotes"),
    ("unknown scheduler", scheduler("WarmupCosine", total_num_steps=10),
     "scheduler.type: 'WarmupCosine' is not a scheduler DeepSpeed can build; did you mean 'WarmupCosineLR'?"),
    ("scheduler param typo", scheduler("WarmupLR", warmup_num_step=10),
     "scheduler.params.warmup_num_step: DeepSpeed's WarmupLR takes no parameter 'warmup_num_step'; "
     "did you mean 'warmup_num_steps'?"),
    ("compile enabled", base(compile={"enabled": True}),
     "compile.enabled: unknown key; DeepSpeed compiles when engine.compile() is called"),
]


@pytest.mark.parametrize("name, config, expected", ISSUE_EXAMPLES, ids=[c[0] for c in ISSUE_EXAMPLES])
def test_issue_examples_name_the_key(name, config, expected):
    problems = problems_of(config)
    assert len(problems) == 1, problems
    assert expected in problems[0]


BAD_SECTIONS = [
    ("betas too short", optimizer("Adam", betas=[0.9]),
     "optimizer.params.betas: must be a list of 2 numbers, got 1 value ([0.9])"),
    ("a beta as a string", optimizer("Adam", betas=[0.9, "0.99"]),
     "optimizer.params.betas[1]: must be a number, got '0.99'; write 0.99 without quotes"),
    ("bool as a number", optimizer("Adam", amsgrad=1),
     "optimizer.params.amsgrad: must be true or false, got 1"),
    ("torch optimizer in the wrong case", optimizer("sgd", lr=0.1),
     "optimizer.type: 'sgd' is not an optimizer DeepSpeed can build; did you mean 'SGD'?"),
    ("torch optimizer param typo", optimizer("SGD", lr=0.1, momentm=0.9),
     "optimizer.params.momentm: torch.optim.SGD takes no parameter 'momentm'; did you mean 'momentum'?"),
    ("what DeepSpeed passes itself", base(optimizer={"type": "Adam", "params": {"adamw_mode": False}},
                                         zero_optimization=OFFLOAD),
     "optimizer.params.adamw_mode: DeepSpeedCPUAdam (DeepSpeed's 'Adam' with ZeRO-Offload) gets it from "
     "DeepSpeed, not from the config; DeepSpeed sets it from the optimizer type; use 'adam_w_mode'"),
    ("FusedAdam's parameter under offload", base(optimizer={"type": "Adam", "params": {"set_grad_none": True}},
                                                 zero_optimization=OFFLOAD),
     "optimizer.params.set_grad_none: DeepSpeedCPUAdam (DeepSpeed's 'Adam' with ZeRO-Offload) takes no parameter"),
    ("max_grad_norm", optimizer("Adam", max_grad_norm=1.0),
     "optimizer.params.max_grad_norm: DeepSpeed refuses it as an optimizer parameter; set the top-level "
     "\"gradient_clipping\" instead"),
    ("lamb param typo", optimizer("Lamb", max_coef=10), "did you mean 'max_coeff'?"),
    ("scheduler length missing", scheduler("WarmupDecayLR", warmup_num_steps=10),
     "scheduler.params.total_num_steps: required by DeepSpeed's WarmupDecayLR; set it (\"auto\" takes the run's "
     "length)"),
    ("whole number written 10.0", scheduler("WarmupLR", warmup_num_steps=10.0),
     "scheduler.params.warmup_num_steps: must be a whole number, got 10.0; write 10"),
    ("torch scheduler value as a string", scheduler("CosineAnnealingLR", T_max="100"),
     "scheduler.params.T_max: must be a whole number, got '100'; write 100 without quotes"),
    ("scheduler needing a metric", scheduler("ReduceLROnPlateau"),
     "scheduler.type: ReduceLROnPlateau needs the metric at every step() and DeepSpeed's engine calls step() "
     "without one"),
    ("scheduler needing a function", scheduler("LambdaLR"),
     "scheduler.params.lr_lambda: torch.optim.lr_scheduler.LambdaLR needs a Python object here"),
    ("scheduler choice", scheduler("CyclicLR", base_lr=0.1, max_lr=1.0, mode="triangle"),
     "scheduler.params.mode: must be one of 'triangular', 'triangular2', 'exp_range', got 'triangle'"),
    ("offload ratio as a string", base(zero_optimization={"stage": 3, "offload_optimizer": {"device": "cpu",
                                                                                            "ratio": "0.5"}}),
     "zero_optimization.offload_optimizer.ratio: must be a number, got '0.5'; write 0.5 without quotes"),
    ("offload ratio above its bound", base(zero_optimization={"stage": 3, "offload_optimizer": {"device": "cpu",
                                                                                                "ratio": 2}}),
     "zero_optimization.offload_optimizer.ratio: must be <= 1.0, got 2"),
    ("offload key typo", base(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu",
                                                                                   "pin_memry": True}}),
     "zero_optimization.offload_optimizer.pin_memry: unknown key (did you mean "
     "zero_optimization.offload_optimizer.'pin_memory'?)"),
    ("offload as a string", base(zero_optimization={"stage": 2, "offload_optimizer": "cpu"}),
     "zero_optimization.offload_optimizer: must be a JSON object or null, got 'cpu'"),
    ("DeepSpeed's own validator", base(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu",
                                                                                            "ratio": 0.5}}),
     "zero_optimization: Partial offloading only supported for ZeRO Stage 3."),
    ("deprecated key with its replacement", base(zero_optimization={
        "stage": 3, "stage3_gather_16bit_weights_on_model_save": True, "stage3_gather_fp16_weights_on_model_save": True}),
     "zero_optimization: Cannot provide deprecated parameter 'stage3_gather_fp16_weights_on_model_save'"),
    ("ZeRO number as a string", base(zero_optimization={"stage": 3, "stage3_max_live_parameters": "1e9"}),
     "zero_optimization.stage3_max_live_parameters: must be a whole number, got '1e9'; write 1e9 without quotes"),
    ("monitor bool as a string", base(tensorboard={"enabled": "true"}),
     "tensorboard.enabled: must be true or false, got 'true'"),
    ("monitor key typo", base(tensorboard={"enabled": True, "output_dir": "runs"}),
     "tensorboard.output_dir: unknown key (did you mean tensorboard.'output_path'?)"),
    ("wandb key typo", base(wandb={"enabled": True, "projet": "x"}), "wandb.projet: unknown key (did you mean"),
    ("comet number as a string", base(comet={"enabled": True, "samples_log_interval": "100"}),
     "comet.samples_log_interval: must be a whole number, got '100'; write 100 without quotes"),
    ("comms_logger key typo", base(comms_logger={"enabled": True, "verbos": True}),
     "comms_logger.verbos: unknown key (did you mean comms_logger.'verbose'?)"),
    ("monitor section not an object", base(wandb=True), "wandb: must be a JSON object, got bool"),
    ("activation checkpointing typo", base(activation_checkpointing={"partitioned_activations": True}),
     "activation_checkpointing.partitioned_activations: unknown key (did you mean "
     "activation_checkpointing.'partition_activations'?)"),
    ("activation checkpointing bool", base(activation_checkpointing={"cpu_checkpointing": 1}),
     "activation_checkpointing.cpu_checkpointing: must be true or false, got 1"),
    ("activation checkpointing number as a string", base(activation_checkpointing={"number_checkpoints": "4"}),
     "activation_checkpointing.number_checkpoints: a number written as a string ('4'); write 4 without quotes"),
    ("top-level number as a string", base(steps_per_print="10"),
     "steps_per_print: a number written as a string ('10'); write 10 without quotes"),
    ("number as a string in a section without a schema", base(flops_profiler={"enabled": True, "profile_step": "5"}),
     "flops_profiler.profile_step: a number written as a string ('5')"),
]


@pytest.mark.parametrize("name, config, expected", BAD_SECTIONS, ids=[c[0] for c in BAD_SECTIONS])
def test_bad_section_names_the_key(name, config, expected):
    problems = problems_of(config)
    assert any(expected in p for p in problems), problems


def test_compile_passes_are_deepspeed_choices():
    from deepspeed.compile.config import CompileConfig

    problems = problems_of(base(compile={"deepcompile": True, "passes": ["z3", "zz"]}))
    if "passes" in CompileConfig.model_fields:  # DeepSpeed 0.19
        assert len(problems) == 1 and problems[0].startswith("compile.passes[1]: must be one of 'z1', 'z3'")
    else:
        assert problems == ["compile.passes: unknown key (did you mean compile.'deepcompile'?)"] or \
            problems[0].startswith("compile.passes: unknown key")


GOOD_SECTIONS = [
    base(optimizer={"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                 "weight_decay": 0.1, "bias_correction": True}}),
    base(optimizer={"type": "adam", "params": {"lr": 1e-3, "torch_adam": True, "adam_w_mode": False,
                                               "foreach": False}}),
    base(optimizer={"type": "Adam", "params": {"lr": 1e-3, "fp32_optimizer_states": False}},
         zero_optimization=OFFLOAD),
    base(optimizer={"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}},
         scheduler={"type": "OneCycleLR", "params": {"max_lr": [0.1], "total_steps": 100}}),
    base(scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_num_steps": 10,
                                                        "warmup_min_lr": [0.0], "warmup_max_lr": "auto"}}),
    base(scheduler={"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_type": "linear"}}),
    base(scheduler={"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3}}),
    base(zero_optimization={"stage": 3, "stage3_max_live_parameters": 1e9, "reduce_bucket_size": "auto",
                            "overlap_comm": True, "offload_param": {"device": "cpu", "pin_memory": True},
                            "offload_optimizer": {"device": "cpu", "ratio": 0.5}}),
    base(compile={"deepcompile": False}, tensorboard={"enabled": True, "output_path": "runs", "job_name": "7"},
         comms_logger={"enabled": False}, activation_checkpointing={"partition_activations": True,
                                                                   "number_checkpoints": 4},
         checkpoint={"tag_validation": "Warn"}),
]


@pytest.mark.parametrize("config", GOOD_SECTIONS)
def test_valid_sections_pass(config):
    assert problems_of(config) == []


def test_every_section_problem_at_once():
    config = base(optimizer={"type": "AdamW", "params": {"lr": "1e-3", "weight_decays": 0.1}},
                  scheduler={"type": "WarmupCosine"}, compile={"enabled": True},
                  tensorboard={"enabled": "yes"}, activation_checkpointing={"profile": "false"},
                  train_micro_batch_size_per_gpu="4")
    problems = problems_of(config)
    keys = [p.split(":")[0] for p in problems]
    assert keys == ["train_micro_batch_size_per_gpu", "optimizer.params.lr", "optimizer.params.weight_decays",
                    "scheduler.type", "compile.enabled", "tensorboard.enabled", "activation_checkpointing.profile"]


def test_values_filled_from_the_loop_meet_the_constructor_too():
    config = base(optimizer={"type": "AdamW", "params": {"lr": "auto"}})
    problems = problems_of(config, hparams=Hyperparameters(lr="3e-4"))
    assert problems == ["optimizer.params.lr: must be a number, got '3e-4'; write 3e-4 without quotes"]


def test_the_class_checked_is_the_one_deepspeed_builds_here():
    def built(name, params=None, zero=None):
        cfg = {"zero_optimization": zero or {"stage": 2}}
        return optimizer_target(name, params or {}, cfg).cls

    assert built("AdamW").__name__ == "FusedAdam"
    assert built("AdamW", zero=OFFLOAD).__name__ == "DeepSpeedCPUAdam"
    assert built("Adam", {"torch_adam": True, "adam_w_mode": False}) is torch.optim.Adam
    assert built("Adam", {"torch_adam": True}) is torch.optim.AdamW  # DeepSpeed's default adam_w_mode
    assert built("adagrad") is torch.optim.Adagrad
    assert built("Adagrad", zero=OFFLOAD).__name__ == "DeepSpeedCPUAdagrad"
    assert built("RMSprop") is torch.optim.RMSprop


def test_names_are_read_from_deepspeed_and_torch():
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    names = [n.lower() for n in optimizer_names()]
    assert set(DEEPSPEED_OPTIMIZERS) <= set(names) and "sgd" in names
    for name in lr_schedules.VALID_LR_SCHEDULES:
        assert scheduler_target(name).cls is getattr(lr_schedules, name)
    assert scheduler_target("StepLR").cls is torch.optim.lr_scheduler.StepLR


def test_an_optimizer_from_a_missing_package_says_which():
    import importlib.util

    if importlib.util.find_spec("mup") is not None:
        pytest.skip("mup is installed")
    assert "is built from the mup package, which is not installed" in problems_of(
        base(optimizer={"type": "MuAdam", "params": {}}))[0]


# --- what a value must be, read from annotations ------------------------------------------------


@pytest.mark.parametrize("annotation, good, bad, message", [
    ("float | torch.Tensor", 0.1, "0.1", "must be a number, got '0.1'; write 0.1 without quotes"),
    ("tuple[float, float]", [0.9, 0.99], [0.9, 0.99, 0.9], "must be a list of 2 numbers, got 3 values"),
    ("bool | None", None, 0, "must be true or false or null, got 0"),
    ("Literal['min', 'max']", "min", "mean", "must be one of 'min', 'max', got 'mean'"),
    ("list[int]", [1, 2], [1, 2.5], "x[1]: must be a whole number, got 2.5"),
    ("int", 3, True, "must be a whole number, got True"),
])
def test_expected_from_annotation(annotation, good, bad, message):
    expected = from_annotation(annotation, {"torch": torch})
    assert value_problems("x", good, expected) == []
    assert message in value_problems("x", bad, expected)[0]


def test_unknown_types_still_refuse_numbers_written_as_strings():
    assert value_problems("x", "anything", Expected()) == []
    assert value_problems("x", " 2e-5 ", Expected()) == ["x: a number written as a string (' 2e-5 '); write 2e-5 "
                                                         "without quotes"]
    assert value_problems("x", "auto", from_annotation(float)) == []  # resolved or reported by zeroloop.config


def test_issue_examples_stop_the_loop_before_deepspeed_initialize(tmp_path, monkeypatch):
    import deepspeed

    from helpers import RegressionData, make_model
    from zeroloop import TrainerLoop
    from zeroloop.testing import single_process

    def initialize(*args, **kwargs):
        raise AssertionError("deepspeed.initialize was called")

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    for name, config, expected in ISSUE_EXAMPLES:
        loop = TrainerLoop(make_model(), config, train_data=RegressionData(), output_dir=tmp_path / name,
                           max_steps=1)
        with single_process(), pytest.raises(ConfigError) as info:
            loop.setup()
        assert expected in str(info.value) and loop.engine is None, name
