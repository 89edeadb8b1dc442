r"""Sentence embeddings of a text file, one per line: the config's pretrained encoder or a saved one.

  python launch/embed.py --text_file sentences.txt --out emb.npy [--config configs/bert.py] \
      [--model_dir DIR] [--max_tokens N] [--batch_size 32]

Writes a float32 array [lines, width] to --out: per non-empty line, the L2-normalised mean of the encoder's
last hidden states over the line's tokens (`[CLS] ... [SEP]`, padding excluded), the sentence-transformers
convention of all-MiniLM-L6-v2 (spp_jax/embed.py). Empty lines are refused. --model_dir is a directory made
by a text-classification run (dense/, extracted/<t>/, finetuned/<t>/): its pruned encoder and tokenizer,
the classifier head left out; without it the config's pretrained encoder is used.
"""

from pathlib import Path

from _common import run_main
from absl import flags
from ml_collections import config_flags

from spp_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parents[1] / "configs" / "bert.py"), "A text-encoder config."
)
_MODEL = flags.DEFINE_string("model_dir", None, "A saved model directory (default: the config's encoder).")
_TARGET = flags.DEFINE_string("target", None, "With a weight family (WORKDIR/family): the member to cut.")
_TEXT = flags.DEFINE_string("text_file", None, "UTF-8 text file, one text per line.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output .npy file.", required=True)
_MAX = flags.DEFINE_integer(
    "max_tokens", None, "Tokens per line at most, special ones included (default: 256, or the model's limit)."
)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Lines per forward pass.")


def main(argv):
    del argv
    import numpy as np

    text_file, out = Path(_TEXT.value), Path(_OUT.value)
    if not text_file.is_file():
        raise ConfigError(f"--text_file={text_file} is not a file; give a UTF-8 text file, one text per line")
    if _BATCH.value < 1:
        raise ConfigError(f"--batch_size={_BATCH.value} is not allowed; use an integer >= 1")
    lines = text_file.read_text(encoding="utf-8").splitlines()
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if not lines or empty:
        raise ConfigError(f"{text_file} has empty lines ({empty[:5] or 'the file is empty'}); remove them")
    if not out.parent.is_dir():
        raise ConfigError(f"--out={out}: directory {out.parent} does not exist; create it first")
    from spp_jax.embed import embed_texts, load_encoder

    module, params, tokenizer, special = load_encoder(_MODEL.value, _CONFIG.value, _TARGET.value)
    max_tokens = _MAX.value or min(256, module.config.max_len)
    emb = embed_texts(module, params, tokenizer, lines, max_tokens, _BATCH.value, special.get("pad") or 0)
    np.save(out, emb)
    print(f"wrote {emb.shape[0]} embeddings of width {emb.shape[1]} to {out}")


if __name__ == "__main__":
    run_main(main)
