"""The ranker alone (multi-action BCE), at a single-host GPU scale: `joint_base` without retrieval.

`phoenix-train --config configs/ranker_base.py --workdir W --config.data.data_dir=D`. Not trained
here (no accelerator); plan it with `phoenix-plan --config configs/ranker_base.py --devices 8`.
"""

import dataclasses

import joint_base

from phoenix_flax.config import replace_fields


def get_config():
    cfg = replace_fields(joint_base.get_config(), loss={"ranking_weight": 1.0, "retrieval_weight": 0.0})
    return dataclasses.replace(cfg, name="ranker_base")
