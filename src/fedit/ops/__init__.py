"""Adapter maths shared by the client and the server, pure functions over adapter-only
state dicts: sums and norms (``aggregation``), LoRA factor pairs and the exact mean of their
products (``lora_aggregation``), mixed ranks (``ranks``) and FedSA-LoRA's shared and kept
factors (``sharing``). It sits below both, so neither imports the other."""
