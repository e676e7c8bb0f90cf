"""LabelWatch for the ``pytorch_lightning`` package (``import pytorch_lightning as pl``).

``labelwatch.LabelWatch`` is a ``lightning.pytorch`` callback; a ``pytorch_lightning.Trainer``
only accepts callbacks of its own package, so use this class there::

    from labelwatch.pl import LabelWatch
"""

from __future__ import annotations

from pytorch_lightning import Callback

from labelwatch.callback import LabelWatch as _LightningLabelWatch
from labelwatch.callback import LabelWatchLogic

__all__ = ["LabelWatch"]


class LabelWatch(LabelWatchLogic, Callback):
    __doc__ = _LightningLabelWatch.__doc__
