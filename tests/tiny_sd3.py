"""Build a tiny random StableDiffusion3 pipeline offline and save it in the standard diffusers layout.

No hub is reachable here: the CLIP tokenizers get a hand-written byte-level vocabulary (single characters,
no merges), the models are built from configs with fixed seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    # Byte-level BPE maps every byte to a printable character: printable bytes to themselves, the rest
    # to code points from 256 up. With no merges, each such character is one token.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    return tok


def build_tiny_sd3(path: str | Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    path = Path(path)
    tmp = path.parent / (path.name + ".tok")
    tok1, tok2 = _clip_tokenizer(tmp / "1"), _clip_tokenizer(tmp / "2")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=8)

    def clip(s: int):
        torch.manual_seed(s)
        cfg = CLIPTextConfig(vocab_size=len(tok1), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
                             bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
        return CLIPTextModelWithProjection(cfg)

    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=8,
                        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=clip(seed + 1), tokenizer=tok1, text_encoder_2=clip(seed + 2), tokenizer_2=tok2,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(path)
    return path
