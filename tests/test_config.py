import dataclasses

import pytest

from razorpass import RazorConfig
from razorpass.config import TARGETS


def test_defaults_are_the_documented_contract():
    cfg = RazorConfig()
    assert (cfg.sparsity, cfg.granularity, cfg.block_size, cfg.value_dtype, cfg.compiler) == (
        0.9, "block", 1024, "bfloat16", "inductor")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sparsity = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("sparsity", 1.0, "[0, 1)"),
        ("sparsity", -0.1, "[0, 1)"),
        ("sparsity", float("nan"), "[0, 1)"),
        ("sparsity", "0.9", "[0, 1)"),
        ("granularity", "row", "('block', 'sample')"),
        ("block_size", 12, "multiple of 8"),
        ("block_size", 0, "multiple of 8"),
        ("value_dtype", "int8", "bfloat16"),
        ("targets", ("linear", "lstm"), "valid names are"),
        ("compiler", "tvm", "inductor"),
        ("codec_form", "fused", "('auto', 'kernel', 'generated')"),
        ("keep_rate", 0.0, "(0, 1]"),
        ("keep_rate", 1.5, "(0, 1]"),
        ("trainable_blocks", ["a"], "block indices"),
        ("include", 3, "glob"),
    ],
)
def test_bad_values_name_the_field_and_range(field, value, needle):
    with pytest.raises(ValueError) as e:
        RazorConfig(**{field: value})
    assert f"RazorConfig.{field}" in str(e.value) and needle in str(e.value)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown razor option.*'sparsty'.*valid options"):
        RazorConfig.from_options({"sparsty": 0.9})


def test_options_from_dict_config_and_overrides():
    cfg = RazorConfig.from_options({"sparsity": 0.5, "targets": ["linear"], "mode": None})
    assert cfg.sparsity == 0.5 and cfg.targets == ("linear",)
    assert RazorConfig.from_options(cfg) is cfg
    assert RazorConfig.from_options(cfg, sparsity=0.7).sparsity == 0.7
    with pytest.raises(TypeError):
        RazorConfig.from_options(["sparsity"])


def test_unknown_target_error_lists_every_valid_name():
    with pytest.raises(ValueError) as e:
        RazorConfig(targets=["nope"])
    for name in TARGETS:
        assert name in str(e.value)


@pytest.mark.parametrize("group", [1, 7, 8, 1000, 1024, 151296])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97, 0.999])
def test_keep_count_is_ceil_of_density(group, sparsity):
    from fractions import Fraction
    import math

    expected = math.ceil((1 - Fraction(str(sparsity))) * group)
    assert RazorConfig(sparsity=sparsity).keep_count(group) == expected
