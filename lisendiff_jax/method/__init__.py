"""The LisenDiff method on top of the backbone: LoRA, cross-attention to the latent, the style
summary and denoisers, the diffusion math and sampler, the objectives, and the model that ties
them together (which parameters train)."""
