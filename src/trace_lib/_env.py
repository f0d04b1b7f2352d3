"""Process-wide settings applied when trace_lib is imported, before torch/transformers/torchao load.

trace is offline by design: nothing is fetched from a model hub, so a missing model is a clear error and
never a download attempt. It also silences library start-up noise that says nothing to a trace user
(torchao failing to load CUDA-only kernels on a CPU machine, pytree deprecation chatter).
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
