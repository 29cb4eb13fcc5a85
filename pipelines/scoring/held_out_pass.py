"""One pass over the test split that evaluation, MIG and the figures share, without holding the
split in memory: at 10^6 test images a list of batches is tens of GB, while what MIG and the
figures need is small (posterior means, keys, labels, factors and the first few examples)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

MAX_LATENT_POINTS = 5000  # the latent plot's points: more only blur it and slow it down
FIRST_EXAMPLES = 8  # the reconstruction grid's examples


@dataclass
class Noted:
    """What a pass noted, as plain arrays: it travels back from a Ray task and merges with the
    other shards' (Summary)."""

    first: np.ndarray | None = None
    means: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    factors: list[np.ndarray] = field(default_factory=list)
    latent_points: int = 0


class HeldOutPass:
    """The test batches on their way to `vae.evaluate`, noting as they go by the first examples
    and the posterior means with their keys, labels and factors (where batches carry them): of
    every example when MIG needs them (`all_means`), else of the first MAX_LATENT_POINTS for
    the latent plot. Iterate it once."""

    def __init__(self, model, batches: Iterable[dict], all_means: bool) -> None:
        self.model, self.batches, self.all_means = model, batches, all_means
        self.first: torch.Tensor | None = None
        self.means: list[np.ndarray] = []
        self.keys: list[str] = []
        self.labels: list[np.ndarray] = []
        self.factors: list[np.ndarray] = []
        self.examples = 0
        self.latent_points = 0  # how many of the noted means the latent plot shows

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches:
            x = batch["x"]
            if self.first is None:
                self.first = x[:FIRST_EXAMPLES].clone()
            under_cap = self.examples < MAX_LATENT_POINTS
            if self.all_means or under_cap:
                with torch.no_grad():
                    self.means.append(self.model.embed(x)[0].float().cpu().numpy())
                self.keys.extend(batch["key"])
                if batch.get("label") is not None:
                    self.labels.append(np.asarray(batch["label"]))
                if batch.get("factors") is not None:
                    self.factors.append(batch["factors"])
                if under_cap:
                    self.latent_points += len(x)
            self.examples += len(x)
            yield batch

    def noted(self) -> Noted:
        first = None if self.first is None else self.first.numpy()
        return Noted(first, self.means, self.labels, self.factors, self.latent_points)

    def all_posterior_means(self) -> np.ndarray:
        return np.concatenate(self.means).astype(np.float64)

    def all_factors(self) -> np.ndarray:
        """The noted examples' factors, in the order of all_posterior_means."""
        return np.concatenate(self.factors)

    def latent(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The latent plot's points and their labels (None when the source has none)."""
        n = self.latent_points
        labels = np.concatenate(self.labels)[:n] if self.labels else None
        return np.concatenate(self.means)[:n], labels


class Summary:
    """The noted extras of a split's shards, in shard order, read as one pass's: the first
    examples, the latent plot's first MAX_LATENT_POINTS means, every mean and factor (MIG)."""

    def __init__(self, parts: list[Noted]) -> None:
        firsts = [p.first for p in parts if p.first is not None]
        self.first = torch.from_numpy(firsts[0][:FIRST_EXAMPLES].copy()) if firsts else None
        self.parts = parts

    def all_posterior_means(self) -> np.ndarray:
        return np.concatenate([m for p in self.parts for m in p.means]).astype(np.float64)

    def all_factors(self) -> np.ndarray:
        return np.concatenate([f for p in self.parts for f in p.factors])

    def latent(self) -> tuple[np.ndarray, np.ndarray | None]:
        means, labels, n = [], [], 0
        for part in self.parts:
            if n >= MAX_LATENT_POINTS:
                break
            take = min(part.latent_points, MAX_LATENT_POINTS - n)
            if take == 0:
                continue
            means.append(np.concatenate(part.means)[:take])
            if part.labels:
                labels.append(np.concatenate(part.labels)[:take])
            n += take
        if not means:
            return np.zeros((0, 0), dtype=np.float32), None
        return np.concatenate(means), np.concatenate(labels) if labels else None
