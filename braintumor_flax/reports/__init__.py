"""Documents generated from measured results: the model card and the README's generated blocks."""
