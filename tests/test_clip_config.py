"""LoRAConfig: defaults, every position and params option, and the errors for bad values."""

import math

import pytest

from clip_lora import LoRAConfig
from clip_lora.adapters import official_blocks
from clip_lora.config import position_blocks

# DESIGN.md §2's table for a 12-block tower, written out by hand.
TABLE_12 = {
    "all": list(range(12)),
    "bottom": [0, 1, 2, 3],
    "mid": [4, 5, 6, 7],
    "up": [8, 9, 10, 11],
    "half-up": [6, 7, 8, 9, 10, 11],
    "half-bottom": [0, 1, 2, 3, 4, 5],
    "top1": [11],
    "top2": [10, 11],
    "top3": [9, 10, 11],
}


def test_defaults_are_the_paper_recipe():
    cfg = LoRAConfig()
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.encoder, cfg.params, cfg.position) == (
        2,
        1.0,
        0.25,
        "both",
        ("q", "k", "v"),
        "all",
    )
    assert cfg.scale == pytest.approx(1 / math.sqrt(2))
    assert LoRAConfig(r=4, alpha=2.0, scaling="alpha/r").scale == pytest.approx(0.5)
    assert LoRAConfig(r=4, alpha=2.0).scale == pytest.approx(1.0)
    assert cfg.towers == ("text", "vision")
    assert LoRAConfig(encoder="vision").towers == ("vision",)


@pytest.mark.parametrize("position", sorted(TABLE_12))
def test_positions_12_blocks(position):
    assert LoRAConfig(position=position).blocks(12) == TABLE_12[position]


def test_positions_24_blocks():
    cfg = lambda p: LoRAConfig(position=p).blocks(24)  # noqa: E731
    assert cfg("all") == list(range(24))
    assert cfg("half-up") == list(range(12, 24))
    assert cfg("half-bottom") == list(range(12))
    assert (cfg("bottom"), cfg("mid"), cfg("up")) == (list(range(8)), list(range(8, 16)), list(range(16, 24)))
    assert cfg("top3") == [21, 22, 23]


def test_explicit_block_list_is_sorted_and_checked():
    cfg = LoRAConfig(position=[5, 0, 5])
    assert cfg.position == (0, 5)
    assert cfg.blocks(12) == [0, 5]
    with pytest.raises(ValueError, match=r"\[12\] do not exist in a 12-block tower"):
        LoRAConfig(position=[0, 12]).blocks(12)


def test_position_impossible_for_depth_names_allowed_ones():
    with pytest.raises(ValueError, match="'bottom' is not defined for a 10-block tower; allowed there: all, half-up"):
        position_blocks("bottom", 10)
    with pytest.raises(ValueError, match="'top3' is not defined for a 2-block tower"):
        position_blocks("top3", 2)
    assert position_blocks("half-up", 10) == [5, 6, 7, 8, 9]


def test_params_are_canonical():
    assert LoRAConfig(params=("v", "q", "q")).params == ("q", "v")
    assert LoRAConfig(params="o").params == ("o",)
    assert LoRAConfig(params=["q", "k", "v", "o"]).params == ("q", "k", "v", "o")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"r must be an integer in 1\.\.64, got 0"),
        ({"r": 65}, r"r must be an integer in 1\.\.64, got 65"),
        ({"r": 2.0}, "r must be an integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, "dropout must be in"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"scaling": "alpha"}, "scaling must be one of alpha/sqrt\\(r\\), alpha/r; got 'alpha'"),
        ({"encoder": "image"}, "encoder must be one of both, vision, text; got 'image'"),
        ({"params": ("q", "x")}, "params must be a non-empty subset of q, k, v, o; got \\('q', 'x'\\)"),
        ({"params": ()}, "params must be a non-empty subset"),
        ({"position": "top4"}, "position must be one of all, bottom, .* got 'top4'"),
        ({"position": [-1]}, "non-negative block indices"),
        ({"position": []}, "non-negative block indices"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


@pytest.mark.parametrize(
    "cfg",
    [
        LoRAConfig(),
        LoRAConfig(r=8, alpha=4, dropout=0.0, scaling="alpha/r", encoder="text", params=("q", "o"), position=[1, 3]),
    ],
)
def test_dict_round_trip(cfg):
    import json

    assert LoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown LoRAConfig fields \['rank'\]"):
        LoRAConfig.from_dict({"rank": 2})


def test_official_enumeration_tables():
    assert official_blocks("top", 12) == [11]
    assert official_blocks("all", 12) == list(range(12))
    # The official ViT-L/14 vision table at HEAD: only all, half-up and half-bottom ...
    assert official_blocks("all", 24) == list(range(24))
    assert official_blocks("half-up", 24) == list(range(12, 24))
    assert official_blocks("half-bottom", 24) == list(range(12))
    assert official_blocks("up", 24) is None and official_blocks("top1", 24) is None
    # ... and before official commit e6bf706: 12-block indices, "all" stops at 20.
    assert official_blocks("all", 24, "pre-e6bf706") == list(range(21))
    assert official_blocks("half-up", 24, "pre-e6bf706") == [6, 7, 8, 9, 10, 11]
    assert official_blocks("up", 24, "pre-e6bf706") == [8, 9, 10, 11]
    assert official_blocks("top1", 24, "pre-e6bf706") is None
