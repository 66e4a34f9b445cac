"""Mixture of Experts: build an MoE from dense experts, edit its experts, compress it by merging experts."""
