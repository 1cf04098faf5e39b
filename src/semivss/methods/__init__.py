"""semivss.methods: training methods, registered by name in :data:`semivss.registry.METHODS`.

Importing this package registers the built-in methods: each module imported below registers its
class with ``@METHODS.register(name)``; a new method is one file plus one import line here
(docs/extending.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from semivss.methods.base import DataSpec, Method, seg_ce_loss, unwrap
from semivss.methods.accel import AccelFusion
from semivss.methods.cac import CAC
from semivss.methods.cps import CPS
from semivss.methods.ifr import IFR
from semivss.methods.self_training import SelfTraining
from semivss.methods.supervised import Supervised
from semivss.methods.u2pl import U2PL
from semivss.methods.unimatch import UniMatch
from semivss.registry import METHODS


def build_method(
    name: str,
    params: Mapping[str, Any] | None,
    num_classes: int,
    ignore_index: int = 255,
) -> Method:
    """Instantiate method ``name`` with ``params`` validated by its ``Config``.

    Unknown method -> ConfigError naming ``method.name``; a bad or unknown parameter ->
    ConfigError naming ``method.<key>``.
    """
    cls = METHODS.get(name)  # unknown: ConfigError listing the registered names
    cfg = cls.parse_config(params)
    return cls(cfg, num_classes=num_classes, ignore_index=ignore_index)


__all__ = ["CAC", "CPS", "AccelFusion", "IFR", "METHODS", "DataSpec", "Method", "SelfTraining", "Supervised", "U2PL", "UniMatch", "build_method", "seg_ce_loss", "unwrap"]
