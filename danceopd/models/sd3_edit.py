"""A diffusers pipeline for SD3 edit students: `StableDiffusion3Pipeline` whose `__call__` also takes `image=`.

SD3 has no image input, so an SD3 edit student reads the source image's latents on grown input channels (see
danceopd.models.sd3.grow_input_for_source). The stock pipeline cannot drive such a transformer: it sizes its noise
from `transformer.config.in_channels` (twice the latent channels) and has no source to give it. This class encodes
the source image exactly as training did (the VAE's mode, shifted and scaled), draws the noise with the latent
channel count, and hands the source latents to the transformer on every call (CFG and skip-layer batches
included) through a forward pre-hook; everything else is the stock `__call__` (schedulers, CFG, callbacks, decoding).

    pipe = load_student_pipeline("runs/sd35-edit/student")   # returns this class for an SD3 edit student
    image = pipe(prompt="make it night", image=source, guidance_scale=1.0).images[0]
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor


class StableDiffusion3EditPipeline(StableDiffusion3Pipeline):
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, *, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, generator=None, latents: torch.Tensor | None = None, **kwargs):
        """The stock SD3 `__call__` (same arguments) plus `image`: the source image as diffusers pipelines take one (PIL,
        numpy, or a [0, 1] tensor; one for all prompts, or one per prompt), resized to height x width."""
        if image is None:
            raise ValueError("image: an SD3 edit student edits a source image; pass image=<the image to edit>")
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if isinstance(prompt, str):
            batch = 1
        elif prompt is not None:
            batch = len(prompt)
        else:
            batch = kwargs["prompt_embeds"].shape[0]
        total = batch * num_images_per_prompt
        device, dtype = self._execution_device, self.transformer.dtype
        source = self.encode_source(image, height, width).to(device, dtype)
        if source.shape[0] == batch and batch > 1:
            source = source.repeat_interleave(num_images_per_prompt, 0)
        elif source.shape[0] == 1:
            source = source.expand(total, -1, -1, -1)
        if source.shape[0] != total:
            raise ValueError(f"image: {source.shape[0]} source images for {batch} prompts; give one, or one per prompt")
        if latents is None:  # noise with the latent channels, not the grown input's
            shape = (total, self.transformer.config.out_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)

        def with_source(module, args, kwargs):
            x = kwargs["hidden_states"]
            src = source.repeat(x.shape[0] // source.shape[0], 1, 1, 1)  # CFG doubles the batch: [uncond; cond]
            return args, {**kwargs, "hidden_states": torch.cat([x, src.to(x.dtype)], dim=1)}

        hook = self.transformer.register_forward_pre_hook(with_source, with_kwargs=True)
        try:
            return super().__call__(prompt=prompt, height=height, width=width, num_images_per_prompt=num_images_per_prompt,
                                    generator=generator, latents=latents, **kwargs)
        finally:
            hook.remove()

    def encode_source(self, image, height: int, width: int) -> torch.Tensor:
        """The source image(s) as training saw them: [-1, 1] at height x width, the VAE's mode, shifted and scaled."""
        from danceopd.models.sd3 import SD3Family

        pixels = self.image_processor.preprocess(image, height=height, width=width)
        return SD3Family().encode_images(self, pixels)
