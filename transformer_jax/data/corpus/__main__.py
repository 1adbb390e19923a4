"""`python -m transformer_jax.data.corpus --out DIR`: write the built-in corpus to DIR."""

from transformer_jax.data.corpus.generate import main

if __name__ == "__main__":
    main()
