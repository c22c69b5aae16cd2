"""torch.compile through engine.compile(): when the loop compiles, clean names in everything it
saves, and a clear error where compilation cannot work."""

import os

import pytest
import torch

import zeroloop.compiling
from helpers import RegressionData, make_model
from zeroloop import CheckpointSettings, ConfigError, LogSettings, TrainerLoop, consolidate
from zeroloop.compiling import compile_problems, compile_requested, setting_problems
from zeroloop.safetensors_io import load_state_dict
from zeroloop.testing import single_process, tiny_config

QUIET = LogSettings(every=1, progress_bar=False)
# Dynamo and AOTAutograd without code generation: the compile machinery, no C++ build.
NO_CODEGEN = {"backend": "aot_eager"}


@pytest.mark.parametrize("setting, config, compiles", [
    (None, {}, False),
    (None, {"compile": {}}, True),  # DeepSpeed's settings for engine.compile(): a request
    (False, {"compile": {}}, False),
    (True, {}, True),
    ({"mode": "max-autotune"}, {}, True),
])
def test_when_the_loop_compiles(setting, config, compiles):
    assert compile_requested(setting, config) is compiles


def test_bad_compile_settings_are_named():
    assert setting_problems({"backend": "eager", "mode": "default", "fullgraph": True}) == []
    assert setting_problems("yes") == ["compile: must be True, False, None (the config decides) or a dict of "
                                       "torch.compile options, got str"]
    assert setting_problems({"modes": "x"}) == ["compile.modes: unknown option; use backend, mode, fullgraph, "
                                                "dynamic, options"]


def test_where_inductor_cannot_work_the_problem_names_the_fix(monkeypatch):
    monkeypatch.setattr(zeroloop.compiling, "missing_cpp_compiler", lambda: "InvalidCxxCompiler: no g++")
    (problem,) = compile_problems("cpu", None)
    assert "Inductor on a CPU builds C++ and found no compiler (InvalidCxxCompiler: no g++)" in problem
    assert "apt-get install g++" in problem and "aot_eager" in problem
    assert compile_problems("cpu", "aot_eager") == []  # no code generation, no compiler needed

    monkeypatch.setattr(zeroloop.compiling, "triton_available", lambda: False)
    (problem,) = compile_problems("cuda", "inductor")
    assert "Inductor on a GPU needs Triton" in problem and torch.__version__ in problem

    def unsupported():
        raise RuntimeError("Python 3.15+ not yet supported for torch.compile")

    monkeypatch.setattr(torch._dynamo.eval_frame, "check_if_dynamo_supported", unsupported)
    assert compile_problems("cuda", "aot_eager") == [
        "compile: torch.compile does not run here (Python 3.15+ not yet supported for torch.compile); "
        "train without compile="]


class Recording(TrainerLoop):
    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        self.losses = getattr(self, "losses", []) + [loss.item()]
        return loss


def train(output_dir, config=None, **kwargs):
    loop = Recording(make_model(), config or tiny_config(stage=2), train_data=RegressionData(),
                     output_dir=output_dir, max_steps=3, log=QUIET, **kwargs)
    loop.train()
    return loop


def test_compiled_training_keeps_clean_names_in_checkpoints_and_weights(tmp_path):
    checkpoint = CheckpointSettings(every=1, final_weights=True)
    with single_process():
        eager = train(tmp_path / "eager")
    with single_process():
        compiled = train(tmp_path / "compiled", compile=NO_CODEGEN, checkpoint=checkpoint)
    assert compiled.engine.is_compiled and not eager.engine.is_compiled
    # The same computation, traced (decomposed ops may round differently on some devices).
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    names = [name for name, _ in make_model().named_parameters()]
    model_states = torch.load(tmp_path / "compiled" / "checkpoints" / "global_step3" / "mp_rank_00_model_states.pt",
                              map_location="cpu", weights_only=False)
    assert list(model_states["module"]) == names
    assert sorted(load_state_dict(tmp_path / "compiled" / "final")) == sorted(names)
    consolidate(str(tmp_path / "compiled" / "checkpoints"), str(tmp_path / "consolidated"), progress=False)
    assert sorted(load_state_dict(tmp_path / "consolidated")) == sorted(names)
    with single_process():  # a compiled loop resumes from it
        resumed = Recording(make_model(), tiny_config(stage=2), train_data=RegressionData(),
                            output_dir=tmp_path / "compiled", max_steps=5, log=QUIET, compile=NO_CODEGEN,
                            checkpoint=CheckpointSettings(resume="latest", final=False))
        assert resumed.train().steps == 5 and resumed.checkpointer.resumed_from.endswith("global_step3")


def test_a_compile_section_in_the_config_compiles_unless_told_not_to(tmp_path):
    config = {**tiny_config(), "compile": {"deepcompile": False}}
    with single_process():
        assert train(tmp_path / "section", config, compile={**NO_CODEGEN}).engine.is_compiled
    with single_process():
        assert not train(tmp_path / "off", config, compile=False).engine.is_compiled


def test_compile_that_cannot_work_is_refused_before_the_engine_is_built(tmp_path, monkeypatch):
    # Whichever device this machine trains on: no C++ compiler for a CPU, no Triton for a GPU.
    monkeypatch.setattr(zeroloop.compiling, "missing_cpp_compiler", lambda: "InvalidCxxCompiler: no g++")
    monkeypatch.setattr(zeroloop.compiling, "triton_available", lambda: False)
    loop = TrainerLoop(make_model(), tiny_config(), train_data=RegressionData(), output_dir=tmp_path, max_steps=1,
                       compile=True)
    with single_process(), pytest.raises(ConfigError, match="compile: Inductor on a (CPU|GPU)"):
        loop.setup()
    assert loop.engine is None and not os.path.exists(tmp_path / "metrics.jsonl")
