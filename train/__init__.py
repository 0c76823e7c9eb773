"""diffalign.train: one trainer loop and one module per alignment method.

Each method supplies how a batch is obtained and a pure loss function; the shared loop owns
devices, precision, LoRA, logging, checkpoints and resume (``diffalign.checkpoint``).
"""
