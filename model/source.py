"""Source-domain model for training (DESIGN 5.1): frozen backbone + one peft LoRA + pooler/scorer head.

Training uses peft (dropout, init, the well-kept implementation). A trained adapter is read out as `LoraWeights`
and served by `XCross` with a single stream, which computes the same scores (tested).
Note: `get_peft_model` wraps the backbone's modules in place; give each trainer its own backbone instance.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backbone import Backbone
from model.lora import LoraConfig, LoraWeights
from model.xcross import Head


def peft_config(backbone: Backbone, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.targets or backbone.lora_targets
    )


class SourceLoraModel(nn.Module):
    """Scores prompts with backbone + LoRA + head. Trainable: the LoRA A/B matrices and the head."""

    def __init__(self, backbone: Backbone, cfg: LoraConfig | None = None, head: Head | None = None):
        super().__init__()
        from peft import get_peft_model

        cfg = cfg or LoraConfig()
        self.cfg = cfg
        self.peft = get_peft_model(backbone.model, peft_config(backbone, cfg))
        self.head = head if head is not None else Head(backbone.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.peft(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)
        return self.head(h[:, 0])  # (B,)

    def lora_weights(self) -> LoraWeights:
        return LoraWeights.from_peft(self.peft)
