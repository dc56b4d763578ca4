"""The run manifest `MODEL_DIR/model.json`: what serving needs to rebuild a trained model.

Training writes it once at start (process 0) together with a copy of the vocabulary
(`MODEL_DIR/spm.model`), so a run directory describes itself: inference, export, evaluation,
mining and analysis read this small file, never the Gin config, and so load neither Gin nor
the optimisers. It holds the architecture, the T5 config, the projection size, the token
lengths, the vocabulary file and the logical-axis rules the parameters are sharded by.
samtone-convert writes the same manifest for an imported checkpoint (`converted_from` says
what it came from), and every samtone-export folder repeats these fields in its own manifest.
`read_params` reads a checkpoint's parameters laid out over the devices by the model's rules,
checked against the manifest (an error names each parameter and both shapes).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh

from samtone import partitioning
from samtone import run_dir
from samtone.checkpoints import manager as checkpoint_lib
from samtone.errors import CheckpointError, ConfigError, MissingFileError
from samtone.models import dual_encoder
from samtone.models import t5

MANIFEST_FILE = run_dir.MANIFEST
VOCABULARY_FILE = run_dir.VOCABULARY
FORMAT_VERSION = 1


def config_to_json(config: t5.T5Config) -> dict:
    """T5Config fields as JSON values (dtypes by name: "float32", "bfloat16")."""
    fields = dataclasses.asdict(config)
    for name in ("dtype", "param_dtype"):
        fields[name] = jnp.dtype(fields[name]).name
    return fields


def config_from_json(fields: dict) -> t5.T5Config:
    """The T5Config of `config_to_json`'s output."""
    fields = dict(fields)
    for name in ("dtype", "param_dtype"):
        fields[name] = jnp.dtype(fields[name])
    return t5.T5Config(**fields)


@dataclasses.dataclass(frozen=True)
class RunManifest:
    """A trained model's description; `model()` rebuilds the Flax module."""

    architecture: str
    projection_dim: int
    t5_config: t5.T5Config
    query_length: int
    passage_length: int
    vocabulary: str  # absolute path of the SentencePiece model ("" if none was converted)
    logical_axis_rules: Any  # a rule table's name, or the table as [[logical, mesh axis], ...]
    model_parallel: int = 1
    # samtone-convert's source: {"path", "format": "hf" | "t5x", "projection": "identity" |
    # "checkpoint"}; None for a trained run.
    converted_from: dict | None = None

    def model(self) -> dual_encoder.DualEncoder:
        return dual_encoder.DualEncoder(self.t5_config, architecture=self.architecture,
                                        projection_dim=self.projection_dim)

    def rules(self) -> partitioning.LogicalRules:
        """The logical-axis rule table the parameters are sharded by."""
        rules = self.logical_axis_rules
        return (partitioning.logical_axis_rules(rules) if isinstance(rules, str)
                else tuple(tuple(rule) for rule in rules))

    def serving_mesh(self) -> Mesh:
        """All devices, `model_parallel` of them per model copy when that divides their number."""
        count = jax.device_count()
        model_axis = (self.model_parallel if self.model_parallel >= 1
                      and count % self.model_parallel == 0 else 1)
        return partitioning.make_mesh((-1, model_axis))

    def params_layout(self, mesh: Mesh) -> tuple[Any, Any]:
        """(shapes, shardings) of the model's parameters on `mesh` under the rules: two trees
        like the unboxed parameters, of ShapeDtypeStructs and of NamedShardings."""
        rules = self.rules()
        init = partitioning.params_initializer(
            self.model(), mesh, rules, [(1, self.query_length), (1, self.passage_length)],
            jax.random.PRNGKey(0))
        abstract = jax.eval_shape(init)
        return nn.unbox(abstract), partitioning.tree_shardings(abstract, mesh, rules)

    @classmethod
    def of(cls, model: dual_encoder.DualEncoder, *, query_length: int, passage_length: int,
           vocabulary: str, logical_axis_rules: Any, model_parallel: int = 1,
           converted_from: dict | None = None) -> RunManifest:
        rules = (logical_axis_rules if isinstance(logical_axis_rules, str)
                 else [list(rule) for rule in logical_axis_rules])
        return cls(model.architecture, model.projection_dim, model.config, query_length,
                   passage_length, os.fspath(vocabulary), rules, model_parallel, converted_from)

    @classmethod
    def from_json(cls, fields: dict, *, source: str) -> RunManifest:
        """The manifest of `to_json`'s fields (others are ignored); `source` names the file."""
        try:
            known = {field.name for field in dataclasses.fields(cls)}
            fields = {name: value for name, value in fields.items() if name in known}
            fields["t5_config"] = config_from_json(fields["t5_config"])
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"{source} is not a samtone model manifest: "
                              f"{type(error).__name__}: {error}") from error

    def to_json(self) -> dict:
        fields = dataclasses.asdict(self)
        fields["t5_config"] = config_to_json(self.t5_config)
        if fields["converted_from"] is None:
            del fields["converted_from"]
        return {"format_version": FORMAT_VERSION, **fields}


def write(model_dir: str | os.PathLike, manifest: RunManifest) -> None:
    """Writes model.json and copies the vocabulary next to it (the manifest names the copy)."""
    directory = epath.Path(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = directory / VOCABULARY_FILE
    fields = manifest.to_json()
    if manifest.vocabulary:  # "" (a converted checkpoint without one): none to copy
        source = epath.Path(manifest.vocabulary)
        if source != vocabulary:
            vocabulary.write_bytes(source.read_bytes())
        fields["vocabulary"] = VOCABULARY_FILE
    temporary = directory / f".{MANIFEST_FILE}.tmp"
    temporary.write_text(json.dumps(fields, indent=2) + "\n")
    temporary.replace(directory / MANIFEST_FILE)  # never a half-written manifest


# Fields that may change when a run resumes: how it is laid out and run, not what it is.
# (scan_layers is restacked on restore; lengths and rules shape no parameter.)
RESUMABLE_FIELDS = ("dropout_rate", "dtype", "remat_policy", "scan_layers", "query_length",
                    "passage_length", "logical_axis_rules", "model_parallel", "vocabulary",
                    "converted_from")


def model_differences(recorded: RunManifest, configured: RunManifest) -> list[str]:
    """Each model setting a resume would change, as 'gin.name: run X, now Y'."""
    def settings(manifest: RunManifest) -> dict[str, Any]:
        values = {"dual_encoder.architecture": manifest.architecture,
                  "dual_encoder.projection_dim": manifest.projection_dim}
        values.update({f"t5_1_1_config.{name}": value
                       for name, value in config_to_json(manifest.t5_config).items()
                       if name not in RESUMABLE_FIELDS})
        return values

    before, after = settings(recorded), settings(configured)
    return [f"{name}: run {before[name]!r}, now {after[name]!r}" for name in before
            if before[name] != after[name]]


def record(model_dir: str | os.PathLike, manifest: RunManifest) -> None:
    """Writes model.json and the vocabulary copy of a new run; a resumed run's stay as they
    are (the caller has checked `model_differences` and `vocabulary_differs`)."""
    directory = epath.Path(model_dir)
    if not (directory / MANIFEST_FILE).exists():
        write(directory, manifest)


def vocabulary_differs(model_dir: str | os.PathLike, vocabulary: str) -> bool:
    """Does the run's vocabulary copy differ from the file `vocabulary`?"""
    copy = epath.Path(model_dir) / VOCABULARY_FILE
    return copy.exists() and copy.read_bytes() != epath.Path(vocabulary).read_bytes()


def read(model_dir: str | os.PathLike) -> RunManifest:
    """The manifest of a samtone-train MODEL_DIR; its vocabulary path made absolute."""
    directory = epath.Path(model_dir)
    path = directory / MANIFEST_FILE
    if not path.exists():
        raise MissingFileError(f"{path} not found: the model directory must be the MODEL_DIR of "
                               "a samtone-train run (it writes model.json there)")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not a samtone run manifest: {error}") from error
    version = fields.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ConfigError(f"{path} has format_version {version!r}; this samtone reads "
                          f"version {FORMAT_VERSION}")
    manifest = RunManifest.from_json(fields, source=str(path))
    vocabulary = manifest.vocabulary
    if vocabulary and "://" not in vocabulary and not os.path.isabs(vocabulary):
        manifest = dataclasses.replace(manifest, vocabulary=os.fspath(directory / vocabulary))
    return manifest


def read_params(model_dir: str | os.PathLike, manifest: RunManifest | None = None, *,
                step: int | None = None, mesh: Mesh | None = None
                ) -> tuple[Any, int, Any, Mesh]:
    """(params, step, shardings, mesh): checkpoint `step` (default: the newest) of a MODEL_DIR
    (samtone-train or samtone-convert) laid out over `mesh` (default: the manifest's serving
    mesh) by the model's rules. Only the parameters are read, never the optimiser state."""
    manifest = manifest or read(model_dir)
    mesh = mesh or manifest.serving_mesh()
    shapes, shardings = manifest.params_layout(mesh)
    directory = run_dir.RunDir.at(model_dir).checkpoints
    described = (f"the {manifest.architecture} model of {epath.Path(model_dir) / MANIFEST_FILE}"
                 f" ({_sizes(manifest.t5_config)})")
    try:
        params, step = checkpoint_lib.read_params(directory, step=step, shardings=shardings,
                                                     shapes=shapes)
    except CheckpointError as error:  # e.g. a tree of another architecture
        raise CheckpointError(f"{error}\n(expected: {described})") from error
    check_shapes(_flat_shapes(params), _flat_shapes(shapes),
                 where=f"checkpoint step {step} in {directory}", what=described)
    return params, step, shardings, mesh


def _sizes(config: t5.T5Config) -> str:
    return ", ".join(f"{name}={getattr(config, name)}" for name in (
        "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj"))


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(leaf.shape) for name, leaf in
            traverse_util.flatten_dict(nn.unbox(tree), sep="/").items()}


def check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], *,
                 where: str, what: str) -> None:
    """Refuses parameters whose names or shapes differ, naming each and both shapes.

    Args:
      found, expected: "/"-joined parameter name -> shape.
      where: the parameters' origin ("checkpoint step 2 in ..."); what: the model they must
        fit ("the ade_spl model of .../model.json").
    """
    if found == expected:
        return

    def difference(name: str) -> str:
        if name not in found:
            return f"{name} is missing (expected shape {expected[name]})"
        if name not in expected:
            return f"{name} has shape {found[name]} but is not a parameter of the model"
        return f"{name} has shape {found[name]}, expected {expected[name]}"

    differences = [difference(name) for name in sorted(set(expected) | set(found))
                   if expected.get(name) != found.get(name)]
    more = f" (and {len(differences) - 8} more)" if len(differences) > 8 else ""
    raise CheckpointError(f"the parameters of {where} do not fit {what}: "
                          + "; ".join(differences[:8]) + more)
