"""samtone: dual-encoder retrieval models trained with SamToNe and friends, in JAX/Flax."""
import glob
import os

import setuptools

# Gin fragments and run configs live at the repo root (gin/, configs/: a source checkout and
# an editable install read them there); a wheel installs them into the package, as
# samtone/_resources/gin/... and samtone/_resources/configs/, where
# samtone.cli.gin_parsing.resources_dir finds them.
RESOURCE_DIRS = sorted(folder for top in ("configs", "gin") for folder, _, _ in os.walk(top)
                       if glob.glob(os.path.join(folder, "*.gin")))
RESOURCE_PACKAGES = {"samtone._resources." + folder.replace(os.sep, "."): folder
                     for folder in RESOURCE_DIRS}

setuptools.setup(
    name="samtone",
    version="0.1.0",
    description=("T5.1.1 dual encoders trained with same-tower-negative contrastive losses "
                 "(JAX/Flax)."),
    python_requires=">=3.10",
    packages=[*setuptools.find_namespace_packages(include=["samtone", "samtone.*"]),
              *RESOURCE_PACKAGES],
    package_dir=RESOURCE_PACKAGES,
    package_data={"samtone": ["data/smoke/*"], **{name: ["*.gin"] for name in RESOURCE_PACKAGES}},
    install_requires=[
        "jax>=0.10,<0.11",
        "jaxlib>=0.10,<0.11",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "gin-config>=0.5,<0.6",
        "sentencepiece>=0.2,<0.3",
        "numpy>=1.26",
        "absl-py>=1.4",  # flags and logging of the commands
        "etils[epath]>=1.5",  # paths on any filesystem (gs://...) for runs and vocabularies
        "msgpack>=1.0",
        "tensorstore>=0.1.60",
        "tensorboardX>=2.6",
        "safetensors>=0.4",
        "flatbuffers>=24.3",  # jax.export (de)serialisation
        "tqdm>=4.60",  # progress bars on long encoding and search
        "array-record>=0.8.1,<0.9",  # samtone-prepare's shards, read by row
        "grain>=0.2.15,<0.3",  # index_shuffle: each epoch's order computed per batch
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the README's test command runs on both CPU cores
            "torch==2.13.0",
            "transformers>=5",  # sentence-transformers>=6.2 needs transformers 5
            "safetensors>=0.4",
            "sentence-transformers>=6.2",
            "ranx>=0.3.20",
            "pytrec_eval-terrier>=0.5.6",  # trec_eval itself, for the retrieval metrics
            "scipy>=1.11",
            "ruff>=0.6",  # tests/test_lint.py: the code stays as pyproject.toml configures it
        ],
        "seqio": [
            "seqio>=0.0.19",
            "tensorflow-datasets>=4.9",
            "tensorflow-text>=2.15",
        ],
        # samtone-prepare --runner=...: the prepared folder written by an Apache Beam pipeline.
        # apache-beam needs protobuf<7, but sentencepiece's generated proto, which the seqio
        # extra loads, needs protobuf>=7: install it in a venv of its own (CI tests it there).
        "beam": ["apache-beam>=2.60"],
        # samtone-analyze's figures; samtone-compare's paired tests (ranx, with scipy, numba).
        "analysis": ["matplotlib>=3.8", "scikit-learn>=1.4", "ranx>=0.3.20"],
        # The accelerators: a plain install runs JAX on the CPU only. `tpu` brings libtpu (Cloud
        # TPU VMs), `cuda` the CUDA 12 plugin with its CUDA libraries (NVIDIA GPUs).
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        "cuda": ["jax[cuda12]>=0.10,<0.11"],
        # MODEL_DIR, data and vocabularies on gs:// (etils paths, tensorboardX's GCS writer).
        "gcs": ["gcsfs>=2023.1", "google-cloud-storage>=2.10"],
        # samtone-export --format=saved_model (jax2tf + the SentencePiece op in the graph).
        "serving": ["tensorflow>=2.15", "tensorflow-text>=2.15"],
        # samtone-export --format=sentence_transformers; the folder it writes loads with
        # these alone (sentence-transformers>=6.2 needs transformers>=5).
        "sentence-transformers": ["sentence-transformers>=6.2", "transformers>=5",
                                  "torch>=2.4"],
    },
    entry_points={
        "console_scripts": [
            "samtone-train=samtone.cli.train:console_entry",
            "samtone-mine=samtone.cli.mine:console_entry",
            "samtone-export=samtone.cli.export:console_entry",
            "samtone-analyze=samtone.cli.analyze:console_entry",
            "samtone-plan=samtone.cli.plan:console_entry",
            "samtone-eval=samtone.cli.eval:console_entry",
            "samtone-convert=samtone.cli.convert:console_entry",
            "samtone-prepare=samtone.cli.prepare:console_entry",
            "samtone-compare=samtone.cli.compare:console_entry",
        ]
    },
)
