"""`CrowdDataset`: a ShanghaiTech-layout split as (image, target density at the model's stride, count)."""
from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from datasets.density import density_map, downsample
from datasets.shanghaitech import ground_truth_file, image_size, list_images, load_image, read_h5_density, read_points
from datasets.transforms import multiple_size, random_crop_flip, random_erase, resize_to_multiple
from utils import distributed
from utils.errors import ToolkitError
from utils.runtime import derived_generator

DENSITY_SOURCES = ("adaptive", "fixed", "h5")
VALIDATION_SHARE = 0.1  # the share of a train split held out to choose checkpoints and constants (--val)


def largest_crop(images: list[Path], size_multiple: int) -> int:
    """The largest crop side (a multiple of `size_multiple`) that fits inside at least one of `images` (0: none);
    read from the image headers."""
    return max(min(image_size(p)) for p in images) // size_multiple * size_multiple


class CrowdDataset(Dataset):
    """Whole images resized to the model's size rule (evaluation), or random crops with flips (training).

    Items are `(image (3, h, w) in [0, 1], target (1, h/stride, w/stride), count)`. The count of a whole image is
    the number of annotated heads inside it (the `.mat` points), whatever `density` is. The target is made from the
    head points at the image's working size (or, with `density="h5"`, is the `ground_truth/IMG_<i>.h5` map scaled to
    sum to that number) and sum-pooled to the stride, so its sum is the count and GAME(0) is the absolute count
    error. A training crop's count is the sum of its window of the full-size target.

    The crop, its scale, flip and erasing of item i are drawn from a generator keyed by (seed, epoch, i)
    (`set_epoch`), so they do not depend on the global RNG, the loading order, the number of workers or where a run
    was resumed.
    """

    def __init__(self, root: str | Path, stride: int, size_multiple: int, density: str = "adaptive",
                 crop: int | None = None, flip: bool = True, max_images: int | None = None, cache: bool = True,
                 grey: bool = False, erase: float = 0.0, dense: float = 0.0, seed: int = 0,
                 scales: tuple[float, float] | None = None):
        if density not in DENSITY_SOURCES:
            raise ToolkitError(f"unknown density source {density!r}; choose from {', '.join(DENSITY_SOURCES)}")
        self.root = Path(root)
        self.images = list_images(self.root)[:max_images]
        self.stride, self.size_multiple, self.density = stride, size_multiple, density
        self.crop, self.flip, self.grey, self.erase, self.dense = crop, flip, grey, erase, dense
        if scales is not None and not 0 < scales[0] <= scales[1]:
            raise ToolkitError(f"scales must be two numbers 0 < low <= high, got {' '.join(map(str, scales))}")
        self.scales = None if scales is None else tuple(scales)
        self.seed, self.epoch = seed, 0
        self._cache: dict[tuple, object] | None = {} if cache else None
        for image in self.images:  # fail on a missing annotation now, not mid-epoch
            self._annotation(image)
            if density == "h5":
                self._annotation(image, ".h5")
        self._check_crop()

    def _check_crop(self) -> None:
        """A crop larger than every image would be mostly padding: refuse it before any work."""
        if self.crop is None:
            return
        if self.crop <= 0 or self.crop % self.size_multiple:
            raise ToolkitError(f"crop must be a positive multiple of {self.size_multiple}, got {self.crop}")
        fits = largest_crop(self.images, self.size_multiple)
        if self.crop > fits:
            raise ToolkitError(f"crop {self.crop} is larger than every image of {self.root}: "
                               + (f"at most {fits} fits one (a multiple of {self.size_multiple})" if fits else
                                  f"no image has both sides of at least {self.size_multiple} px"))

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

    def _annotation(self, image: Path, suffix: str = ".mat") -> Path:
        """The head points (`.mat`, what every count comes from) or, with suffix ".h5", the h5 density."""
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
        return self._cached(("sizes",), lambda: [multiple_size(*image_size(p), self.size_multiple)
                                                 for p in self.images])  # headers only: no decoding

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
        points = read_points(self._annotation(path), h, w)
        if self.density == "h5":
            h5 = self._annotation(path, ".h5")
            full = read_h5_density(h5)
            if full.shape != (h, w):
                raise ToolkitError(f"{h5}: density is {full.shape}, image is {(h, w)}")
            return image, _scaled_to(full, len(points), h5), float(len(points))
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
            den *= count / max(float(den.sum(dtype=torch.float64)), 1e-12)
        else:
            den = torch.from_numpy(density_map(resized_points(source, image.shape[-2:], (h, w)), (h, w), self.density))
        return resize_to_multiple(image, self.size_multiple), downsample(den, self.stride)[None], count

    def holdout(self, share: float, seed: int) -> tuple[CrowdDataset, CrowdDataset]:
        """(training part, validation part): a `share` of the images (at least one) drawn by `seed`, each part keeping
        the split's image order; the validation part is whole images with no erasing, as a test split is scored."""
        n = len(self)
        held = held_out(n, share, seed)
        if len(held) == n:
            raise ToolkitError(f"a validation share of {share:g} of the {n} images of {self.root} leaves none to "
                               "train on: lower --val, or 0 for no validation part")
        return (self.subset(i for i in range(n) if i not in held),
                self.subset(sorted(held), crop=None, erase=0.0, dense=0.0, scales=None))

    def subset(self, indices: Iterable[int], **settings) -> CrowdDataset:
        """The images at `indices` (in that order) with this dataset's settings, or the `settings` given (`crop`,
        `erase`, `dense`, `flip`, `scales`)."""
        part = copy.copy(self)
        part.images = [self.images[i] for i in indices]
        part._cache = {} if self._cache is not None else None  # keyed by index: a part needs its own
        for name, value in settings.items():
            if name not in ("crop", "erase", "dense", "flip", "scales"):
                raise TypeError(f"subset() got an unexpected setting {name!r}")
            setattr(part, name, value)
        part._check_crop()
        return part

    def head_points(self, index: int) -> np.ndarray:
        """(N, 2) head points (x, y) of whole image `index`, in the pixels of the image `__getitem__` returns."""
        size = image_size(self.images[index])
        points = read_points(self._annotation(self.images[index]), *size)
        return resized_points(points, size, multiple_size(*size, self.size_multiple))

    def __getitem__(self, index: int):
        if self.crop is None:
            return self._cached(("whole", index), lambda: self._whole(index))
        gen = derived_generator(self.seed, self.epoch, index)
        image, den = random_crop_flip(self._load(index)[0], self._full_density(index), self.crop, self.flip, gen,
                                      self.dense, self.scales)
        image, den = random_erase(image, den, self.erase, gen)
        return image, downsample(den, self.stride)[None], float(den.sum())


def resized_points(points: np.ndarray, size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """Head points (x, y) of an image of `size` (h, w) in the pixels of the image resized to `new_size`; a head
    inside the image stays inside the resized one (rounding could put x · w / W at w)."""
    (h0, w0), (h, w) = size, new_size
    scaled = points * np.array([w / w0, h / h0])
    return np.minimum(scaled, np.nextafter(np.array([w, h], dtype=np.float64), 0))


def _scaled_to(density: np.ndarray, heads: int, path: Path) -> np.ndarray:
    """An h5 density scaled to sum to the number of annotated heads, the ground truth whatever the map holds (a map
    made by a generator that loses the mass of border heads sums to less)."""
    total = float(density.sum(dtype=np.float64))
    if not np.isfinite(total) or total < 0 or (total == 0 and heads > 0):
        raise ToolkitError(f"{path}: the density sums to {total:g} but the image has {heads} annotated heads")
    return density if total == 0 else (density * (heads / total)).astype(np.float32)


def held_out(n: int, share: float, seed: int) -> set[int]:
    """The indices of the validation part of a split of `n` images: a `share` of them (at least one) drawn by `seed`
    (`CrowdDataset.holdout`, and the rf-mask refill's choice on a calibration split)."""
    return set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max(1, round(share * n))].tolist())


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
