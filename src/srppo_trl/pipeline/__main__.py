"""`python -m srppo_trl.pipeline`: the `srppo` command (SFT -> SRPPO from a recipe)."""

from .run import main


if __name__ == "__main__":
    main()
