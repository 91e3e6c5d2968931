"""fedit: federated instruction tuning of LLMs with LoRA adapters.

Data flows one way: records -> partitions -> tokenised client datasets -> local training
(fedit.client) -> client update -> server strategy (fedit.server) -> global adapter ->
evaluation and checkpoint (fedit.engine, fedit.eval).
"""

__version__ = "0.1.0"
