"""stats.json: RGB mean, std and the PCA of the pixel covariance (AlexNet's lighting noise).

Workers return per-image sufficient statistics of a pixel sample (count, sum, sum of outer
products, in [0, 1]); sums compose exactly, so per-shard sums saved by the packer give the
same stats after a resume as in one uninterrupted pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PixelMoments:
    count: int = 0
    sum: np.ndarray = field(default_factory=lambda: np.zeros(3))
    outer: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))

    def add(self, count: int, s, outer) -> None:
        self.count += int(count)
        self.sum += np.asarray(s, dtype=np.float64).reshape(3)
        self.outer += np.asarray(outer, dtype=np.float64).reshape(3, 3)

    def stats(self) -> dict:
        """The stats.json dict. eigvec[i][j] is component i (R, G, B) of eigenvector j, the
        eigenvectors being the columns, in the order of eigval (descending)."""
        if self.count < 2:
            raise ValueError("stats.json needs train pixels: the train split packed no image")
        mean = self.sum / self.count
        cov = self.outer / self.count - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = eigval[order], eigvec[:, order]
        # fix each eigenvector's sign (eigh's is arbitrary): largest component positive
        signs = np.sign(eigvec[np.abs(eigvec).argmax(0), np.arange(3)])
        eigvec = eigvec * np.where(signs == 0, 1, signs)
        return {
            "mean": mean.tolist(),
            "std": np.sqrt(np.clip(np.diag(cov), 0, None)).tolist(),
            "eigval": np.clip(eigval, 0, None).tolist(),
            "eigvec": eigvec.tolist(),
        }
