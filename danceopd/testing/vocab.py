"""The offline vocabularies of the tiny pipelines' tokenizers (danceopd.testing.tiny, danceopd.testing.tiny_qwen): single
characters, punctuation and whole English words, so that real prompts tokenize without a hub."""

from __future__ import annotations

# Whole words for the T5 Unigram vocabulary (anything else is spelled out from single characters).
_WORDS = """
a an the this that these those of in on at to from with without and or but not no is are was were be been
it its it's his her their my your our one two three four five six seven eight nine ten many some all each
left right top bottom above below under over behind front next near far inside outside between around into
onto up down middle center corner side background foreground edge
red green blue yellow orange purple pink brown black white gray grey gold silver dark light bright pale
colorful color colour colors
circle square triangle rectangle star heart ring line lines dot dots shape shapes box ball cube sphere
small large big tiny huge little tall short long wide thin thick round flat
photo photograph picture image painting drawing sketch illustration render style portrait landscape
close view shot scene realistic photorealistic detailed high quality sharp blurry soft hard smooth
astronaut riding horse dog cat bird fish person man woman child people boy girl car house tree trees
flower flowers mountain mountains river sea ocean lake sky cloud clouds sun moon city street road forest
water fire snow rain grass field beach night day morning sunset table chair cup book window door wall
make turn change replace remove add put place move swap convert transform keep invert flip rotate
into as like by for same other another more less very only just also again
sitting standing walking running flying holding wearing looking eating
"""

_PUNCT = ".,!?;:'\"-()[]/&+=*#%$@_<>|~`^{}\\"


def _unigram_pieces(specials: list[str]) -> list[tuple[str, float]]:
    """A Unigram vocabulary: `specials`, then single characters, punctuation and whole English words."""
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in specials] + [("▁", -8.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float):
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for w in _WORDS.split():  # whole words win over spelling them out (Viterbi maximises the summed score)
        add("▁" + w, -4.0)
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + _PUNCT + "\n":
        add("▁" + c, -9.0)
        add(c, -10.0)
    return pieces


QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen's layout, thinking on
