"""TrainerLoop on one rank (real DeepSpeed engine on CPU) and its pure helpers."""

import json
import os

import deepspeed
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import MLPRegressor, RegressionData, make_model
from zeroloop import ConfigError, Hyperparameters, LogSettings, TrainerLoop, runtime
from zeroloop.corpus import ByteCorpus, read_corpus
from zeroloop.data import count_rows, count_tokens, move_to_device
from zeroloop.gpt import GPT
from zeroloop.testing import engine_loop, single_process, tiny_config

QUIET = LogSettings(every=1, progress_bar=False)


def train_one_rank(model, config=None, **kwargs):
    kwargs.setdefault("max_steps", 2)
    kwargs.setdefault("log", QUIET)
    with single_process():
        loop_class = kwargs.pop("loop_class", TrainerLoop)
        loop = loop_class(model, config or tiny_config(), **kwargs)
        return loop, loop.train()


# --- compute_loss's three default shapes ----------------------------------------------------


class HFStyle(nn.Module):
    """Returns an object with .loss, like a Hugging Face model."""

    def __init__(self):
        super().__init__()
        self.inner = MLPRegressor()

    def forward(self, x, y):
        return type("Output", (), {"loss": self.inner(x, y)})()


def make_hf_style():
    torch.manual_seed(0)
    return HFStyle()


def assert_losses_are_the_hand_loops(summary, make, data, loss=None):
    """The logged losses are those of the hand-written engine loop on the same model and data
    (one micro-batch a step: each step's loss is that micro-batch's)."""
    with single_process():
        deepspeed.init_distributed()
        reference = engine_loop(make(), tiny_config(), data, summary.steps, loss=loss).micro_losses
    assert summary.steps == 2 and len(reference) == 2
    assert [record["loss"] for record in summary.history] == reference
    assert summary.final_loss == reference[-1]


def test_default_loss_from_hf_style_output(tmp_path):
    _, summary = train_one_rank(make_hf_style(), train_data=RegressionData(), output_dir=tmp_path)
    assert_losses_are_the_hand_loops(summary, make_hf_style, RegressionData())


def test_default_loss_from_scalar_output(tmp_path):
    _, summary = train_one_rank(make_model(), train_data=RegressionData(), output_dir=tmp_path)
    assert_losses_are_the_hand_loops(summary, make_model, RegressionData())


def test_default_loss_from_inputs_targets_and_loss_fn(tmp_path):
    data = RegressionData()
    pairs = TensorDataset(data.x, data.y)
    _, summary = train_one_rank(make_model(), train_data=pairs, loss_fn=nn.functional.mse_loss,
                                output_dir=tmp_path)
    assert_losses_are_the_hand_loops(summary, make_model, pairs,
                                     loss=lambda engine, batch: nn.functional.mse_loss(engine(batch[0]), batch[1]))


def test_model_without_loss_says_how_to_fix(tmp_path):
    data = RegressionData()
    with pytest.raises(TypeError, match="pass loss_fn"):
        train_one_rank(make_model(), train_data=TensorDataset(data.x), output_dir=tmp_path)


# --- what people see ------------------------------------------------------------------------


def gpt_and_corpus(seq_len=32, dropout=0.0):
    torch.manual_seed(0)
    model = GPT(n_layer=1, n_head=2, n_embd=32, block_size=seq_len, dropout=dropout)
    return model, ByteCorpus(read_corpus(max_bytes=40_000), seq_len)


def test_metrics_jsonl_resolved_config_and_summary(tmp_path):
    model, corpus = gpt_and_corpus()
    config = dict(tiny_config(micro=4), train_batch_size="auto", gradient_clipping="auto")
    _, summary = train_one_rank(model, config, train_data=corpus, output_dir=tmp_path, max_steps=3)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_sec", "tokens_per_sec"} <= set(record)
        assert record["samples_per_sec"] > 0 and record["grad_norm"] > 0
        assert record["tokens_per_sec"] == pytest.approx(record["samples_per_sec"] * 32)
        assert record["lr"] == 1e-3
    resolved = json.loads((tmp_path / "ds_config.resolved.json").read_text())
    assert resolved["train_batch_size"] == 4 and resolved["gradient_clipping"] == 1.0
    assert summary.steps == 3 and summary.samples == 12 and summary.tokens == 12 * 32
    assert summary.final_loss == records[-1]["loss"]
    assert summary.history == records


def test_logging_every_n_steps_and_the_final_step(tmp_path):
    _, summary = train_one_rank(make_model(), train_data=RegressionData(), output_dir=tmp_path, max_steps=5,
                                log=LogSettings(every=2, progress_bar=False))
    assert [h["step"] for h in summary.history] == [2, 4, 5]
    assert summary.samples == 10  # every micro-batch of 2 counted once


def test_progress_bar_shows_steps_and_loss(tmp_path, capsys):
    train_one_rank(make_model(), train_data=RegressionData(), output_dir=tmp_path, max_steps=3,
                   log=LogSettings(every=1))
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err and "samples/s=" in err


def test_hooks_are_called_in_order(tmp_path):
    class Recording(TrainerLoop):
        calls = []

        def on_train_start(self):
            self.calls.append("start")

        def on_step_end(self, step, metrics):
            self.calls.append(("step", step, "loss" in metrics))

        def on_evaluate(self, metrics):
            self.calls.append(("eval", metrics["step"], round(metrics["eval_loss"], 6) > 0))

        def on_train_end(self, summary):
            self.calls.append(("end", summary.steps))

    train_one_rank(make_model(), train_data=RegressionData(), eval_data=RegressionData(n=8, seed=2),
                   output_dir=tmp_path, max_steps=4, eval_every=2, loop_class=Recording,
                   log=LogSettings(every=2, progress_bar=False))
    assert Recording.calls == ["start", ("step", 1, False), ("step", 2, True), ("eval", 2, True),
                               ("step", 3, False), ("step", 4, True), ("eval", 4, True), ("end", 4)]


def test_eval_loss_is_the_sample_weighted_mean(tmp_path):
    eval_data = RegressionData(n=10, seed=3)
    loop, summary = train_one_rank(make_model(), train_data=RegressionData(), eval_data=eval_data,
                                   output_dir=tmp_path, max_steps=1)
    # Recompute with the trained weights, outside the loop: a 10-sample set in batches of 2.
    model, device = loop.engine.module, loop.engine.device
    with torch.no_grad():
        expected = nn.functional.mse_loss(model.net(eval_data.x.to(device)), eval_data.y.to(device)).item()
    assert summary.eval_loss == pytest.approx(expected, rel=1e-6)


# --- data, epochs, seeds --------------------------------------------------------------------


def test_epochs_count_optimizer_steps_and_reshuffle(tmp_path):
    seen = []

    class Recording(TrainerLoop):
        def compute_loss(self, batch):
            seen.append(batch["x"][:, 0].tolist())
            return super().compute_loss(batch)

    _, summary = train_one_rank(make_model(), tiny_config(micro=4, ga=2), train_data=RegressionData(n=32),
                                output_dir=tmp_path, max_steps=None, epochs=2, loop_class=Recording)
    assert summary.steps == 8 and summary.micro_steps == 16 and summary.epochs == 2
    first, second = sorted(sum(seen[:8], [])), sorted(sum(seen[8:], []))
    assert first == second  # both epochs cover the same samples...
    assert seen[:8] != seen[8:]  # ...in a different order (set_epoch reshuffled)


def test_a_dataloader_gives_the_micro_batch_and_keeps_its_order(tmp_path):
    seen = []

    class Recording(TrainerLoop):
        def compute_loss(self, batch):
            seen.append(batch["x"])
            return super().compute_loss(batch)

    data = RegressionData(n=12)
    loader = DataLoader(data, batch_size=3, shuffle=False)
    config = dict(tiny_config(), train_micro_batch_size_per_gpu="auto")
    _, summary = train_one_rank(make_model(), config, train_data=loader, output_dir=tmp_path,
                                max_steps=None, epochs=1, loop_class=Recording)
    assert summary.steps == 4 and summary.samples == 12
    assert torch.equal(torch.cat(seen), data.x)  # shuffle=False: the dataset's order


def test_same_seed_same_losses_with_dropout(tmp_path):
    runs = []
    for attempt in range(2):
        model, corpus = gpt_and_corpus(dropout=0.2)
        _, summary = train_one_rank(model, tiny_config(micro=4), train_data=corpus,
                                    output_dir=tmp_path / str(attempt), max_steps=3, seed=7)
        runs.append([h["loss"] for h in summary.history])
    assert runs[0] == runs[1]


def test_bf16_casts_float_inputs_and_keeps_integers(tmp_path):
    dtypes = []

    class Recording(TrainerLoop):
        def compute_loss(self, batch):
            dtypes.append((batch["x"].dtype, batch["i"].dtype))
            return self.engine(batch["x"], batch["y"])

    class WithIndex(RegressionData):
        def __getitem__(self, i):
            return dict(super().__getitem__(i), i=torch.tensor(i))

    _, summary = train_one_rank(make_model(), tiny_config(precision="bf16"), train_data=WithIndex(),
                                output_dir=tmp_path, loop_class=Recording)
    assert set(dtypes) == {(torch.bfloat16, torch.int64)}
    assert summary.steps == 2


def test_empty_training_data_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="train_data: is empty"):
        train_one_rank(make_model(), train_data=[], output_dir=tmp_path)


# --- argument errors (before any process group) -----------------------------------------------


def test_bad_arguments_are_reported_together(tmp_path):
    loop = TrainerLoop("not a model", tiny_config(), train_data=RegressionData(), output_dir=tmp_path,
                       max_steps=0, eval_every=-1, log=LogSettings(every=0))
    with pytest.raises(ConfigError) as info:
        loop.setup()
    text = str(info.value)
    assert len(info.value.problems) == 4
    for name in ("model", "max_steps", "eval_every", "log.every"):
        assert f"{name}:" in text


def test_run_length_is_required(tmp_path):
    with pytest.raises(ConfigError, match="max_steps / epochs"):
        TrainerLoop(make_model(), tiny_config(), train_data=RegressionData(), output_dir=tmp_path).setup()


def test_optimizer_twice_and_config_problems_reported_together(tmp_path):
    model = make_model()
    config = dict(tiny_config(), zero_optimisation={})
    loop = TrainerLoop(model, config, train_data=RegressionData(), output_dir=tmp_path, max_steps=1,
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with single_process(), pytest.raises(ConfigError) as info:
        loop.setup()
    text = str(info.value)
    assert "zero_optimisation" in text and "optimizer: given both" in text


def test_loop_argument_contradicting_config(tmp_path):
    loop = TrainerLoop(make_model(), tiny_config(micro=2), train_data=RegressionData(), output_dir=tmp_path,
                       max_steps=1, hparams=Hyperparameters(micro_batch_size=4))
    with single_process(), pytest.raises(ConfigError, match="micro_batch_size=4"):
        loop.setup()


# --- pure helpers ---------------------------------------------------------------------------


def test_move_to_device_casts_floats_and_keeps_structure():
    batch = {"x": torch.ones(2, 3), "ids": torch.ones(2, 3, dtype=torch.long),
             "nested": [torch.zeros(1), (torch.ones(1, dtype=torch.int32), "text")]}
    moved = move_to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert moved["x"].dtype == torch.bfloat16 and moved["ids"].dtype == torch.long
    assert moved["nested"][0].dtype == torch.bfloat16
    assert moved["nested"][1][0].dtype == torch.int32 and moved["nested"][1][1] == "text"
    assert move_to_device(batch, torch.device("cpu"))["x"].dtype == torch.float32


def test_counting_samples_and_tokens():
    assert count_rows({"input_ids": torch.zeros(4, 9, dtype=torch.long)}) == 4
    assert count_tokens({"input_ids": torch.zeros(4, 9, dtype=torch.long)}) == 36
    assert count_tokens((torch.zeros(4, 9), torch.zeros(4, 9, dtype=torch.long))) == 36
    assert count_tokens({"x": torch.zeros(4, 9), "y": torch.zeros(4, dtype=torch.long)}) is None


def test_rank_env_for_plain_python(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert runtime.ensure_rank_env() is True
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert int(os.environ["MASTER_PORT"]) > 0


def test_multi_rank_env_without_master_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        runtime.ensure_rank_env()


def test_cpu_threads_split_between_local_ranks(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    before = torch.get_num_threads()
    try:
        assert runtime.set_cpu_threads() == 4
        assert os.environ["OMP_NUM_THREADS"] == "4" and torch.get_num_threads() == 4
        assert runtime.set_cpu_threads() is None  # respected once set
    finally:
        torch.set_num_threads(before)


def test_own_shm_buffer_only_under_the_deepspeed_launcher(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29512")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert runtime.own_shm_buffer() is None
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert runtime.own_shm_buffer() == f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29512_1"


def test_memory_preflight_warns_before_initialize(tmp_path, monkeypatch, caplog):
    import zeroloop.memory

    calls, real_preflight = [], zeroloop.memory.preflight

    def tiny_memory(model, ds_config, world_size, device_memory=None):
        calls.append((ds_config["zero_optimization"]["stage"], world_size))
        return real_preflight(model, ds_config, world_size, device_memory=1000)  # a 1 kB device

    monkeypatch.setattr(zeroloop.memory, "preflight", tiny_memory)
    import logging

    logger = logging.getLogger("zeroloop")
    logger.addHandler(caplog.handler)
    try:
        train_one_rank(make_model(), train_data=RegressionData(), output_dir=tmp_path / "on")
        train_one_rank(make_model(), train_data=RegressionData(), output_dir=tmp_path / "off", preflight=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert calls == [(0, 1)]  # once, for the first run only
    assert "memory pre-flight" in caplog.text and "per device" in caplog.text


def test_optimizer_and_scheduler_passed_in(tmp_path):
    config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1_000_000}
    _, summary = train_one_rank(
        make_model(), config, train_data=RegressionData(), output_dir=tmp_path, max_steps=3,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step))
    assert [h["lr"] for h in summary.history] == pytest.approx([0.05, 0.025, 0.0125])


def test_cpu_info_is_asked_once_per_process(monkeypatch):
    import cpuinfo

    answers = iter([{"arch": "first"}, {"arch": "second"}])
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: next(answers))
    runtime.cache_cpu_info()
    runtime.cache_cpu_info()  # idempotent: not wrapped twice
    assert cpuinfo.get_cpu_info() == {"arch": "first"} and cpuinfo.get_cpu_info() == {"arch": "first"}
