"""The built-in word-level tokenizer: one token per word of the built-in task.

Built from the `tokenizers` library in memory (no files, no downloads) and wrapped as a
`transformers` fast tokenizer, so it saves with `save_pretrained` and reloads with
`AutoTokenizer.from_pretrained` like any other.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from data.builtin.task import vocabulary

SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
# Words of the default prompt template (conf/data/*.yaml: "### Instruction:" / "### Response:").
TEMPLATE_WORDS = ("###", "Instruction", "Response", ":", "Input")


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = list(SPECIAL.values()) + sorted(set(vocabulary()) | set(TEMPLATE_WORDS))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, words.index(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL["pad"],
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"],
        padding_side="right",
        model_max_length=1024,
    )
