"""The run spec and the DeepSpeed config assembled from it: every shipped file is valid, every error names its field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trainer.engine import SHIPPED_CONFIGS, assemble_config, lr_multiplier
from trainer.errors import UserError
from trainer.spec import OptimSection, RunSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
DS_CONFIGS = sorted(SHIPPED_CONFIGS.glob("*.json"))
MINIMAL = {"model": {"path": "m"}, "data": {"shards": "s"}, "train": {"max_steps": 10}}


def spec_file(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def error_of(tmp_path: Path, spec: dict, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_spec(spec_file(tmp_path, spec), overrides)
    return str(info.value)


def test_shipped_examples_and_ds_configs_are_valid():
    assert len(EXAMPLES) >= 3 and len(DS_CONFIGS) >= 3
    names = {p.stem for p in EXAMPLES}
    assert {"tiny", "cogvideox-2b-lora", "cogvideox-5b-lora"} <= names
    for example in EXAMPLES:
        spec = load_spec(example)
        for ds in DS_CONFIGS:
            for world_size in (1, 2):
                config = assemble_config(spec.model_copy(update={"deepspeed": spec.deepspeed.model_copy(
                    update={"config": ds.stem, "stage": None})}), world_size)
                assert config["train_batch_size"] == (
                    spec.data.micro_batch_size * spec.train.gradient_accumulation_steps * world_size)
                assert config["gradient_clipping"] == spec.train.max_grad_norm
                assert config["optimizer"]["params"]["torch_adam"] is True
    for name in ("cogvideox-2b-lora", "cogvideox-5b-lora"):
        spec = load_spec(REPO / "examples" / f"{name}.yaml")
        assert spec.lora.rank == 128 and spec.train.precision == "bf16"


def test_unknown_key_is_named(tmp_path):
    msg = error_of(tmp_path, {**MINIMAL, "lora": {"rnak": 4}})
    assert "lora.rnak: unknown field" in msg and "run.yaml" in msg


def test_wrong_type_is_named_with_the_value(tmp_path):
    msg = error_of(tmp_path, {**MINIMAL, "train": {"max_steps": "many"}})
    assert "train.max_steps" in msg and "'many'" in msg


def test_missing_required_fields_are_named(tmp_path):
    msg = error_of(tmp_path, {"model": {"path": "m"}})
    assert "data: required field is missing" in msg and "train: required field is missing" in msg


def test_negative_seed_is_refused(tmp_path):
    negative = error_of(tmp_path, {**MINIMAL, "run": {"seed": -5}})
    assert "run.seed: Input should be greater than or equal to 0" in negative


def test_cross_field_error_names_both_fields(tmp_path):
    msg = error_of(tmp_path, {**MINIMAL, "optim": {"warmup_steps": 50}})
    assert "optim.warmup_steps (50) exceeds train.max_steps (10)" in msg


def test_overrides_are_typed_by_the_schema(tmp_path):
    spec = load_spec(spec_file(tmp_path, MINIMAL), [
        "train.max_steps=7", "optim.lr=3e-4", "optim.betas=[0.8, 0.9]", "lora.target_modules=[to_q]",
        "run.name=from-cli", "train.precision=fp32"])
    assert spec.train.max_steps == 7 and spec.optim.lr == pytest.approx(3e-4)
    assert spec.optim.betas == (0.8, 0.9) and spec.lora.target_modules == ["to_q"]
    assert spec.run.name == "from-cli" and spec.run.dir == Path("runs/from-cli")
    assert "lora.rank" in error_of(tmp_path, MINIMAL, ["lora.rank=abc"])
    assert "lora.nope: unknown field" in error_of(tmp_path, MINIMAL, ["lora.nope=1"])
    assert "expected section.key=value" in error_of(tmp_path, MINIMAL, ["lora.rank"])
    assert "train.max_steps is not a section" in error_of(tmp_path, MINIMAL, ["train.max_steps.x=1"])


def test_spec_file_problems(tmp_path):
    with pytest.raises(UserError, match="spec file not found"):
        load_spec(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_spec(bad)


def test_spec_round_trips_through_its_yaml(tmp_path):
    spec = load_spec(REPO / "examples" / "tiny.yaml")
    again = load_spec(spec_file(tmp_path, yaml.safe_load(spec.to_yaml())))
    assert again == spec


def ds_error(tmp_path: Path, config: dict, **spec_updates) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    raw = {**MINIMAL, "deepspeed": {"config": str(path)}, **spec_updates}
    with pytest.raises(UserError) as info:
        assemble_config(RunSpec.model_validate(raw), data_parallel=2)
    return str(info.value)


def test_ds_config_contradicting_the_spec_is_an_error(tmp_path):
    zero2 = json.loads((SHIPPED_CONFIGS / "zero2.json").read_text())
    msg = ds_error(tmp_path, {**zero2, "gradient_clipping": 0.5})
    assert "gradient_clipping is 0.5" in msg and "train.max_grad_norm" in msg
    msg = ds_error(tmp_path, {**zero2, "train_micro_batch_size_per_gpu": 4})
    assert "data.micro_batch_size" in msg
    assert "train_batch_size is 3" in ds_error(tmp_path, {**zero2, "train_batch_size": 3})
    assert "the spec's optim owns it" in ds_error(tmp_path, {**zero2, "optimizer": {"type": "Adam"}})
    assert "bf16.enabled is False" in ds_error(tmp_path, {**zero2, "bf16": {"enabled": False}})
    msg = ds_error(tmp_path, zero2, deepspeed={"config": str(tmp_path / "ds.json"), "stage": 3})
    assert "zero_optimization.stage is 2 but deepspeed.stage is 3" in msg
    assert "no zero_optimization" in ds_error(tmp_path, {"bf16": {"enabled": True}})
    assert "does not exist" in ds_error(tmp_path, zero2, deepspeed={"config": "zero9"})


def test_ds_config_values_that_agree_or_say_auto_are_accepted(tmp_path):
    zero3 = json.loads((SHIPPED_CONFIGS / "zero3.json").read_text())
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**zero3, "gradient_clipping": 1.0, "train_batch_size": "auto"}))
    spec = RunSpec.model_validate({**MINIMAL, "deepspeed": {"config": str(path), "stage": 3},
                                   "train": {"max_steps": 10, "gradient_accumulation_steps": 4}})
    config = assemble_config(spec, data_parallel=2)
    assert config["train_batch_size"] == 8 and config["zero_optimization"]["stage"] == 3
    assert config["bf16"]["enabled"] and config["data_types"]["grad_accum_dtype"] == "fp32"
    assert not config["fp16"]["enabled"]


def test_gradients_are_accumulated_and_reduced_in_fp32_unless_the_json_chooses_the_compute_dtype(tmp_path):
    zero2 = json.loads((SHIPPED_CONFIGS / "zero2.json").read_text())
    path = tmp_path / "ds.json"

    def assembled(config: dict, precision: str = "bf16") -> dict:
        path.write_text(json.dumps(config))
        spec = RunSpec.model_validate({**MINIMAL, "deepspeed": {"config": str(path)},
                                       "train": {"max_steps": 1, "precision": precision}})
        return assemble_config(spec, data_parallel=2)

    for precision in ("bf16", "fp16", "fp32"):  # the shipped configs say nothing: fp32 both
        config = assembled(zero2, precision)
        assert config["communication_data_type"] == "fp32" and config["data_types"]["grad_accum_dtype"] == "fp32"
    # the JSON's own choice of the compute dtype is kept, key by key, and its other data_types keys with it
    config = assembled({**zero2, "communication_data_type": "bf16", "data_types": {"future_key": 1}})
    assert config["communication_data_type"] == "bf16" and config["data_types"] == {
        "future_key": 1, "grad_accum_dtype": "fp32"}
    assert assembled({**zero2, "communication_data_type": "BFloat16"})["communication_data_type"] == "bf16"
    config = assembled({**zero2, "data_types": {"grad_accum_dtype": "bf16"}})
    assert config["data_types"]["grad_accum_dtype"] == "bf16" and config["communication_data_type"] == "fp32"
    # another half type than the compute dtype, or a name DeepSpeed does not know: refused, naming the key
    msg = ds_error(tmp_path, {**zero2, "communication_data_type": "fp16"})
    assert "communication_data_type is 'fp16' but train.precision is 'bf16'" in msg
    msg = ds_error(tmp_path, {**zero2, "data_types": {"grad_accum_dtype": "bf16"}}, train={"max_steps": 1,
                                                                                         "precision": "fp32"})
    assert "grad_accum_dtype is 'bf16' but train.precision is 'fp32'" in msg
    assert "DeepSpeed knows fp32, bf16, fp16" in ds_error(tmp_path, {**zero2, "communication_data_type": "int8"})


def test_betas_out_of_range_name_the_field(tmp_path):
    with pytest.raises(UserError) as info:
        load_spec(spec_file(tmp_path, {**MINIMAL, "optim": {"betas": [0.9, 1.0]}}))
    assert "  optim.betas: must each be in [0, 1), got [0.9, 1.0]" in str(info.value)


def test_lr_schedules():
    warm = lr_multiplier(OptimSection(schedule="constant", warmup_steps=4), max_steps=10)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = lr_multiplier(OptimSection(schedule="cosine", min_lr_ratio=0.1), max_steps=10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.55) and cosine(10) == pytest.approx(0.1)
    linear = lr_multiplier(OptimSection(schedule="linear", warmup_steps=2), max_steps=12)
    assert linear(1) == 1.0 and linear(2) == 1.0 and linear(7) == pytest.approx(0.5) and linear(12) == 0.0
