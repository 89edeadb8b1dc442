r"""Perplexity of a language model on a text file: the config's pretrained dense model or a saved model.

  python launch/perplexity.py --text_file book.txt [--config configs/llama.py] [--model_dir DIR] \
      [--max_tokens 1024]

The file is tokenised without special tokens and its first N tokens are scored as one sequence:
perplexity = exp(mean negative log-likelihood of tokens 2..N, each given its prefix) (the Hugging Face
convention). Prints `perplexity: <float> (<n> tokens)`. --model_dir is a directory made by a causal-LM run
(dense/, extracted/<t>/, finetuned/<t>/): its params, arch spec and tokenizer; without it the config's
pretrained model and tokenizer are used.
"""

from pathlib import Path

from _common import run_main
from absl import flags
from ml_collections import config_flags

from spp_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parents[1] / "configs" / "llama.py"), "A causal-LM config."
)
_MODEL = flags.DEFINE_string("model_dir", None, "A saved model directory (default: the config's model).")
_TARGET = flags.DEFINE_string("target", None, "With a weight family (WORKDIR/family): the member to cut.")
_TEXT = flags.DEFINE_string("text_file", None, "UTF-8 text file to score.", required=True)
_MAX = flags.DEFINE_integer("max_tokens", 1024, "Score the first N tokens of the file (N >= 2).")


def main(argv):
    del argv
    text_file = Path(_TEXT.value)
    if not text_file.is_file():
        raise ConfigError(f"--text_file={text_file} is not a file; give a UTF-8 text file")
    if _MAX.value < 2:
        raise ConfigError(f"--max_tokens={_MAX.value} is not allowed; use an integer >= 2")
    from spp_jax.lm import load_lm, sequence_perplexity

    module, params, tokenizer, _ = load_lm(_MODEL.value, _CONFIG.value, _TARGET.value)
    ppl, n = sequence_perplexity(module, params, tokenizer, text_file.read_text(encoding="utf-8"), _MAX.value)
    print(f"perplexity: {ppl:.4f} ({n} tokens)")


if __name__ == "__main__":
    run_main(main)
