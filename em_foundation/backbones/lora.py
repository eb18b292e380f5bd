"""LoRA adapters (peft) on the attention projections of every block, and nothing else."""

from __future__ import annotations

import re

import torch

from em_foundation.backbones.base import Backbone
from em_foundation.families import family_of


def add_lora(backbone: Backbone, rank: int, alpha: float, dropout: float) -> Backbone:
    """Inject LoRA into ``backbone.model`` on the family's attention targets.

    The family's ``lora_targets`` (em_foundation.families) is a regular expression that peft matches against whole
    module names: every block's attention input projection (q, k, v; one fused Linear)
    and output projection. Only the adapters become trainable: the pretrained weights stay
    frozen, as in the study. The patch embedding's ``proj`` convolution and the MLPs are
    not matched by any family's pattern, and this is checked after injection.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = family_of(backbone.family).lora_targets
    if targets is None:
        raise ValueError(f"family {backbone.family!r} has no LoRA targets (its regimes exclude lora)")
    prepare = getattr(backbone, "prepare_lora", None)
    if prepare is not None:
        prepare()
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
    )
    backbone.model = inject_adapter_in_model(config, backbone.model)
    adapted = adapted_modules(backbone)
    wrong = [name for name in adapted if not re.fullmatch(targets, name)]
    if not adapted or wrong:
        raise RuntimeError(f"LoRA landed on unexpected modules of {backbone.family}: {wrong[:5] or 'none at all'}")
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return backbone


def adapted_modules(backbone: Backbone) -> list[str]:
    """Names (within ``backbone.model``) of the modules that carry a LoRA adapter."""
    return [
        name
        for name, module in backbone.model.named_modules()
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A")) > 0
    ]


def make_fully_trainable(backbone: Backbone) -> Backbone:
    """Full fine-tuning: every backbone parameter trains."""
    for parameter in backbone.parameters():
        parameter.requires_grad_(True)
    return backbone


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only what was trained, so checkpoints stay small and never copy frozen weights."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {
        k: v.detach().cpu().clone()
        for k, v in module.state_dict().items()
        if k in trainable or _is_buffer_of_trainable(k, trainable)
    }


def _is_buffer_of_trainable(key: str, trainable: set[str]) -> bool:
    # BatchNorm running statistics belong to a trained module even though they are buffers.
    prefix = key.rsplit(".", 1)[0]
    return key.endswith(("running_mean", "running_var", "num_batches_tracked")) and any(
        t.startswith(prefix + ".") for t in trainable
    )
