"""The Gin registry: every configurable samtone exposes, registered in one place.

Library modules stay Gin-free; this file wraps their constructors and functions with
`gin.external_configurable` under the short names the files in gin/ and configs/ use:

  train                       samtone.train.train (the loop)
  distributed                 initialize_distributed below (jax.distributed.initialize)
  t5_1_1_config               T5.1.1 preset by size name, with field overrides
  dual_encoder                DualEncoder(config, architecture, projection_dim)
  losses.samtone_loss, losses.in_batch_softmax_loss, losses.pair_loss, losses.cosent_loss
  make_optimizer              samtone.optimizers.make_optimizer
  make_mesh, logical_axis_rules   samtone.partitioning
  make_batch_iterator         samtone.data.pipeline.make_batch_iterator
  smoke_path                  path of a file shipped in samtone/data/smoke/

Gin config files are looked up on the search path: the current directory, any
`--gin_search_paths`, then the folder holding samtone's gin/ and configs/ (the repository
root for a source checkout or an editable install, `<prefix>/share/samtone` otherwise).
"""
from __future__ import annotations

import os
import pathlib
import site
import sys
import sysconfig
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
from absl import logging

from samtone import data as data_lib
from samtone import losses
from samtone import optimizers
from samtone import partitioning
from samtone import train as train_lib
from samtone.data import pipeline
from samtone.models import dual_encoder as dual_encoder_lib
from samtone.models import t5

_DTYPE_FIELDS = ("dtype", "param_dtype")


def t5_1_1_config(size: str = gin.REQUIRED, **overrides) -> t5.T5Config:
    """A T5.1.1 preset ("tiny" ... "xxl") with fields replaced; dtypes may be given by name."""
    for field in _DTYPE_FIELDS:
        if isinstance(overrides.get(field), str):
            overrides[field] = jnp.dtype(overrides[field])
    return t5.t5_1_1_config(size, **overrides)


def dual_encoder(config: t5.T5Config = gin.REQUIRED, architecture: str = "ade_spl",
                 projection_dim: int = 768) -> dual_encoder_lib.DualEncoder:
    """The Flax dual encoder; a function so Gin never subclasses the Flax module."""
    return dual_encoder_lib.DualEncoder(config, architecture=architecture,
                                        projection_dim=projection_dim)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None,
                           auto: bool = False,
                           cpu_collectives: str | None = None) -> None:
    """Joins a multi-process JAX job: explicitly (coordinator given) or auto-detected (`auto`).

    `auto=True` lets JAX find the cluster itself (Cloud TPU pods, SLURM, Open MPI).
    `cpu_collectives="gloo"` is needed for CPU-only multi-process runs (tests, laptops).
    With neither a coordinator nor `auto`, this is a single-process run and does nothing.
    """
    if coordinator_address is None and not auto:
        return
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator_address is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   local_device_ids=local_device_ids)
    logging.info("joined distributed job: process %d of %d, %d local devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count())


gin.external_configurable(train_lib.train, name="train")
gin.external_configurable(initialize_distributed, name="distributed")
gin.external_configurable(t5_1_1_config, name="t5_1_1_config")
gin.external_configurable(dual_encoder, name="dual_encoder")
for _loss in (losses.samtone_loss, losses.in_batch_softmax_loss, losses.pair_loss,
              losses.cosent_loss):
    gin.external_configurable(_loss, module="losses")
gin.external_configurable(optimizers.make_optimizer, name="make_optimizer")
gin.external_configurable(partitioning.make_mesh, name="make_mesh")
gin.external_configurable(partitioning.logical_axis_rules, name="logical_axis_rules")
gin.external_configurable(pipeline.make_batch_iterator, name="make_batch_iterator")
gin.external_configurable(data_lib.smoke_path, name="smoke_path")


def resources_dir() -> pathlib.Path | None:
    """The folder holding gin/ and configs/: repo root (source, editable) or installed data."""
    package_dir = pathlib.Path(__file__).resolve().parent
    candidates = [package_dir.parent]
    for prefix in (sysconfig.get_path("data"), sys.prefix, site.getuserbase()):
        candidates.append(pathlib.Path(prefix) / "share" / "samtone")
    for candidate in candidates:
        if (candidate / "gin").is_dir() and (candidate / "configs").is_dir():
            return candidate
    return None


def search_paths(extra: Sequence[str] = ()) -> list[str]:
    """Where config files are looked for, in order: cwd, `extra`, samtone's own folder."""
    paths = [os.getcwd(), *extra]
    resources = resources_dir()
    if resources is not None:
        paths.append(str(resources))
    return paths


def _use_search_paths_only() -> None:
    """Stops Gin from also reading config paths as Python packages.

    Gin's package reader takes "configs/x.gin" for a file of a package `configs`: it logs an
    error for every miss and crashes on a namespace package (any folder named configs/ on
    sys.path). samtone finds config files through the search paths alone.
    """
    from gin import resource_reader  # pylint: disable=import-outside-toplevel
    readers = gin.config._FILE_READERS  # pylint: disable=protected-access
    readers[:] = [entry for entry in readers
                  if entry[1] is not resource_reader.system_path_file_exists]


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (),
          extra_search_paths: Sequence[str] = (), finalize: bool = True) -> None:
    """Parses config files then bindings; Gin's own errors (file, line, binding) propagate."""
    _use_search_paths_only()
    for path in search_paths(extra_search_paths):
        gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(gin_files, bindings, finalize_config=finalize)


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """Turns t5x-style `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE`."""
    rewritten = []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin."):].split("=", 1)
            rewritten.append(f"--gin_bindings={name} = {value}")
        else:
            rewritten.append(arg)
    return rewritten
