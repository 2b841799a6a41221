"""A small word-level tokenizer for the toy task, built with `tokenizers` and wrapped in `PreTrainedTokenizerFast`.

Tokens: the special tokens `<pad>`, `<bos>`, `<eos>`, `<unk>` and the chat roles `<|user|>`, `<|assistant|>`;
single digits, operators and punctuation; `\\boxed{`; and the few words of the prompt (with and without a leading
space). Decoding concatenates tokens, so every string made of known pieces round-trips exactly; an unknown word
becomes `<unk>`. The chat template is `<bos><|user|>{question}<|assistant|>{answer}<eos>`.

It is not a general-purpose tokenizer: it exists so that the toy pair is a normal HF model folder on which
`apply_chat_template`, `generate` and everything in this library work.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, USER, ASSISTANT)

_SYMBOLS = tuple("0123456789") + tuple("+-*/=()[]{}.,:;?!'") + (" ", "\n")
_BOXED = ("\\boxed{", " \\boxed{")
_WORDS = (
    "Compute", "Put", "the", "final", "answer", "in", "Please", "reason", "step", "by", "and", "put", "your",
    "within", "Answer", "is", "The", "So", "a", "of", "Solve", "What", "Evaluate", "result", "Let", "us", "think",
)  # fmt: skip

# `\boxed{` | a word with an optional leading space | one digit | one other character
_SPLIT = Regex(r" ?\\boxed\{| ?[A-Za-z]+|\d|[^A-Za-z\d]")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def toy_vocabulary() -> list[str]:
    """The vocabulary in id order: special tokens first (`<pad>` = 0, `<bos>` = 1, `<eos>` = 2)."""
    words = [w for word in _WORDS for w in (word, " " + word)]
    return list(SPECIAL_TOKENS) + list(_SYMBOLS) + list(_BOXED) + words


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer (left padding, so batched `generate` works out of the box)."""
    vocab = {token: i for i, token in enumerate(toy_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(_SPLIT, behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"user_token": USER, "assistant_token": ASSISTANT},
        padding_side="left",
        model_max_length=256,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer
