"""The results report's pretext table: epochs, and the heads it marks as not clearly above chance."""

from __future__ import annotations

import pytest

from sonossl.evaluate.report import near_chance, pretext_table


def metrics(val_clips: int = 434, epochs: int = 8, **acc: float) -> dict:
    chance = {"order_acc": 0.0833, "rotation_acc": 0.3333, "scale_acc": 0.3333, "shear_acc": 0.3333}
    return {"val_clips": val_clips, "epochs": epochs, "val": {f"{h}_acc": v for h, v in acc.items()},
            "chance": {f"{h}_acc": chance[f"{h}_acc"] for h in acc}}


@pytest.mark.parametrize("acc, near", [
    # chance + 2 standard errors over 434 clips: 0.0833 + 2 * sqrt(0.0833 * 0.9167 / 434) = 0.1098 for 12 classes,
    # 0.3333 + 2 * sqrt(0.3333 * 0.6667 / 434) = 0.3786 for 3
    ({"order": 0.07}, ["order"]),       # an order head that never left chance (a screen run at 2e-3)
    ({"order": 0.109}, ["order"]),
    ({"order": 0.111}, []),
    ({"order": 0.341, "rotation": 0.661, "scale": 0.744, "shear": 0.392}, []),  # the pipeline's encoder
    ({"order": 0.352, "rotation": 0.595, "scale": 0.576, "shear": 0.376}, ["shear"]),  # its both-parallel one
    ({"rotation": 0.30, "scale": 0.78, "shear": 0.378}, ["rotation", "shear"]),  # below chance counts too
])
def test_near_chance_is_two_standard_errors_over_the_held_out_clips(acc, near):
    assert near_chance(metrics(**acc)) == near


def test_fewer_held_out_clips_need_a_wider_margin():
    assert near_chance(metrics(val_clips=74, order=0.14)) == ["order"]  # 0.0833 + 2 * 0.0321 = 0.1476
    assert near_chance(metrics(val_clips=434, order=0.14)) == []
    assert near_chance(metrics(val_clips=0, order=0.05)) == []  # no held-out clips: nothing to judge


def test_the_pretext_table_marks_the_heads_near_chance():
    table = pretext_table({"both-sequential": metrics(order=0.341, rotation=0.661, scale=0.744, shear=0.392,
                                                      epochs=24),
                           "order": metrics(order=0.07)})
    assert table[0] == ("| encoder | epochs | order acc (chance) | rotation acc (chance) | scale acc (chance) "
                        "| shear acc (chance) |")
    assert table[2] == "| both-sequential | 24 | 0.341 (0.083) | 0.661 (0.333) | 0.744 (0.333) | 0.392 (0.333) |"
    assert table[3] == "| order | 8 | 0.070 (0.083) * | – | – | – |"
    assert table[-1].startswith("\\* not clearly above chance")
    assert "*" not in "".join(pretext_table({"order": metrics(order=0.3)}))
