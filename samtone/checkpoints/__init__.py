"""Importers for pretrained T5 encoders: Hugging Face directories and t5x checkpoints."""
from samtone.checkpoints.hf import load_hf_t5_encoder
from samtone.checkpoints.t5x import load_t5x_checkpoint, t5x_dual_encoder_to_samtone, t5x_encoder_to_samtone
