"""The recipes, one script each; installed as `hf_histo.recipes` (`python -m hf_histo.recipes.NAME`)."""
