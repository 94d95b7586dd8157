"""The head interface: one module per method component, chosen by a ``--loss_names`` token.

A head lives in one file and declares everything the framework needs from it:
- ``settings``: its config keys (collected by ``utils/options.py``: flags, YAML keys, help text);
  ``configure``: values it derives from the training data before training (saved with the run);
- ``batch_fields``: extra batch keys the training dataset must build (``datasets/fields.py``);
  ``text_fields``: which of them the model encodes with the text tower (once per step, shared);
- ``requires`` and ``bind``: other heads it uses (a shared module lives in a head of its own);
- ``param_roles`` / ``param_rule``: how the optimizer treats its parameters (lr role, or its own
  lr, weight decay and Adam eps);
- ``forward(batch, out, encoder)``: its training terms. ``<name>_loss`` entries are already
  weighted and summed by the training step; other entries (accuracies) are logged;
- optionally, its part in retrieval (all called by the evaluator, which has no per-method code):
  ``retrieval_weights`` with ``query_features`` / ``gallery_features`` add feature sets computed
  from the same evaluation pass; ``rerank_k`` > 0 with ``rerank_cache_*``, ``rerank_score`` and
  ``rerank_combine`` re-scores each query's first-stage top k;
- optionally, ``before_epoch(context)``: a pass over the training set before each epoch, keeping
  per-sample state (``training_state`` / ``load_training_state`` put it in ``last.pth``);
  ``on_step(epoch, step, steps_per_epoch)`` before every training step (a schedule of its own).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import nn

from utils.metrics import RerankStats
from utils.settings import Setting

from ..clip import CLIPConfig, CLIPEncoder, ImageOutput, TextOutput

Batch = dict[str, torch.Tensor]
GLOBAL = "global"  # the encoder's own feature set: CLS vs EOT cosine


@dataclass(frozen=True)
class ParamRule:
    """How the optimizer treats one of a head's parameters. ``role`` picks the recipe's lr factors
    ('base'; 'cross' and 'classifier' get ``lr_factor``); the others, when set, replace the recipe's
    values for this parameter: its base lr (the schedule still applies), its weight decay, and the
    eps of its Adam/AdamW group."""
    role: str = "base"
    lr: float | None = None
    weight_decay: float | None = None
    eps: float | None = None


@dataclass
class EncoderOutput:
    """One pass of the dual encoder over a training batch: the images, the captions and every extra
    caption field a head asked for (``Head.text_fields``), each encoded once per step."""
    image: ImageOutput
    text: TextOutput
    texts: dict[str, TextOutput] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # per-step values heads share (e.g. an extra pass)


class EpochContext(Protocol):
    """What ``Head.before_epoch`` gets from the training loop."""
    epoch: int
    num_samples: int  # training samples (captions): per-sample state is indexed 0..num_samples-1

    def per_sample(self, fn: Callable[[Batch, EncoderOutput, CLIPEncoder], dict[str, torch.Tensor]]
                   ) -> dict[str, torch.Tensor]:
        """Run ``fn(batch, out, encoder)`` over the training set (eval mode, no gradients) and return
        each of its [B] outputs scattered into a [num_samples] tensor by the batch's ``index``
        (gathered from all processes; NaN for a sample not seen). The head must list ``index`` in
        its ``batch_fields``."""
        ...


class Head(nn.Module):
    """Base class of heads."""
    name: ClassVar[str]
    method: ClassVar[str] = ""   # the paper / codebase it comes from (README heads table)
    summary: ClassVar[str] = ""  # one line for the README heads table
    settings: ClassVar[tuple[Setting, ...]] = ()
    # Extra batch keys this head needs from the dataset (beyond images, caption_ids, pids, image_ids).
    batch_fields: ClassVar[tuple[str, ...]] = ()
    # Batch keys holding token ids that the model encodes with the text tower once per step, for
    # every head that names them (``out.texts[key]``); each must also be in ``batch_fields``.
    text_fields: ClassVar[tuple[str, ...]] = ()
    # Heads this one uses (e.g. a shared cross encoder): built with it even if not in loss_names.
    requires: ClassVar[tuple[str, ...]] = ()
    # True: encoder passes (training and evaluation) also return the last blocks' attention rows
    # (``ImageOutput.attention``: CLS row, ``TextOutput.attention``: EOT row).
    needs_attention: ClassVar[bool] = False
    # Optimizer role of child modules ('cross' or 'classifier'); other parameters are 'base'.
    param_roles: ClassVar[dict[str, str]] = {}
    # True: the loss compares each sample with the whole (global) batch, so gradient accumulation
    # (accum_steps > 1) would change it; building such a head with it is a config error.
    whole_batch: ClassVar[bool] = False
    # >0: this head re-scores each query's first-stage top ``rerank_k`` gallery items.
    rerank_k: int = 0

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    @classmethod
    def configure(cls, cfg, dataset, tokenizer) -> None:
        """Before a training run builds the model: fill config values that come from the training
        data (e.g. caption statistics); they are written into the run's configs.yaml."""

    @classmethod
    def from_config(cls, cfg, encoder_cfg: CLIPConfig, num_classes: int) -> "Head":
        """Build from the run config, the encoder's architecture and the number of train ids."""
        raise NotImplementedError

    def forward(self, batch: Batch, out: EncoderOutput, encoder: CLIPEncoder) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def bind(self, heads: dict[str, "Head"], encoder: CLIPEncoder) -> None:
        """Called once the model is built, with all its heads (``requires`` included) and its encoder:
        a head keeps references to what it uses (in a plain dict, so that their parameters stay
        registered under their own name only) or initialises itself from them."""

    def param_rule(self, param_name: str, param: nn.Parameter) -> ParamRule:
        """The optimizer's treatment of ``param`` (its name inside the head). Default: the role that
        ``param_roles`` gives its child module."""
        return ParamRule(self.param_roles.get(param_name.split(".")[0], "base"))

    # ---------------------------------------------------------------- retrieval: feature sets
    def retrieval_weights(self) -> dict[str, float]:
        """Feature sets this head adds, with their weight in the first-stage similarity
        ``sum_s w_s cos_s(query, gallery)``. It may also set the weight of ``GLOBAL`` (default 1),
        e.g. ``{"global": 0.5, "tse": 0.5}`` for a mean, ``{"global": 0, "own": 1}`` to rank by its
        own features alone. Weights are >= 0."""
        return {}

    def query_features(self, text: TextOutput) -> dict[str, torch.Tensor]:
        """Per feature set of ``retrieval_weights``, the queries' features [B, D] (not normalised)."""
        return {}

    def gallery_features(self, image: ImageOutput) -> dict[str, torch.Tensor]:
        """Per feature set of ``retrieval_weights``, the gallery items' features [B, D]."""
        return {}

    # ---------------------------------------------------------------- retrieval: re-ranking
    def rerank_query_cache(self, text: TextOutput) -> dict[str, torch.Tensor]:
        """Per-query tensors [B, ...] the second stage needs (kept in half precision)."""
        return {}

    def rerank_gallery_cache(self, image: ImageOutput) -> dict[str, torch.Tensor]:
        """Per-gallery-item tensors [B, ...] the second stage needs (kept in half precision)."""
        return {}

    def rerank_score(self, query: dict[str, torch.Tensor], gallery: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores [n] of n (query, gallery item) pairs, given their cached rows (row i of each is pair i)."""
        raise NotImplementedError

    def rerank_combine(self, second: torch.Tensor, first: torch.Tensor, stats: RerankStats) -> torch.Tensor:
        """Final scores [c, k] of each query's top k from the second-stage scores and the first-stage
        ones (higher is better; only the order within a row matters). Default: the second stage alone."""
        return second

    # ---------------------------------------------------------------- training: per-epoch state
    def before_epoch(self, context: EpochContext) -> dict[str, float] | None:
        """Called before every training epoch (after resume too); may keep per-sample state and
        return scalars to log for the epoch (TensorBoard ``train/<key>``)."""

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        """Called before every training step (``step`` 0-based within the epoch); it depends on these
        numbers only, so a resumed run calls it with the same values."""

    def training_state(self) -> dict[str, Any]:
        """State kept across epochs besides parameters and buffers (saved in ``last.pth``)."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what ``training_state`` returned."""
