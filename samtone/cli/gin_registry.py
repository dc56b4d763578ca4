"""The Gin registry: every configurable samtone exposes, registered in one place.

Library modules stay Gin-free; this file wraps their constructors and functions with
`gin.external_configurable` under the short names the files in gin/ and configs/ use. Only
the command-line layer imports it, so embedding text or reading a checkpoint never loads Gin:

  train                       samtone.train.train (the loop)
  DataConfig, CheckpointConfig, EvalConfig
                              its groups of settings (samtone.train_config)
  distributed                 initialize_distributed below (jax.distributed.initialize)
  t5_1_1_config               T5.1.1 preset by size name, with field overrides
  dual_encoder                DualEncoder(config, architecture, projection_dim)
  losses.samtone_loss, losses.in_batch_softmax_loss, losses.pair_loss, losses.cosent_loss
  make_optimizer              samtone.optimizers.make_optimizer
  make_mesh, logical_axis_rules   samtone.partitioning
  make_batch_iterator         samtone.data.pipeline.make_batch_iterator
  smoke_path                  path of a file shipped in samtone/data/smoke/
  make_seqio_batch_iterator, tfds_task, add_tfds_retrieval_task
                              samtone.tasks / samtone.data.seqio_source (extra `seqio`),
                              imported on first call so that nothing else loads TensorFlow
"""
from __future__ import annotations

import os
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
from samtone import train_config
from samtone.data import pipeline
from samtone.errors import ConfigError
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

    `auto=True` lets JAX find the cluster itself (Cloud TPU pods, SLURM, Open MPI); it fills in
    only what is None, so `local_device_ids` given with it still count (launch/slurm.sh gives
    all of a node's GPUs, where JAX's SLURM default is one GPU per process).
    `cpu_collectives="gloo"` is needed for CPU-only multi-process runs (tests, laptops).
    With neither a coordinator nor `auto`, this is a single-process run and does nothing.

    The launchers export SAMTONE_EXPECTED_LOCAL_DEVICES, the devices they gave each host;
    a process that sees another number raises ConfigError, before a mesh is built on the wrong
    devices (a CPU-only jaxlib, one GPU of eight).
    """
    if coordinator_address is None and not auto:
        return
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids)
    found = jax.local_device_count()
    logging.info("joined distributed job: process %d of %d, %d local devices",
                 jax.process_index(), jax.process_count(), found)
    expected = os.environ.get("SAMTONE_EXPECTED_LOCAL_DEVICES", "").strip()
    if expected and expected != str(found):
        kind = {"gpu": "GPU", "tpu": "TPU"}.get(jax.local_devices()[0].platform, "CPU device")
        hint = ("JAX found no GPU or TPU (a CPU-only jax?): pip install 'samtone[cuda]' "
                "(GPUs) or 'samtone[tpu]' (TPU VMs)" if kind == "CPU device"
                else f"check distributed.local_device_ids ({local_device_ids}) and the job's "
                     "device binding")
        raise ConfigError(f"this process sees {found} {kind}{'s' * (found != 1)}, the launcher "
                          f"gave this host {expected} (SAMTONE_EXPECTED_LOCAL_DEVICES); {hint}")


gin.external_configurable(train_lib.train, name="train")
for _group in (train_config.DataConfig, train_config.CheckpointConfig, train_config.EvalConfig):
    gin.external_configurable(_group)
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


# The seqio extra brings TensorFlow: its functions are imported when a config calls them.
def make_seqio_batch_iterator(*args, **kwargs):
    """samtone.data.seqio_source.make_seqio_batch_iterator (imports TensorFlow)."""
    from samtone import tasks  # pylint: disable=import-outside-toplevel
    return tasks.make_seqio_batch_iterator(*args, **kwargs)


def tfds_task(*args, **kwargs):
    """samtone.tasks.tfds_task (imports TensorFlow)."""
    from samtone import tasks  # pylint: disable=import-outside-toplevel
    return tasks.tfds_task(*args, **kwargs)


def add_tfds_retrieval_task(*args, **kwargs):
    """samtone.tasks.add_tfds_retrieval_task (imports TensorFlow)."""
    from samtone import tasks  # pylint: disable=import-outside-toplevel
    return tasks.add_tfds_retrieval_task(*args, **kwargs)


for _seqio_function in (make_seqio_batch_iterator, tfds_task, add_tfds_retrieval_task):
    gin.external_configurable(_seqio_function)
