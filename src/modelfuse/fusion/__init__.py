"""Knowledge fusion across tokenizers (FuseLLM, FuseChat): source distributions, token alignment, vocabulary maps,
fusion functions and training the target on them."""
