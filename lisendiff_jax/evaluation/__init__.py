"""Evaluation as in the paper (section 4.6, appendix C): a speaker model role-plays emotional
situations against a listener (`simulate`), a judge model rates the conversations and compares
two listeners (`judge`), and the results become a table and a chart (`stats`, `report`). Every
role is an OpenAI-compatible endpoint (`client`), our own `lisendiff_jax.serve` included."""
