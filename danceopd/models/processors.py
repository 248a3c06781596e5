"""Processor classes for pipelines whose real processor needs torchvision, which a CPU-only torch install lacks.

Qwen-Image-Edit's `Qwen2VLProcessor` (transformers 5 requires its video sub-processor, and every video processor needs
torchvision) and FLUX.2 [dev]'s `PixtralProcessor` (its module imports torchvision) cannot be built, saved or loaded
without torchvision. The tiny stand-ins of those repositories (danceopd.testing) hold these two classes instead, which do
what the pipelines ask of the real ones with PIL image processing. `save_pretrained` records them in model_index.json
under this module's path, and diffusers resolves such a component only from a module the process has already imported:
`import danceopd.models` (which imports this module) before `DiffusionPipeline.from_pretrained` of such a folder.
Real repositories name the real classes and load with torchvision as usual.
"""

from __future__ import annotations

# ProcessorMixin must be a name in this module: diffusers looks the load method of a component from a custom module up by
# the base classes it finds in that module.
from transformers import ProcessorMixin, Qwen2VLProcessor  # noqa: F401


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video sub-processor (the same text and image processing, the same `<|image_pad|>`
    expansion). Dropping `video_processor` from `__init__` drops it from the processor's sub-processors (they are read off
    the signature), so this one saves and reloads with or without torchvision. Use a PIL image processor
    (`Qwen2VLImageProcessorPil`) with it."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


class TextOnlyPixtralProcessor(ProcessorMixin):
    """FLUX.2 [dev]'s tokenizer component (a `PixtralProcessor` in the real repository) for text: Flux2Pipeline encodes
    prompts with `tokenizer.apply_chat_template(...)` on text-only turns and decodes with `tokenizer.tokenizer`. It holds the
    Pixtral image processor's settings (PIL backend) so that the folder keeps the real component set; image inputs (the
    pipeline's optional prompt upsampling with images) need transformers' PixtralProcessor, and are refused here."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, **kwargs):
        _text_only(images)
        return self.tokenizer(text, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """The tokenizer's own chat rendering and tokenization (text turns: `{"type": "text", ...}` parts)."""
        _text_only(kwargs.pop("images", None))
        return self.tokenizer.apply_chat_template(conversation, chat_template=chat_template or self.chat_template, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _text_only(images) -> None:
    if images is not None:
        raise ValueError("TextOnlyPixtralProcessor tokenizes text only: image inputs need transformers' PixtralProcessor "
                         "(install torchvision and load a repository that names it)")

__all__ = ["ImageOnlyQwen2VLProcessor", "TextOnlyPixtralProcessor"]
