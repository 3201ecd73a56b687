"""The model: one readable dense/MoE transformer file (transformer.py) and its MoE layer (moe.py)."""
