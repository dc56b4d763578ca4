"""The command-line layer: absl flags, Gin parsing and the console entries; nothing imports it.

  samtone-train    samtone.cli.train      train (or resume) a run configured by Gin
  samtone-mine     samtone.cli.mine       mine hard negatives with a trained run
  samtone-export   samtone.cli.export     write a serving folder from a run
  samtone-analyze  samtone.cli.analyze    the paper's embedding-space figures and numbers

`gin_registry` lists every Gin name; `gin_parsing` reads config files and flags; `common`
turns user errors into one-line messages (exit 2).
"""
