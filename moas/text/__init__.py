"""Text: the encoder, its inputs to the generator, the caption bank.

``TEXT_WIDTH`` is the one owner of the width of every text vector the networks read (the original's 768:
the encoders' 384-d vectors widened by duplication); torch-free, so the config checks it without torch.
"""

TEXT_WIDTH = 768
