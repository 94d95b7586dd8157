"""Training heads; importing this package registers every head."""
from . import (aptm, aptm_fusion, citc, cmt, contrastive, identity, lgur, mlm, mvsi, nitc, rde, ritc, scmm,  # noqa: F401
               ssi, tbps_common, tir)  # (registration)
from .base import GLOBAL, Batch, EncoderOutput, EpochContext, Head, ParamRule, RerankStats
from .registry import HEADS, parse_loss_names, register_head, unregister_head, with_required

__all__ = ["GLOBAL", "Batch", "EncoderOutput", "EpochContext", "HEADS", "Head", "ParamRule", "RerankStats", "parse_loss_names",
           "register_head", "unregister_head", "with_required"]
