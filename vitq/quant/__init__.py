"""Post-training quantization (MPTQ-ViT): observers, SQ-b, OPT-m, Greedy MP and the torch simulation."""
