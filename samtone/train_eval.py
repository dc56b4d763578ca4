"""Evaluation during training: held-out pairs ranked with the current parameters.

Encodes with the same jitted, sharded tower functions as serving (samtone.inference), so the
numbers logged here are the numbers a served model gives.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
from absl import logging
from jax.sharding import Mesh

from samtone import evaluate
from samtone import inference
from samtone.data import files
from samtone.data.tokenizer import Tokenizer
from samtone.summaries import Summaries, format_metrics


class TrainingEvaluator:
    """Ranks the passages of `eval_data`'s pairs for each of its queries (P@1, MRR, NDCG@10)."""

    def __init__(self, model: nn.Module, param_shardings: Any, mesh: Mesh, rules,
                 tokenizer: Tokenizer, eval_data: str | Sequence[str], query_length: int,
                 passage_length: int, batch_size: int):
        self.examples = files.read_examples(eval_data)
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

        metrics = evaluate.evaluate_examples(
            bound("encode_queries"), bound("encode_passages"), self.tokenizer, self.examples,
            self.query_length, self.passage_length, self.batch_size)
        logging.info("eval at step %d on %d pairs: %s", step, len(self.examples),
                     format_metrics(metrics))
        summaries.scalars("eval", step, metrics)
        return metrics
