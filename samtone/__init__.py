"""samtone: T5.1.1 dual encoders trained with contrastive losses, SamToNe above all."""

__version__ = "0.1.0"
