"""The memory planner: the ZeRO paper's numbers, DeepSpeed's estimators, the guidance order.

Pure logic: no ranks, no process group, no timings.
"""

import json
import re

import pytest
import torch
from torch import nn

import zeroloop
from zeroloop.cli import main
from zeroloop.config import ConfigError
from zeroloop.memory import count_parameters, plan, preflight
from zeroloop.memory.advice import PREFERENCE
from zeroloop.sizes import GB, GiB, parse_size

# The paper's Figure 1: 7.5B parameters, N = 64, mixed-precision Adam (K = 12).
FIGURE_1 = {"ddp": 120.0, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9}
# Planner options and the DeepSpeed estimator arguments that describe the same set-up.
DS_ZERO2 = {"zero2": False, "zero2-offload": True}
DS_ZERO3 = {"zero3-offload": (True, False), "zero3-offload-params": (True, True)}
# ZeRO-3 settings under which the gathered layer is what DeepSpeed's estimator assumes:
# 16-bit parameters and gradients of the largest layer, no prefetch, nothing persistent.
NO_PREFETCH = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 0,
                                     "stage3_param_persistence_threshold": 0}, "bf16": {"enabled": True}}


class TiedLM(nn.Module):
    """An embedding tied to the output head, a trainable body and a frozen adapter."""

    def __init__(self, vocab=1000, width=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Linear(width, width)
        self.frozen = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.frozen.requires_grad_(False)


# --- the ZeRO paper ----------------------------------------------------------------------------


def test_reproduces_zero_paper_figure_1():
    result = plan(params=7.5e9, world_size=64, precision="bf16", optimizer=12)
    shown = {name: round(result[name].model_states / GB, 1) for name in FIGURE_1}
    assert shown == FIGURE_1
    # Exactly (2+2+K)psi, 4psi + K psi/N, 2psi + (2+K)psi/N, (2+2+K)psi/N.
    assert [result[name].model_states for name in FIGURE_1] == [120 * GB, 31_406_250_000, 16_640_625_000,
                                                                 1_875_000_000]


def test_adam_by_name_is_k_12_in_mixed_precision_and_8_in_fp32():
    assert plan(params=1e9, precision="bf16").inputs.k == 12
    fp32 = plan(params=1e9, precision="fp32")
    assert fp32.inputs.k == 8
    assert fp32["ddp"].model_states == (4 + 4 + 8) * 10**9  # no separate fp32 master copy


def test_zero_in_fp32_keeps_deepspeeds_fp32_partition_copy():
    fp32 = plan(params=1e9, world_size=2, precision="fp32")
    assert fp32["zero2"].optimizer == (8 + 4) * 10**9 // 2  # moments + DeepSpeed's fp32 partition
    assert plan(params=1e9, world_size=2, precision="fp32", optimizer=8)["zero2"].optimizer == 4 * 10**9


# --- DeepSpeed's estimators --------------------------------------------------------------------


@pytest.mark.parametrize("psi,per_node", [(7_500_000_000, 8), (1_024_000_000, 4), (85_000_000, 2)])
def test_zero2_equals_deepspeed_estimator_on_one_node(psi, per_node):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    result = plan(params=psi, world_size=per_node)
    for name, offload in DS_ZERO2.items():
        host, device = estimate_zero2_model_states_mem_needs(psi, per_node, 1, cpu_offload=offload)
        assert result[name].deepspeed_comparable == device
        assert result[name].host_per_node == host
        assert (result[name].deepspeed_device, result[name].deepspeed_host) == (device, host)


@pytest.mark.parametrize("psi,largest,per_node,nodes", [(7_500_000_000, 131_072_000, 8, 8),
                                                         (1_024_000_000, 50_000_000, 4, 1)])
def test_zero3_offload_equals_deepspeed_estimator(psi, largest, per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    result = plan(params=psi, largest_layer=largest, world_size=per_node * nodes, devices_per_node=per_node,
                  ds_config=NO_PREFETCH)
    for name, (offload, offload_params) in DS_ZERO3.items():
        for zero_init in (True, False):
            host, device, _ = estimate_zero3_model_states_mem_needs(
                psi, largest, per_node, nodes, cpu_offload=offload, cpu_offload_params=offload_params,
                zero_init=zero_init)
            priced = plan(params=psi, largest_layer=largest, world_size=per_node * nodes,
                          devices_per_node=per_node, ds_config=NO_PREFETCH, zero_init=zero_init)[name]
            assert (priced.deepspeed_comparable, priced.host_per_node) == (device, host)
        assert result[name].live_params == 4 * largest  # DeepSpeed's "4 x largest layer"


def test_zero3_differs_from_deepspeed_by_the_16bit_parameter_partition():
    """DeepSpeed's ZeRO-3 estimate is 18 psi/N + 4 x largest layer; it leaves out either the
    16-bit parameter shard or the fp32 gradient shard (docs/memory-planner.md)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    psi, largest, n = 7_500_000_000, 131_072_000, 64
    zero3 = plan(params=psi, largest_layer=largest, world_size=n, devices_per_node=8,
                 ds_config=NO_PREFETCH)["zero3"]
    host, device, _ = estimate_zero3_model_states_mem_needs(psi, largest, 8, 8, cpu_offload=False,
                                                            cpu_offload_params=False)
    assert zero3.deepspeed_comparable - device == 2 * psi // n
    assert zero3.host_per_node == host


def test_zero2_paper_and_deepspeed_differ_by_fp32_gradients():
    psi, n = 7_500_000_000, 64
    zero2 = plan(params=psi, world_size=n)["zero2"]
    assert zero2.model_states == 2 * psi + 14 * psi // n  # the paper: 16 bytes/param
    assert zero2.fp32_grads == 4 * psi // n  # DeepSpeed: 18 = 2 + 4 (fp32 grads) + 12


def test_deepspeed_printed_estimates_match_the_plan(capsys):
    """The ``*_all_cold`` functions print the numbers the plan reports (GiB, 2 decimals)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    psi, largest = 1_024_000_000, 50_000_000
    capsys.readouterr()
    estimate_zero2_model_states_mem_needs_all_cold(psi, num_gpus_per_node=4)
    estimate_zero3_model_states_mem_needs_all_cold(psi, largest, num_gpus_per_node=4)
    printed = capsys.readouterr().out
    result = plan(params=psi, largest_layer=largest, world_size=4, ds_config=NO_PREFETCH)
    for name in ("zero2", "zero2-offload", "zero3-offload", "zero3-offload-params"):
        host, device = result[name].host_per_node, result[name].deepspeed_comparable
        row = f" {host / GiB:7.2f}GB | {device / GiB:6.2f}GB |"
        assert row in printed, (name, row, printed)


# --- counting a model --------------------------------------------------------------------------


def test_count_parameters_counts_tied_once_and_frozen_as_params():
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = TiedLM()
    counts = count_parameters(model)
    embed, body = 1000 * 64, 64 * 64 + 64
    assert counts.total == embed + 2 * body
    assert counts.trainable == embed + body
    assert counts.frozen == body
    assert counts.largest_layer == embed
    assert (counts.total, counts.largest_layer) == model_to_params(model)
    assert counts.persistent == counts.total  # every tensor is under the default 1e5 elements
    assert count_parameters(model, persistence_threshold=10_000).persistent == 2 * body  # not the embedding


def test_frozen_parameters_get_no_gradients_or_optimizer_state():
    model = TiedLM()
    counts = count_parameters(model)
    result = plan(model, world_size=2, precision="bf16")
    assert result["ddp"].params == 2 * counts.total
    assert result["ddp"].grads == 2 * counts.trainable
    assert result["ddp"].optimizer == 12 * counts.trainable
    assert result["zero3"].params == counts.total  # 2 bytes x total / 2 ranks


def test_shared_storage_across_parameter_objects_counts_once():
    model = TiedLM()
    model.head.weight = nn.Parameter(model.embed.weight.data)  # same storage, new Parameter
    assert count_parameters(model).total == 1000 * 64 + 2 * (64 * 64 + 64)


def test_meta_device_models_are_counted_by_identity():
    with torch.device("meta"):
        model = TiedLM()
    assert count_parameters(model).total == 1000 * 64 + 2 * (64 * 64 + 64)


# --- recommendation order ----------------------------------------------------------------------


def test_recommends_zero2_first_when_it_fits():
    result = plan(params=1e9, world_size=8, device_memory="80GB")
    assert result.recommended == "zero2"
    assert result["ddp"].fits  # DDP fits too, but ZeRO-2 communicates as much for less memory
    assert "ZeRO-2 fits" in result.reason


def test_recommends_zero3_when_the_parameters_do_not_fit():
    result = plan(params=7e9, world_size=8, device_memory="24GB")
    assert not result["zero2"].fits
    assert result.recommended == "zero3"
    assert "parameters alone are 14 GB" in result.reason


def test_recommends_offload_last():
    result = plan(params=7e9, world_size=4, device_memory="24GB", largest_layer=200_000_000)
    assert not result["zero3"].fits and result["zero2-offload"].fits
    assert result.recommended == "zero2-offload"
    assert "host RAM" in result.reason


def test_host_memory_limit_moves_the_choice_to_nvme():
    # NVMe swap buffers are 4 sub-groups of fp32 per rank: a smaller sub_group_size keeps them small.
    cfg = {"zero_optimization": {"stage": 3, "sub_group_size": 1e8}, "bf16": {"enabled": True}}
    result = plan(params=7e9, world_size=8, device_memory="2GB", host_memory="100GB", ds_config=cfg)
    assert result["zero3-offload-params"].host_per_node > 100 * GB
    assert result["zero3-nvme"].host_per_node < 100 * GB
    assert result.recommended == "zero3-nvme"
    assert result["zero3-nvme"].nvme_per_node == (2 + 12 + 4) * 7 * 10**9


@pytest.mark.parametrize("memory_gb", [1, 2, 5, 10, 16, 20, 30, 60, 200])
def test_recommendation_is_the_first_fitting_option_in_guidance_order(memory_gb):
    result = plan(params=7e9, world_size=8, device_memory=memory_gb * GB, largest_layer=100_000_000)
    fitting = [name for name in PREFERENCE if result[name].fits]
    assert result.recommended == (fitting[0] if fitting else None)


def test_one_device_prefers_plain_deepspeed_then_zero_offload():
    assert plan(params=1e8, world_size=1, device_memory="80GB").recommended == "ddp"
    assert plan(params=7e9, world_size=1, device_memory="80GB").recommended == "zero2-offload"


def test_nothing_fits_says_what_to_change():
    result = plan(params=1e12, world_size=8, device_memory="1GB")
    assert result.recommended is None
    assert "add devices" in result.reason


def test_no_device_memory_prices_without_a_verdict():
    result = plan(params=1e9, world_size=8)
    assert result.recommended is None and all(o.fits is None for o in result.options)
    assert "device_memory" in result.reason


def test_activations_count_toward_the_fit_and_checkpointing_shrinks_them():
    args = dict(params=1e9, world_size=8, micro_batch=8, seq_len=2048, hidden_size=2048, layers=24)
    without = plan(**args)
    with_ckpt = plan(**args, activation_checkpointing=True)
    unit = 8 * 2048 * 2048  # s * b * h, 2 bytes each in bf16
    assert without.activations == (34 * unit * 24, 2 * unit * 24 + 34 * unit)
    assert without["zero2"].activations == 34 * unit * 24
    assert with_ckpt["zero2"].device_total < without["zero2"].device_total
    tight = without["zero2"].device_total - 1
    assert not plan(**args, device_memory=tight)["zero2"].fits
    assert plan(**args, device_memory=tight, activation_checkpointing=True).recommended == "zero2"


# --- communication buffers ---------------------------------------------------------------------


def test_default_buckets_dominate_a_small_model_and_the_plan_says_what_to_set():
    result = plan(params=91e6, world_size=2, precision="fp32", hidden_size=768)
    assert result["zero2"].buffers == 5e8 * 4  # one 5e8-element fp32 reduce bucket
    assert result["zero2"].buffers_touched == 91e6 * 4  # what a CPU commits of it
    warned = {w.split(":")[0] for w in result.warnings}
    assert warned == {"ZeRO-1 (Pos)", "ZeRO-2 (Pos+g)", "ZeRO-3 (Pos+g+p)"}
    assert all(f"reduce_bucket_size to {768 * 768}" in w for w in result.warnings)


def test_small_model_with_default_buckets_fits_ddp_but_not_zero2():
    result = plan(params=91e6, world_size=2, precision="fp32", device_memory="2.5GB")
    assert result["ddp"].fits and not result["zero2"].fits
    assert result.recommended == "ddp"
    assert "reduce buckets" in result.reason


def test_bucket_sizes_come_from_the_deepspeed_config():
    cfg = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e6, "overlap_comm": True}}
    result = plan(params=91e6, world_size=2, ds_config=cfg)
    assert result["zero2"].buffers == 2 * 5_000_000 * 4  # double-buffered, fp32 (the config's precision)
    assert result.warnings == ()
    assert result.inputs.current == "zero2"


def test_auto_buckets_resolve_from_the_hidden_size():
    cfg = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                 "stage3_prefetch_bucket_size": "auto"}}
    result = plan(params=1e8, world_size=2, ds_config=cfg, hidden_size=1024)
    assert result.inputs.buckets.reduce_bucket_size == 1024 * 1024
    assert result.inputs.buckets.prefetch_bucket_size == int(0.9 * 1024 * 1024)


def test_large_models_get_no_bucket_warning():
    assert plan(params=7e9, world_size=8).warnings == ()


def test_the_config_selects_the_current_option():
    cfg = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                 "offload_param": {"device": "cpu"}}, "bf16": {"enabled": True}}
    result = plan(params=1e9, world_size=2, ds_config=cfg)
    assert result.inputs.current == "zero3-offload-params"
    assert result.inputs.precision == "bf16"


# --- pre-flight --------------------------------------------------------------------------------


def test_preflight_is_silent_when_the_config_fits():
    cfg = {"zero_optimization": {"stage": 2}}
    assert preflight(TiedLM(), cfg, world_size=2, device_memory="10GB") is None


def test_preflight_names_the_option_that_would_fit():
    model = TiedLM(vocab=100_000, width=256)  # 25.7M parameters
    cfg = {"zero_optimization": {"stage": 0, "reduce_bucket_size": 1e6}, "bf16": {"enabled": True}}
    result = plan(model, world_size=4, ds_config=cfg)
    between = (result["zero2"].device_total + result["ddp"].device_total) // 2
    message = preflight(model, cfg, world_size=4, device_memory=between)
    assert message.startswith("memory pre-flight: DDP baseline (ZeRO-0) needs about")
    assert "ZeRO-2 (Pos+g) would" in message and '"stage": 2' in message


def test_preflight_reads_the_memory_it_can_see(monkeypatch):
    model, cfg = TiedLM(), {"zero_optimization": {"stage": 2}}
    need = plan(model, world_size=2, ds_config=cfg)["zero2"].device_total
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    # On a GPU: free memory plus what this process holds, faked on both sides of the need.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *args: need // 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *args: (need - need // 4, 80 * GB))
    assert preflight(model, cfg, world_size=2) is None  # exactly the need
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *args: (need - need // 4 - 1, 80 * GB))
    message = preflight(model, cfg, world_size=2)
    assert message.startswith("memory pre-flight: ZeRO-2") and "is available" in message
    # On a CPU: the host's MemAvailable, which this machine's figure decides.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with open("/proc/meminfo", encoding="ascii") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    message = preflight(model, cfg, world_size=2)
    assert (message is None) == (need <= available), (need, available, message)


# --- parsing, errors ---------------------------------------------------------------------------


def test_sizes_accept_gb_and_gib():
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size(1.5e9) == 1_500_000_000


def test_every_bad_argument_is_named_at_once():
    with pytest.raises(ConfigError) as info:
        plan(params=-1, world_size=0, precision="fp8", device_memory="lots", optimizer="rmsprop",
             micro_batch=4, host_buffer_factor=0.5, ds_config={"zero_optimization": {"stage": 5}})
    named = [problem.split(":")[0] for problem in info.value.problems]
    assert named == ["ds_config.zero_optimization.stage", "params", "world_size", "precision",
                     "device_memory", "seq_len, hidden_size, layers", "optimizer", "host_buffer_factor"]
    assert "zeroloop.plan arguments has 8 problems" in str(info.value)
    assert "24GB" in str(info.value)  # the fix is in the message


def test_model_and_params_are_exclusive():
    with pytest.raises(ConfigError, match="model / params: give exactly one"):
        plan(TiedLM(), params=1e6)
    with pytest.raises(ConfigError, match="model / params"):
        plan()


def test_devices_per_node_must_divide_world_size():
    with pytest.raises(ConfigError, match="devices_per_node: world_size .6. must be a multiple"):
        plan(params=1e9, world_size=6, devices_per_node=4)


def test_bad_bucket_values_are_named():
    with pytest.raises(ConfigError, match="ds_config.zero_optimization.reduce_bucket_size: must be a number"):
        plan(params=1e9, ds_config={"zero_optimization": {"reduce_bucket_size": "big"}})


def test_plan_is_exported():
    assert zeroloop.plan is plan and "plan" in zeroloop.__all__


# --- the command line --------------------------------------------------------------------------


def test_cli_prints_a_table_with_units(capsys):
    assert main(["plan", "--params", "7e9", "--gpus", "4", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "GB = 1e9 bytes" in out and "GiB = 2^30 bytes" in out
    assert re.search(r"ZeRO-3 \(Pos\+g\+p\)\s+3.5 GB\s+3.5 GB\s+21 GB\s+28 GB", out)
    assert "recommended: zero2-offload" in out


def test_cli_json_is_machine_readable(capsys):
    assert main(["plan", "--params", "7.5B", "--gpus", "8", "--nodes", "8", "--gpu-memory", "32GB",
                 "--precision", "bf16", "--seq-len", "2048", "--micro-batch", "1", "--hidden", "4096",
                 "--layers", "32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    options = {o["name"]: o for o in data["options"]}
    assert options["zero1"]["model_states"] == 31_406_250_000
    assert data["inputs"]["world_size"] == 64 and data["inputs"]["device_memory"] == 32 * 10**9
    assert data["recommended"] == "zero2" and data["units"] == "bytes"
    assert options["zero2"]["activations"] == 34 * 2048 * 4096 * 32


def test_cli_reads_a_deepspeed_config(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}))
    args = ["plan", "--params", "1e9", "--gpus", "2", "--gpu-memory", "80GiB", "--config", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ZeRO-3 (Pos+g+p) *" in out and "fp16" in out


def test_cli_errors_name_the_flags(capsys):
    args = ["plan", "--params", "lots", "--gpus", "2", "--gpu-memory", "24 bananas", "--layers", "4"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--params: must be a whole number" in err
    assert "--gpu-memory: cannot read '24 bananas'" in err
    assert "--micro-batch, --seq-len, --hidden:" in err


def test_without_device_memory_the_reason_names_the_flag_and_the_common_sizes():
    result = plan(params=7e9, world_size=8)
    assert result.recommended is None
    assert "--gpu-memory" in result.reason
    # The same choice as with the size given.
    for size, choice in (("24GB", "zero3"), ("80GB", "zero2")):
        assert f"{size[:-2]} GB: {choice}" in result.reason
        assert plan(params=7e9, world_size=8, device_memory=size).recommended == choice
