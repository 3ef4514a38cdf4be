"""Exercise 7: YaRN, a RoPE scaling model.py does not have. Check with: python exercises/check.py 7"""


def yarn(cfg):
    """YaRN's RoPE inverse frequencies and attention factor, as Hugging Face computes them.

    cfg is model.py's Config; cfg.rope holds config.json's rope_parameters: rope_theta, factor,
    original_max_position_embeddings, and optionally beta_fast (default 32), beta_slow (default 1),
    attention_factor and truncate (default True). README.md gives the recipe.
    Returns (inv_freq, a fp32 tensor of head_dim/2 frequencies; attention_factor, a float).
    """
    raise NotImplementedError
