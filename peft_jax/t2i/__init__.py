"""Text-to-image PEFT of Stable Diffusion: ``data`` (examples, prompts, the latent cache), ``train``
(the run behind launch/train_t2i.py) and ``sample`` (launch/generate.py)."""
