"""`CrowdDataset`: a ShanghaiTech-layout split as (image, target density at the model's stride, count)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from datasets.density import density_map, downsample
from datasets.shanghaitech import ground_truth_file, list_images, load_image, read_h5_density, read_points
from datasets.transforms import multiple_size, random_crop_flip, random_erase, resize_to_multiple
from utils import distributed
from utils.errors import ToolkitError
from utils.runtime import derived_generator

DENSITY_SOURCES = ("adaptive", "fixed", "h5")


class CrowdDataset(Dataset):
    """Whole images resized to the model's size rule (evaluation), or random crops with flips (training).

    Items are `(image (3, h, w) in [0, 1], target (1, h/stride, w/stride), count)`. The target is made from the
    head points at the image's working size and sum-pooled to the stride, so its sum is the number of heads; the
    count of a whole image is the number of annotated heads inside it.

    The crop, flip and erasing of item i are drawn from a generator keyed by (seed, epoch, i) (`set_epoch`), so they
    do not depend on the global RNG, the loading order, the number of workers or where a run was resumed.
    """

    def __init__(self, root: str | Path, stride: int, size_multiple: int, density: str = "adaptive",
                 crop: int | None = None, flip: bool = True, max_images: int | None = None, cache: bool = True,
                 grey: bool = False, erase: float = 0.0, seed: int = 0):
        if density not in DENSITY_SOURCES:
            raise ToolkitError(f"unknown density source {density!r}; choose from {', '.join(DENSITY_SOURCES)}")
        if crop is not None and (crop <= 0 or crop % size_multiple):
            raise ToolkitError(f"crop must be a positive multiple of {size_multiple}, got {crop}")
        self.root = Path(root)
        self.images = list_images(self.root)[:max_images]
        self.stride, self.size_multiple, self.density = stride, size_multiple, density
        self.crop, self.flip, self.grey, self.erase = crop, flip, grey, erase
        self.seed, self.epoch = seed, 0
        self._cache: dict[tuple, object] | None = {} if cache else None
        for image in self.images:  # fail on a missing annotation now, not mid-epoch
            self._annotation(image)

    @classmethod
    def for_model(cls, root: str | Path, model, **kwargs) -> CrowdDataset:
        """A dataset shaped by the model's stride and size rule; grey models read the JPEG's own luma."""
        return cls(root, model.stride, model.size_multiple, grey=model.native_channels == 1, **kwargs)

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Draw the crops of `epoch` (and of `seed`, when given) from now on."""
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.images]

    def _annotation(self, image: Path) -> Path:
        suffix = ".h5" if self.density == "h5" else ".mat"
        path = ground_truth_file(image, suffix)
        if path is None:
            raise ToolkitError(f"no ground truth for {image} (expected ground_truth/"
                               f"{'GT_' + image.stem + '.mat' if suffix == '.mat' else image.stem + '.h5'})")
        return path

    def counts(self) -> np.ndarray:
        """Ground-truth count of every image (number of heads inside it)."""
        return np.array([self._load(i)[2] for i in range(len(self))], dtype=np.float64)

    def sizes(self) -> list[tuple[int, int]]:
        """(h, w) of every item as `__getitem__` returns it."""
        if self.crop is not None:
            return [(self.crop, self.crop)] * len(self)
        return [multiple_size(*self._load(i)[0].shape[-2:], self.size_multiple) for i in range(len(self))]

    def smallest_side(self) -> int:
        """The shortest side of any item, e.g. the largest patch that fits every image."""
        return min(min(hw) for hw in self.sizes())

    def _cached(self, key: tuple, make):
        """`make()` once per key when caching is on (decoded images, full densities, whole-image items)."""
        if self._cache is None:
            return make()
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _load(self, index: int) -> tuple[torch.Tensor, np.ndarray, float]:
        """(image, head points or the h5 density, count)."""
        return self._cached(("source", index), lambda: self._read(index))

    def _read(self, index: int) -> tuple[torch.Tensor, np.ndarray, float]:
        path = self.images[index]
        image = load_image(path, self.grey)
        h, w = image.shape[-2:]
        if self.density == "h5":
            full = read_h5_density(self._annotation(path))
            if full.shape != (h, w):
                raise ToolkitError(f"{self._annotation(path)}: density is {full.shape}, image is {(h, w)}")
            return image, full, float(full.sum())
        points = read_points(self._annotation(path), h, w)
        return image, points, float(len(points))

    def _full_density(self, index: int) -> torch.Tensor:
        image, source, _ = self._load(index)
        if self.density == "h5":
            return torch.from_numpy(source)
        return self._cached(("density", index), lambda: torch.from_numpy(
            density_map(source, tuple(image.shape[-2:]), self.density)))

    def _whole(self, index: int):
        image, source, count = self._load(index)
        h, w = multiple_size(*image.shape[-2:], self.size_multiple)
        if self.density == "h5":
            full = torch.from_numpy(source)[None, None]
            den = F.interpolate(full, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            den *= count / max(float(den.sum()), 1e-12)
        else:
            scale = np.array([w / image.shape[-1], h / image.shape[-2]])
            den = torch.from_numpy(density_map(source * scale, (h, w), self.density))
        return resize_to_multiple(image, self.size_multiple), downsample(den, self.stride)[None], count

    def __getitem__(self, index: int):
        if self.crop is None:
            return self._cached(("whole", index), lambda: self._whole(index))
        gen = derived_generator(self.seed, self.epoch, index)
        image, den = random_crop_flip(self._load(index)[0], self._full_density(index), self.crop, self.flip, gen)
        image, den = random_erase(image, den, self.erase, gen)
        return image, downsample(den, self.stride)[None], float(den.sum())


def same_size_batches(sizes: list[tuple[int, int]], batch_size: int, shuffle: bool = False,
                      generator: torch.Generator | None = None) -> list[list[int]]:
    """Indices grouped into batches of equal image size (ShanghaiTech A sizes vary; B and synthetic do not)."""
    order = torch.randperm(len(sizes), generator=generator).tolist() if shuffle else range(len(sizes))
    groups: dict[tuple[int, int], list[int]] = {}
    for i in order:
        groups.setdefault(sizes[i], []).append(i)
    batches = [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


class EqualSizeBatches:
    """(indices, (images, targets, counts)) per batch of equal-size items of `dataset`, with a length.

    With `shard`, under torchrun, this rank's share of the batches (every world_size-th; `pad`: wrapped around so
    every rank takes as many steps); without torchrun, all of them."""

    def __init__(self, dataset: CrowdDataset, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, shard: bool = False, pad: bool = False):
        self.dataset = dataset
        self.order = same_size_batches(dataset.sizes(), batch_size, shuffle, generator)
        if shard:
            self.order = distributed.shard(self.order, pad)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return zip(self.order, DataLoader(self.dataset, batch_sampler=self.order), strict=True)
