"""tensorboardX, imported without torch.

``import tensorboardX`` runs ``import torch`` (its writer accepts torch tensors; diffujax logs
numbers and strings only), which costs seconds of every ``diffujax train``'s start-up. When torch
is not loaded yet it is hidden while tensorboardX imports (an ``ImportError`` that tensorboardX
catches), then unhidden, so a later ``import torch`` works as usual.
"""

from __future__ import annotations

import sys

_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
    sys.modules["torch"] = None  # ``import torch`` now raises ImportError
try:
    from tensorboardX import record_writer
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.summary import scalar, text
finally:
    if _HIDE_TORCH and sys.modules.get("torch", 0) is None:
        del sys.modules["torch"]

__all__ = ["Event", "EventsWriter", "SessionLog", "record_writer", "scalar", "text"]
