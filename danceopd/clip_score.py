"""An optional CLIP score for any family's samples (eval.clip_model): 100 x max(cos(image, prompt), 0), the usual
definition, with a transformers CLIPModel and its processor loaded from a folder or hub id."""

from __future__ import annotations

import torch
from PIL import Image


class ClipScorer:
    def __init__(self, path: str, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path).eval().to(self.device)
        self.processor = CLIPProcessor.from_pretrained(path)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> float:
        """Mean CLIP score of images [B, 3, H, W] in [-1, 1] against their prompts."""
        pil = [Image.fromarray(((im.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()) for im in images]
        inputs = self.processor(text=prompts, images=pil, return_tensors="pt", padding=True, truncation=True).to(self.device)
        out = self.model(**inputs)
        img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return float((100 * (img * txt).sum(-1).clamp(min=0)).mean())
