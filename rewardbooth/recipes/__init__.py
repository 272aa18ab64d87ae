"""Recipes: the scripts that rebuilt the assets rewardbooth ships (the MiniBench base model, its
tokenizer and its judges in `rewardbooth/mini/assets/`), kept so those assets can be reproduced.

The library never imports them: it loads the shipped files.

- `python -m rewardbooth.recipes.mini_pretrain`: pretrains the mini pipeline on the mini world
  (`mini/assets/base`);
- `python -m rewardbooth.recipes.mini_judges`: trains the mini judges (`mini/assets/judges`);
- `mini_model`: what both build on, the untrained mini pipeline and its world-word tokenizer.
"""
