"""TrainerLoop's arguments checked before anything is built: pure logic, plus one real engine
for the batch that could only be seen at the first step."""

import json
import os
import shutil
import tempfile

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import RegressionData, make_model
from zeroloop import ActivationCheckpointing, CheckpointSettings, ConfigError, LogSettings, TrainerLoop
from zeroloop.arguments import batch_problems, client_problems, first_sample, model_problems, output_dir_problems
from zeroloop.testing import single_process, tiny_config


def pairs(n=16, dim=8):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, dim, generator=g), torch.randn(n, 1, generator=g))


def frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def setup_problems(model=None, **kwargs):
    """The problems ``setup()`` reports, on a loop that would otherwise be valid."""
    kwargs.setdefault("train_data", RegressionData())
    kwargs.setdefault("max_steps", 1)
    loop = TrainerLoop(make_model() if model is None else model, tiny_config(), **kwargs)
    with pytest.raises(ConfigError) as info:
        loop.setup()  # raises before the process group: no single_process() needed
    assert loop.engine is None
    return info.value.problems


# --- the examples of issue 16 -------------------------------------------------------------------


def test_no_trainable_parameter(tmp_path):
    problems = setup_problems(frozen(make_model()), output_dir=tmp_path)
    assert problems == ["model: none of MLPRegressor's 4 parameters is trainable (all have requires_grad=False); "
                        "unfreeze the ones to train (p.requires_grad_(True)) before building the loop"]


def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "runs"
    path.write_text("")
    assert setup_problems(output_dir=path) == [f"output_dir: {str(path)!r} is a file, not a folder; pass a folder "
                                               "(it is created if missing)"]


def test_inputs_targets_batches_without_loss_fn(tmp_path):
    problems = setup_problems(nn.Linear(8, 1), train_data=pairs(), output_dir=tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith("train_data: the default compute_loss calls model(*batch) with tuples of 2 items, "
                                  "and Linear.forward(input: torch.Tensor) -> torch.Tensor cannot take that")
    assert "pass loss_fn=... (called as loss_fn(model(inputs), targets)); or override compute_loss" in problems[0]


def test_every_argument_problem_at_once(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    problems = setup_problems(frozen(nn.Linear(8, 1)), train_data=pairs(), output_dir=path, max_steps=0,
                              optimizer="adam")
    assert [p.split(":")[0] for p in problems] == ["max_steps", "model", "output_dir", "optimizer", "train_data"]


def test_bad_values_in_three_settings_objects_in_one_error(tmp_path):
    log = LogSettings(every=0)
    checkpoint = CheckpointSettings(keep=0)
    activation = ActivationCheckpointing(backend="reentrant")
    problems = setup_problems(output_dir=tmp_path, log=log, checkpoint=checkpoint, activation_checkpointing=activation)
    assert problems == log.problems() + checkpoint.problems() + activation.problems()
    assert [p.split(":")[0] for p in problems] == ["log.every", "checkpoint.keep", "activation_checkpointing.backend"]


# --- more bad arguments ---------------------------------------------------------------------------


def test_model_without_parameters():
    assert model_problems(nn.ReLU()) == ["model: ReLU has no parameters, so there is nothing to train"]
    assert model_problems(make_model()) == []


def test_output_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    target = str(tmp_path / "file" / "run" / "a")
    assert output_dir_problems(target) == [f"output_dir: {target!r} cannot be created because "
                                           f"{str(tmp_path / 'file')!r} is a file; pass a folder path"]


def test_output_dir_missing_but_creatable(tmp_path):
    assert output_dir_problems(str(tmp_path / "new" / "deeper")) == []
    assert output_dir_problems("relative/run") == [] or not os.access(".", os.W_OK)


def unprivileged(fn, *args):
    """``fn(*args)`` as an ordinary user: as root, in a forked child that drops to nobody
    (root may write anywhere); otherwise here."""
    if os.geteuid() != 0:
        return fn(*args)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, answer through the pipe, leave without cleanup
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, json.dumps(fn(*args)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        result = json.loads(answer.read())
    os.waitpid(pid, 0)
    return result


def test_output_dir_not_writable():
    root = tempfile.mkdtemp(prefix="zeroloop-locked-")  # pytest's tmp_path is closed to other users
    locked = os.path.join(root, "locked")
    os.mkdir(locked)
    os.chmod(root, 0o755)
    os.chmod(locked, 0o555)
    try:
        assert unprivileged(output_dir_problems, locked) == [
            f"output_dir: {locked!r} is not writable by this process; choose another folder or fix its permissions"]
        run = os.path.join(locked, "run")
        assert unprivileged(output_dir_problems, run) == [
            f"output_dir: {run!r} cannot be created: {locked!r} is not writable by this process; choose another "
            "folder or fix its permissions"]
    finally:
        os.chmod(locked, 0o755)
        shutil.rmtree(root)


def test_client_optimizer_and_scheduler_of_the_wrong_kind():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    assert client_problems(optimizer, scheduler) == []
    assert client_problems(lambda params: torch.optim.SGD(params, lr=0.1), lambda opt: None) == []
    assert client_problems("adam", 3) == [
        "optimizer: must be a torch.optim.Optimizer or a callable taking the model's parameters, got str",
        "lr_scheduler: must be a scheduler or a callable taking the optimizer, got int"]
    assert client_problems(None, scheduler)[0].startswith("lr_scheduler: an already-built scheduler steps an "
                                                          "optimizer the loop does not have")


class TakesXY(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.linear(x), y)


def test_batch_shapes_the_default_compute_loss_can_use():
    x, y = torch.zeros(8), torch.zeros(1)
    assert batch_problems(TakesXY(), (x, y), None) == []  # model(*batch)
    assert batch_problems(TakesXY(), {"x": x, "y": y}, None) == []  # model(**batch)
    assert batch_problems(nn.Linear(8, 1), (x, y), nn.functional.mse_loss) == []  # loss_fn(model(x), y)
    assert batch_problems(nn.Linear(8, 1), x, None) == []  # model(batch)


def test_dict_batch_with_a_key_forward_does_not_take():
    problems = batch_problems(TakesXY(), {"x": 0, "y": 0, "mask": 0}, None)
    assert problems[0].startswith("train_data: the default compute_loss calls model(**batch) with dicts with keys "
                                  "['mask', 'x', 'y'], and TakesXY.forward(x, y) cannot take that")
    assert "override compute_loss" in problems[0] and "loss_fn" not in problems[0]


def test_loss_fn_with_batches_that_are_not_pairs():
    problems = batch_problems(nn.Linear(8, 1), {"x": 0, "y": 0}, nn.functional.mse_loss)
    assert problems == ["loss_fn: needs (inputs, targets) batches, but train_data gives dicts with keys ['x', 'y']; "
                        "drop loss_fn= (the model then gets the batch) or override compute_loss"]


def test_first_sample_is_peeked_only_where_nothing_is_consumed():
    data = pairs()
    assert first_sample(data)[0] and len(first_sample(data)[1]) == 2
    assert first_sample(DataLoader(data, batch_size=2))[0]
    assert first_sample(DataLoader(data, batch_size=2, collate_fn=lambda b: b)) == (False, None)
    assert first_sample(iter([1, 2])) == (False, None)
    assert first_sample([]) == (False, None)


def test_an_overridden_compute_loss_is_not_second_guessed(tmp_path):
    class Custom(TrainerLoop):
        def compute_loss(self, batch):
            inputs, targets = batch
            return nn.functional.mse_loss(self.engine(inputs), targets)

    loop = Custom(nn.Linear(8, 1), tiny_config(), train_data=pairs(), output_dir=tmp_path, max_steps=1,
                  log=LogSettings(progress_bar=False))
    loop._check_args()  # no ConfigError


def test_batches_that_could_not_be_peeked_at_fail_clearly_at_the_first_step(tmp_path):
    data = pairs()
    batches = ((data.tensors[0][i:i + 2], data.tensors[1][i:i + 2]) for i in range(0, 16, 2))  # a generator
    loop = TrainerLoop(nn.Linear(8, 1), tiny_config(), train_data=batches, output_dir=tmp_path, max_steps=1,
                       log=LogSettings(progress_bar=False))
    with single_process(), pytest.raises(TypeError) as info:
        loop.train()
    message = str(info.value)
    assert "the default compute_loss calls model(*batch) with tuples of 2 items" in message
    assert "pass loss_fn=" in message and "override compute_loss" in message
    assert loop.global_step == 0
