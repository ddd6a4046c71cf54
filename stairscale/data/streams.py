"""From a task config to lanes of documents: training sources and evaluation streams."""

from __future__ import annotations

import bisect
from typing import Callable, Iterator

import numpy as np

from stairscale.config import TaskConfig
from stairscale.data.tasks import AlgorithmicTask, Document, RandomWalkTask, TextTask


def build_task(cfg: TaskConfig) -> RandomWalkTask | AlgorithmicTask | TextTask:
    if cfg.name == "random_walk":
        return RandomWalkTask(positions=cfg.positions, seed=cfg.seed)
    if cfg.name == "algorithmic":
        return AlgorithmicTask(variables=cfg.variables, seed=cfg.seed)
    return TextTask(path=cfg.path or None, format=cfg.format, seed=cfg.seed)


class Curriculum:
    """Random-walk training document length by step: lengths[i] from steps[i] on."""

    def __init__(self, lengths: list[int], steps: list[int]):
        self.lengths, self.steps = lengths, steps
        self.step = 0

    @property
    def length(self) -> int:
        return self.lengths[bisect.bisect_right(self.steps, self.step) - 1]


def train_sources(task, cfg: TaskConfig, lanes: int, seed: int, curriculum: Curriculum) -> list[Iterator[Document]]:
    """One endless, seeded document source per lane."""
    rngs = [np.random.default_rng([seed, cfg.seed, lane]) for lane in range(lanes)]
    if isinstance(task, RandomWalkTask):
        return [_random_walks(task, rng, lambda: curriculum.length) for rng in rngs]
    documents = _at_least_one_per_lane(task, task.documents("train"), lanes)
    return [_shuffled_epochs(documents, rng) for rng in rngs]


def eval_documents(task, cfg: TaskConfig, split: str, lanes: int, length: int | None = None) -> list[Document]:
    """The documents of one evaluation stream (validation or test)."""
    if isinstance(task, RandomWalkTask):
        return task.documents(split, cfg.eval_docs, length or cfg.eval_length)
    if isinstance(task, AlgorithmicTask):
        return task.documents(split, cfg.eval_docs or None)
    return _at_least_one_per_lane(task, task.documents(split), lanes)


def _at_least_one_per_lane(task, documents: list[Document], lanes: int) -> list[Document]:
    """Language modelling on a few long texts (enwik8 is one): cut them into contiguous pieces,
    each a document of its own with a start token, so that every lane has text."""
    if len(documents) >= lanes or isinstance(task, (RandomWalkTask, AlgorithmicTask)):
        return documents
    total = sum(len(d.tokens) for d in documents)
    bos = np.array([task.vocab.bos_id], dtype=documents[0].tokens.dtype)
    pieces = []
    for doc in documents:
        body = doc.tokens[1:]  # without its start token
        count = max(1, round(lanes * len(doc.tokens) / total))
        bounds = np.linspace(0, len(body), count + 1).astype(int)
        pieces += [Document(np.concatenate([bos, body[a:b]]), None) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return pieces


def _random_walks(task: RandomWalkTask, rng: np.random.Generator, length: Callable[[], int]) -> Iterator[Document]:
    while True:
        yield task.document(length(), rng)


def _shuffled_epochs(documents: list[Document], rng: np.random.Generator) -> Iterator[Document]:
    while True:
        for index in rng.permutation(len(documents)):
            yield documents[index]
