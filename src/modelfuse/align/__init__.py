"""Aligning models that do not share a base: permutation symmetries, weight and activation matching, PLeaS."""
