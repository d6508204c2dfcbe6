"""The two-tower retrieval model alone (in-batch sampled softmax, estimated logQ), single-host GPU scale.

`phoenix-train --config configs/retrieval_base.py --workdir W --config.data.data_dir=D`. Not trained
here (no accelerator); plan it with `phoenix-plan --config configs/retrieval_base.py --devices 8`.
"""

import dataclasses

import joint_base

from phoenix_flax.config import replace_fields


def get_config():
    cfg = replace_fields(
        joint_base.get_config(),
        data={"batch_size": 4096},
        loss={"ranking_weight": 0.0, "retrieval_weight": 1.0},
        checkpoint={"best_metric": "eval_loss"},
    )
    return dataclasses.replace(cfg, name="retrieval_base")
