"""Evaluation during training: EVAL_DATA scored with the current parameters, as samtone-eval
scores a checkpoint.

EVAL_DATA is a BEIR folder (its `EvalConfig.split`, default "test", against its whole corpus),
held-out pairs (ranked against their unique passages), or graded pairs (every example
labelled, labels not all equal: Spearman and Pearson of cosine against the labels). It
encodes with the same jitted, sharded tower functions as serving (samtone.inference) and
searches with the same PassageIndex on the training mesh (samtone.evaluate), so the numbers
logged here are those `samtone-eval` gives for the checkpoint. Each evaluation goes to
TensorBoard (MODEL_DIR/eval) and to MODEL_DIR/eval/<data name>/<step>/metrics.json.
"""
from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
from absl import logging
from etils import epath
from jax.sharding import Mesh

from samtone import evaluate
from samtone import inference
from samtone import run_dir
from samtone.data import files
from samtone.data import retrieval
from samtone.data.tokenizer import Tokenizer
from samtone.summaries import Summaries, format_metrics
from samtone.train_config import EvalConfig


class TrainingEvaluator:
    """Scores `evaluation.data` with given parameters: retrieval metrics, or correlations."""

    def __init__(self, model: nn.Module, param_shardings: Any, mesh: Mesh, rules,
                 tokenizer: Tokenizer, evaluation: EvalConfig, *, query_length: int,
                 passage_length: int, model_dir: str | None = None):
        eval_data, split, batch_size = evaluation.data, evaluation.split, evaluation.batch_size
        self.graded_examples = None
        folder = retrieval.beir_folder(eval_data)
        if folder is not None:
            self.data = retrieval.read_beir(folder, split)
        else:
            examples = files.read_examples(eval_data)
            if retrieval.is_graded(examples):
                self.data, self.graded_examples = None, examples
            else:
                self.data = retrieval.from_examples(examples, retrieval.data_name(eval_data))
        self.name = retrieval.data_name(eval_data, split)
        self.model_dir = model_dir
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.query_length, self.passage_length = query_length, passage_length
        self.batch_size = batch_size
        tokens = inference.token_sharding(mesh, rules, batch_size)
        self.encoders = {method: inference.tower_encoder(model, method, param_shardings, tokens,
                                                         mesh, rules)
                         for method in ("encode_queries", "encode_passages")}

    def __call__(self, params, step: int, summaries: Summaries) -> dict[str, float]:
        def bound(method):
            return lambda tokens: self.encoders[method](params, tokens)

        encoder = inference.Encoder(bound("encode_queries"), bound("encode_passages"),
                                    self.tokenizer, self.query_length, self.passage_length,
                                    step, self.batch_size)
        started = time.perf_counter()
        rates = ""
        if self.data is None:
            metrics = evaluate.evaluate_graded(encoder, self.graded_examples)
            counts = {"num_pairs": len(self.graded_examples)}
        else:
            result = evaluate.evaluate_retrieval(encoder, self.data, mesh=self.mesh)
            metrics, counts, seconds = result.metrics, result.counts(), result.seconds
            rates = (f"; {result.num_passages / seconds['encode_passages']:.0f} passages/s, "
                     f"{result.num_queries / seconds['encode_queries']:.0f} queries/s, "
                     f"search {seconds['search']:.1f}s")
        logging.info("eval at step %d on %s (%s) in %.1fs%s: %s", step, self.name,
                     ", ".join(f"{value} {name[4:]}" for name, value in counts.items()),
                     time.perf_counter() - started, rates, format_metrics(metrics))
        summaries.scalars(run_dir.EVAL, step, metrics)
        if self.model_dir is not None and jax.process_index() == 0:
            evaluate.write_metrics(self.metrics_path(step),
                                   {**metrics, **counts, "step": int(step)})
        return metrics

    def metrics_path(self, step: int) -> epath.Path:
        """MODEL_DIR/eval/<data name>/<step>/metrics.json."""
        return (run_dir.RunDir.at(self.model_dir).eval_output(self.name) / str(step)
                / evaluate.METRICS_FILE)
