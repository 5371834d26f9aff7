"""Named cdlm recipes: one validated YAML file per run configuration (see cdlm.recipes)."""
