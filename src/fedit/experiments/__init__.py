"""Experiments built on the engine: side-by-side comparisons of configs (`compare`) and
per-client fine-tuning of a finished run (`personalize`). The engine never imports them."""
