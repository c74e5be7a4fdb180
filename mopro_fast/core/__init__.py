"""The MoPro algorithm (DESIGN.md section 1): network, momentum encoder, queue, prototypes,
noise correction, losses, and the training step that combines them."""
