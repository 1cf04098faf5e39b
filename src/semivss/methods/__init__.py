"""semivss.methods: training methods and their registry (a plain dict name -> class)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from semivss.errors import ConfigError
from semivss.methods.base import DataSpec, Method, seg_ce_loss, unwrap
from semivss.methods.cps import CPS
from semivss.methods.ifr import IFR
from semivss.methods.self_training import SelfTraining
from semivss.methods.supervised import Supervised
from semivss.methods.u2pl import U2PL
from semivss.methods.unimatch import UniMatch

METHODS: dict[str, type[Method]] = {
    "supervised": Supervised,
    "ifr": IFR,
    "u2pl": U2PL,
    "cps": CPS,
    "unimatch": UniMatch,
    "self_training": SelfTraining,
}


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
    cls = METHODS.get(name)
    if cls is None:
        raise ConfigError(f"method.name: unknown method {name!r}; available: {sorted(METHODS)}")
    cfg = cls.parse_config(params)
    return cls(cfg, num_classes=num_classes, ignore_index=ignore_index)


__all__ = ["CPS", "IFR", "METHODS", "DataSpec", "Method", "SelfTraining", "Supervised", "U2PL", "UniMatch", "build_method", "seg_ce_loss", "unwrap"]
