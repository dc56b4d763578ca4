"""The command-line layer: absl flags, Gin parsing and the console entries; nothing imports it.

  samtone-train    samtone.cli.train      train (or resume) a run configured by Gin
  samtone-mine     samtone.cli.mine       mine hard negatives with a trained run
  samtone-export   samtone.cli.export     a serving folder from a run: jax, sentence_transformers,
                                          saved_model
  samtone-convert  samtone.cli.convert    a Hugging Face T5 folder or T5X checkpoint as a samtone
                                          checkpoint
  samtone-eval     samtone.cli.eval       a checkpoint against a full corpus (BEIR, pairs)
  samtone-analyze  samtone.cli.analyze    the paper's embedding-space figures and numbers

`gin_registry` lists every Gin name; `gin_parsing` reads config files and flags; `common`
turns user errors into one-line messages (exit 2).
"""
