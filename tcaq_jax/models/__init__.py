"""Flax UNets and autoencoders, and conversion of the public PyTorch checkpoints."""
