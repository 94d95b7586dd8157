"""Training heads; importing this package registers every head."""
from . import cmt, contrastive, identity, mlm, tir  # noqa: F401  (registration)
from .base import Batch, EncoderOutput, Head
from .registry import HEADS, parse_loss_names, register_head

__all__ = ["Batch", "EncoderOutput", "HEADS", "Head", "parse_loss_names", "register_head"]
