r"""Generate text with a saved causal-LM model (dense or extracted), greedy or sampled, with the KV cache.

  python launch/generate.py --model_dir workdirs/smollm2_books/finetuned/params_0.8 \
      --prompt "In the beginning" [--max_new_tokens 64] [--temperature 0] [--seed 0]

Prints the continuation, then the decode speed in tokens/s (prefill excluded).
"""

from _common import run_main
from absl import flags

from spp_jax.errors import ConfigError

_MODEL = flags.DEFINE_string("model_dir", None, "A saved model directory of a causal-LM run.", required=True)
_TARGET = flags.DEFINE_string("target", None, "With a weight family (WORKDIR/family): the member to cut.")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt text.", required=True)
_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples from softmax(logits / T).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    del argv
    if _NEW.value < 1:
        raise ConfigError(f"--max_new_tokens={_NEW.value} is not allowed; use an integer >= 1")
    if not _TEMP.value >= 0:
        raise ConfigError(f"--temperature={_TEMP.value} is not allowed; use a number >= 0")
    from spp_jax.lm import generate_text, load_lm

    module, params, tokenizer, special = load_lm(_MODEL.value, target=_TARGET.value)
    text, tok_per_s = generate_text(
        module, params, tokenizer, _PROMPT.value, _NEW.value, _TEMP.value, _SEED.value, special.get("eos")
    )
    print(text)
    print(f"[generate] {tok_per_s:.1f} tokens/s")


if __name__ == "__main__":
    run_main(main)
