"""Tokenizers: load a Hugging Face tokenizer from disk, or build a tiny byte-level BPE one offline.

:func:`build_tokenizer` trains a byte-level BPE (every byte is in the vocabulary,
so any text round-trips) on the synthetic arithmetic texts, adds special tokens
and a chat template, and saves a folder that ``AutoTokenizer.from_pretrained``
loads. Tests, the demo and the recipes use it so nothing is downloaded.

The chat template renders each turn as ``<|role|>content<|eos|>`` after one
``<|bos|>``; ``add_generation_prompt`` appends ``<|assistant|>``. Role markers
and eos are special tokens, so the tokens of a prompt rendered with the
generation prompt are exactly a prefix of the tokens of the prompt plus its
response, and every assistant turn ends with eos.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS.values())
NUM_BYTE_TOKENS = 256
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer(
    out_dir: str | Path, texts: Sequence[str] | None = None, vocab_size: int = 384
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer with special tokens and a chat template; save it to ``out_dir``.

    Deterministic: the same texts and ``vocab_size`` give byte-identical files.

    Args:
        out_dir: folder to write (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``).
        texts: training texts; default :func:`aligner.data.synthetic.tokenizer_corpus`.
        vocab_size: upper bound on the vocabulary (256 bytes + 6 special tokens + merges); the
            result is smaller when the texts run out of merges.

    Returns:
        The tokenizer as ``AutoTokenizer.from_pretrained(out_dir)`` loads it.

    Raises:
        ValueError: ``vocab_size`` below the 256 byte tokens plus the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from aligner.data.synthetic import tokenizer_corpus

    smallest = NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise ValueError(f"vocab_size must be >= {smallest} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus() if texts is None else list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        chat_template=CHAT_TEMPLATE,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


# A tokenizer folder holds one of these (a fast tokenizer's tokenizer.json, or a slow tokenizer's vocabulary).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_VOCABULARY_SUFFIXES = (".tiktoken", ".model")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a local tokenizer folder with ``AutoTokenizer`` without touching the network.

    ``path`` is a folder on disk (``~`` expanded), never a Hub repository id.
    A tokenizer without a pad token gets ``pad_token = eos_token`` (padding positions are never
    trained, so sharing the id is harmless).

    Raises:
        FileNotFoundError: ``path`` does not exist, or the folder has no tokenizer files (the
            message names the files expected).
        NotADirectoryError: ``path`` is a file.
        ValueError: the files are there but do not load (the message names the folder and
            transformers' reason), or the tokenizer has no eos token (responses must end with one).
    """
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"tokenizer path {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"tokenizer path {folder} is a file; give the folder that holds the tokenizer files")
    names = {entry.name for entry in folder.iterdir()}
    if not any(name in VOCABULARY_FILES or name.endswith(_VOCABULARY_SUFFIXES) for name in names):
        found = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"
        raise FileNotFoundError(
            f"tokenizer path {folder} has no tokenizer files (found: {found}); expected tokenizer.json "
            "and tokenizer_config.json (a Hugging Face fast tokenizer, as save_pretrained writes it), or a "
            "slow tokenizer's vocabulary (tokenizer.model, vocab.json + merges.txt or vocab.txt)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the tokenizer in {folder}: {error}") from error
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {folder} has no eos_token; set one in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_END_OF_TURN_PROBE = "aligner end of turn probe"


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token the tokenizer's chat template puts right after an assistant message
    (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, the eos of a template that ends turns
    with eos); ``[]`` without a chat template, or when the template puts plain text there."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _END_OF_TURN_PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template may reject this conversation (roles, system prompt, ...)
        return []
    if not isinstance(text, str) or _END_OF_TURN_PROBE not in text:
        return []
    after = text[text.rindex(_END_OF_TURN_PROBE) + len(_END_OF_TURN_PROBE) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {
        index for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special
    }
    return [ids[0]] if ids and ids[0] in special else []


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a response: the tokenizer's eos, then the chat template's end of turn if different."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    return ids + [i for i in end_of_turn_ids(tokenizer) if i not in ids]
