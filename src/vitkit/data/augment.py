"""Batched augmentation on the training device, with a different random draw for every sample.

Per-image PIL transforms in DataLoader workers cannot feed even a small ViT on two CPU cores; the same
operations on a whole uint8 batch are a few tensor ops. Every op here draws its parameters per sample
(offsets, flips, op choice, magnitude, boxes) and applies them with vectorised indexing or grouped
calls, so a batch is not augmented "all the same way". All randomness comes from one torch.Generator,
so a run can be replayed exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_MEAN = (0.5, 0.5, 0.5)  # the original ViT / AugReg checkpoints: inputs in [-1, 1]
VIT_STD = (0.5, 0.5, 0.5)

AUTO_AUGMENTS = (None, "trivial", "randaugment")
# Soft targets that depend on the view a sample was cropped to: called with its (offset_y, offset_x,
# flip), each (B,), and returning (B, num_classes) probabilities, as a cached distillation teacher does.
ViewTargets = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_BINS = 31  # magnitude bins of TrivialAugmentWide and RandAugment


@dataclass
class AugmentConfig:
    """Which augmentations run; everything is off or neutral by default except the horizontal flip.

    The fields are the keys of a training recipe's ``augment`` and, with their metadata, flags of
    `vitkit train` (train.config: ``kind`` names a value kind, ``flag`` overrides the flag's name).
    """

    crop_padding: int = field(default=0, metadata={
        "help": "random crop at the stored size after padding each side by this many pixels (4 suits 32x32)",
        "kind": "non_negative_int", "metavar": "PIXELS"})
    padding_mode: str = field(default="constant", metadata={
        "help": "the padded crop's border: zeros or the mirrored image", "choices": ("constant", "reflect")})
    random_resized_crop: bool = field(default=False, metadata={
        "help": "instead of the padded crop: Inception-style crop of random area and aspect ratio"})
    rrc_scale: tuple[float, float] = field(default=(0.08, 1.0), metadata={
        "help": "random_resized_crop's area fraction range; (0.35, 1) suits small images", "kind": "portion",
        "metavar": ("LOW", "HIGH")})
    rrc_ratio: tuple[float, float] = field(default=(3 / 4, 4 / 3), metadata={
        "help": "random_resized_crop's aspect ratio range", "kind": "positive_float", "metavar": ("LOW", "HIGH")})
    hflip: bool = field(default=True, metadata={"help": "a random horizontal flip per image"})
    auto_augment: str | None = field(default=None, metadata={
        "help": "TrivialAugmentWide (trivial) or RandAugment per image", "choices": AUTO_AUGMENTS})
    randaugment_n: int = field(default=2, metadata={"help": "RandAugment's ops per image", "kind": "positive_int"})
    randaugment_m: int = field(default=9, metadata={
        "help": f"RandAugment's magnitude bin, 0..{_BINS - 1}", "kind": "non_negative_int"})
    random_erasing: float = field(default=0.0, metadata={
        "help": "probability per image of erasing a random box", "kind": "probability"})
    mixup_alpha: float = field(default=0.0, metadata={
        "help": "mixup alpha (0 turns it off; 0.8 is usual)", "kind": "non_negative_float", "flag": "mixup"})
    cutmix_alpha: float = field(default=0.0, metadata={
        "help": "cutmix alpha (0 turns it off; 1.0 is usual)", "kind": "non_negative_float", "flag": "cutmix"})
    mix_prob: float = field(default=1.0, metadata={
        "help": "probability that a batch is mixed at all; with both alphas > 0, one is picked per batch",
        "kind": "probability"})

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding={self.crop_padding}: must be >= 0 (4 is usual for 32x32 images)")
        if self.padding_mode not in ("constant", "reflect"):
            raise ValueError(f"padding_mode={self.padding_mode!r}: use 'constant' or 'reflect'")
        if self.auto_augment not in AUTO_AUGMENTS:
            raise ValueError(f"auto_augment={self.auto_augment!r}: use one of {AUTO_AUGMENTS}")
        if not 0 <= self.randaugment_m < _BINS:
            raise ValueError(f"randaugment_m={self.randaugment_m}: must be in 0..{_BINS - 1}")
        if self.randaugment_n < 1:
            raise ValueError(f"randaugment_n={self.randaugment_n}: must be >= 1")
        self.rrc_scale = tuple(self.rrc_scale)  # YAML gives lists
        self.rrc_ratio = tuple(self.rrc_ratio)
        lo, hi = self.rrc_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"rrc_scale={self.rrc_scale}: need 0 < low <= high <= 1, e.g. (0.08, 1.0)")
        if not 0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise ValueError(f"rrc_ratio={self.rrc_ratio}: need 0 < low <= high, e.g. (0.75, 1.333)")
        for name in ("random_erasing", "mix_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be a probability in [0, 1]")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0 (0 turns it off; 0.8/1.0 are usual)")

    @property
    def mixes(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0


class _Random:
    """Draws from ``generator`` on its own device and moves the result to ``device``.

    A CUDA generator keeps everything on the GPU; a CPU generator gives the same draws on any device.
    Without a generator, torch's default generator of ``device`` is used.
    """

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        self.generator = generator
        self.device = device
        self.source = generator.device if generator is not None else device

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.source).to(self.device)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.source).to(self.device)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(high, shape, generator=self.generator, device=self.source).to(self.device)

    def uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * self.rand(*shape)

    def scalars(self, count: int) -> list[float]:
        """``count`` uniform floats on the host, for per-batch decisions."""
        return torch.rand(count, generator=self.generator, device=self.source).tolist()


# ---------------------------------------------------------------------------------------------- spatial


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    index = torch.where(index < 0, -index, index)
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def draw_crop_flip(batch: int, padding: int, hflip: bool, rnd: _Random) -> tuple[torch.Tensor, ...]:
    """Per-sample (offset_y, offset_x, flip): offsets uniform in -padding..padding, flips with p 0.5."""
    zeros = torch.zeros(batch, dtype=torch.long, device=rnd.device)
    offset_y = rnd.randint(2 * padding + 1, batch) - padding if padding > 0 else zeros
    offset_x = rnd.randint(2 * padding + 1, batch) - padding if padding > 0 else zeros
    flip = rnd.rand(batch) < 0.5 if hflip else zeros.bool()
    return offset_y, offset_x, flip


def crop_flip(
    images: torch.Tensor, offset_y: torch.Tensor, offset_x: torch.Tensor, flip: torch.Tensor,
    padding_mode: str = "constant", reach: int | None = None,
) -> torch.Tensor:
    """Each image moved by its own (offset_y, offset_x) pixels, the window of its virtually padded
    copy, then mirrored where flip: one gather.

    No padded copy is made: each output pixel indexes the source directly; out-of-image pixels are zero
    (constant) or mirrored (reflect). reach bounds the offsets' size: a caller that drew them passes
    its padding; otherwise it is read from the offsets, which on a GPU waits for the device.
    """
    batch, _, height, width = images.shape
    device = images.device
    if reach is None:
        reach = int(max(offset_y.abs().max(), offset_x.abs().max())) if batch else 0
    if padding_mode == "reflect" and reach >= min(height, width):
        raise ValueError(f"reflect padding {reach} needs images larger than {reach} pixels")
    rows = torch.arange(height, device=device) + offset_y.to(device)[:, None]
    cols = torch.arange(width, device=device) + offset_x.to(device)[:, None]
    cols = torch.where(flip.to(device)[:, None], cols.flip(1), cols)
    valid = None
    if reach > 0 and padding_mode == "reflect":
        rows, cols = _reflect(rows, height), _reflect(cols, width)
    elif reach > 0:
        valid = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
    channels_last = images.permute(0, 2, 3, 1)  # gather whole RGB triples at once
    out = channels_last[torch.arange(batch, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if valid is not None:
        out = out.masked_fill(~valid[..., None], 0)
    return out.permute(0, 3, 1, 2).contiguous()


def random_resized_crop(
    images: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: bool,
    rnd: _Random,
    attempts: int = 10,
) -> torch.Tensor:
    """Per-sample crop of random area and aspect ratio, resized back to the input size (bilinear).

    Like torchvision's RandomResizedCrop: up to ``attempts`` draws per sample, the first that fits wins,
    else the whole image (center crop to the ratio range). The flip is folded into the sampling grid.
    """
    batch, channels, height, width = images.shape
    area = rnd.uniform(scale[0], scale[1], batch, attempts) * (height * width)
    log_ratio = rnd.uniform(math.log(ratio[0]), math.log(ratio[1]), batch, attempts)
    aspect = torch.exp(log_ratio)
    crop_w = torch.sqrt(area * aspect).round()
    crop_h = torch.sqrt(area / aspect).round()
    fits = (crop_w >= 1) & (crop_h >= 1) & (crop_w <= width) & (crop_h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)
    crop_w, crop_h = crop_w.gather(1, first).squeeze(1), crop_h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback = (width, round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fallback = (round(height * ratio[1]), height)
    else:
        fallback = (width, height)
    any_fit = fits.any(dim=1)
    crop_w = torch.where(any_fit, crop_w, torch.full_like(crop_w, fallback[0]))
    crop_h = torch.where(any_fit, crop_h, torch.full_like(crop_h, fallback[1]))
    left = torch.floor(rnd.rand(batch) * (width - crop_w + 1))
    top = torch.floor(rnd.rand(batch) * (height - crop_h + 1))
    scale_x = crop_w / width
    if hflip:
        scale_x = torch.where(rnd.rand(batch) < 0.5, -scale_x, scale_x)
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0] = scale_x
    theta[:, 0, 2] = (left + crop_w / 2) / width * 2 - 1
    theta[:, 1, 1] = crop_h / height
    theta[:, 1, 2] = (top + crop_h / 2) / height * 2 - 1
    grid = F.affine_grid(theta, [batch, channels, height, width], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------ TrivialAugment etc.

OPS = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
    "brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)  # fmt: skip
_OP = {name: i for i, name in enumerate(OPS)}
_GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
_SIGNED = frozenset({*_GEOMETRIC, "brightness", "color", "contrast", "sharpness"})


def magnitude_table(kind: str, height: int, width: int) -> torch.Tensor:
    """(len(OPS), 31) magnitudes per op and bin, as torchvision's TrivialAugmentWide / RandAugment define them.

    Shear as a slope, translation in pixels, rotation in degrees, enhancements as the change of the factor
    (1 + m), posterize as bits kept, solarize as the threshold.
    """
    bins = torch.arange(_BINS, dtype=torch.float32)
    table = torch.zeros(len(OPS), _BINS)
    if kind == "trivial":
        shear, tx, ty, rotate, enhance = 0.99, 32.0, 32.0, 135.0, 0.99
        posterize = 8 - (bins / ((_BINS - 1) / 6)).round()
    elif kind == "randaugment":
        shear, tx, ty, rotate, enhance = 0.3, 150.0 / 331.0 * width, 150.0 / 331.0 * height, 30.0, 0.9
        posterize = 8 - (bins / ((_BINS - 1) / 4)).round()
    else:
        raise ValueError(f"auto_augment={kind!r}: use 'trivial' or 'randaugment'")
    largest = {"shear_x": shear, "shear_y": shear, "translate_x": tx, "translate_y": ty, "rotate": rotate}
    largest |= {name: enhance for name in ("brightness", "color", "contrast", "sharpness")}
    for name, top in largest.items():
        table[_OP[name]] = torch.linspace(0.0, top, _BINS)
    table[_OP["posterize"]] = posterize
    table[_OP["solarize"]] = torch.linspace(255.0, 0.0, _BINS)
    return table


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    return other + factor * (x - other)


def _sharpness_degenerate(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter ([1 1 1; 1 5 1; 1 1 1] / 13) inside, the original pixels on the border."""
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(3, 1, 3, 3)
    smooth = F.conv2d(x, kernel, groups=3)
    out = x.clone()
    out[..., 1:-1, 1:-1] = smooth.round()
    return out


def _color_op(name: str, x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """One pixel op on uint8 (n, 3, H, W) with per-sample ``magnitude`` (n,)."""
    if name == "posterize":
        bits = magnitude.to(torch.int64)
        mask = torch.bitwise_left_shift(torch.full_like(bits, 255), 8 - bits).bitwise_and(255)
        mask = mask.to(torch.uint8).view(-1, 1, 1, 1)
        return x & mask
    if name == "solarize":
        return torch.where(x.float() >= magnitude.view(-1, 1, 1, 1), 255 - x, x)
    if name == "equalize":
        from torchvision.transforms.v2.functional import equalize  # imported late: torchvision takes ~2 s

        return equalize(x)
    xf = x.float()
    factor = (1.0 + magnitude).view(-1, 1, 1, 1)
    if name == "brightness":
        out = xf * factor
    elif name == "color":
        out = _blend(xf, _gray(xf), factor)
    elif name == "contrast":
        out = _blend(xf, _gray(xf).mean(dim=(1, 2, 3), keepdim=True), factor)
    elif name == "sharpness":
        out = _blend(xf, _sharpness_degenerate(xf), factor)
    elif name == "autocontrast":
        low = xf.amin(dim=(2, 3), keepdim=True)
        high = xf.amax(dim=(2, 3), keepdim=True)
        spread = high - low
        out = torch.where(spread > 0, (xf - low) * (255.0 / spread.clamp(min=1e-6)), xf)
    else:
        raise ValueError(f"unknown op {name!r}")
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _geometric(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Shear/translate/rotate about the image center with per-sample amounts, in one grid_sample call.

    The affine maps each output pixel back to its source (normalised coordinates); outside pixels are black.
    """
    n, channels, height, width = x.shape
    aspect = height / width
    zero = torch.zeros_like(magnitude)
    m = magnitude
    radians = torch.where(op == _OP["rotate"], m, zero) * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = cos
    theta[:, 1, 1] = cos
    theta[:, 0, 1] = -sin * aspect - torch.where(op == _OP["shear_x"], m, zero) * aspect
    theta[:, 1, 0] = sin / aspect - torch.where(op == _OP["shear_y"], m, zero) / aspect
    theta[:, 0, 2] = -2.0 * torch.where(op == _OP["translate_x"], m, zero) / width
    theta[:, 1, 2] = -2.0 * torch.where(op == _OP["translate_y"], m, zero) / height
    grid = F.affine_grid(theta, [n, channels, height, width], align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.to(torch.uint8)


def apply_ops(images: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Apply op ``op[i]`` with ``magnitude[i]`` to sample i of a uint8 batch; returns a new tensor.

    Samples are grouped by the op they drew, so each op runs once per batch on its subset.
    """
    out = images.clone()
    geometric = torch.zeros_like(op, dtype=torch.bool)
    for name in _GEOMETRIC:
        geometric |= op == _OP[name]
    index = torch.nonzero(geometric).flatten()
    if index.numel():
        out[index] = _geometric(out[index], op[index], magnitude[index])
    for name in ("brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize"):
        index = torch.nonzero(op == _OP[name]).flatten()
        if index.numel():
            out[index] = _color_op(name, out[index], magnitude[index])
    return out


def _draw_ops(
    table: torch.Tensor, signed: torch.Tensor, batch: int, rnd: _Random, bin_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: an op uniformly, a magnitude bin (uniform, or the fixed one), and a random sign."""
    op = rnd.randint(len(OPS), batch)
    bins = rnd.randint(_BINS, batch) if bin_index is None else torch.full_like(op, bin_index)
    magnitude = table[op, bins]
    flip = (rnd.rand(batch) < 0.5) & signed[op]
    return op, torch.where(flip, -magnitude, magnitude)


# ------------------------------------------------------------------------------------------ the module


class BatchAugment(torch.nn.Module):
    """uint8 (B, 3, h, w) + int64 labels -> float32 normalised (B, 3, image_size, image_size) + targets.

    Order: crop (padded or random-resized) and flip at the stored size, TrivialAugment/RandAugment on uint8,
    resize to ``image_size`` (so 32x32 data feeds a 224 model without storing 224 images), normalise,
    random erasing, then mixup/cutmix. Targets are the int64 labels when the batch was not mixed, else
    float (B, num_classes) mixed one-hot. Runs on whatever device the images are on.
    """

    def __init__(
        self, config: AugmentConfig, image_size: int, num_classes: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean={mean}, std={std}: need three values each, std > 0")
        self.config = config
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def extra_repr(self) -> str:
        return f"{self.config}, image_size={self.image_size}, num_classes={self.num_classes}"

    def _table(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.config.auto_augment, height, width, str(device))
        if key not in self._tables:
            table = magnitude_table(self.config.auto_augment, height, width).to(device)
            signed = torch.tensor([name in _SIGNED for name in OPS], device=device)
            self._tables[key] = (table, signed)
        return self._tables[key]

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
        mix: bool = True, view_targets: ViewTargets | None = None, auto_augment: bool = True,
    ) -> tuple[torch.Tensor, ...]:
        """Augmented, normalised images and targets; mix=False leaves this batch unmixed and
        auto_augment=False leaves out its TrivialAugment/RandAugment ops (a schedule may switch either
        on late).

        view_targets, if given, is called with each sample's crop offsets and flip and returns
        per-sample soft targets for that view (a distillation teacher's cached probabilities); they are
        mixed as the labels are and returned third.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"BatchAugment expects uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        cfg = self.config
        device = images.device
        labels = labels.to(device=device, dtype=torch.long)
        rnd = _Random(generator, device)
        batch, _, height, width = images.shape
        x = images
        soft = None
        if cfg.random_resized_crop:
            if view_targets is not None:
                raise ValueError("targets per view need the padded crop (crop_padding), not random_resized_crop")
            x = random_resized_crop(x, cfg.rrc_scale, cfg.rrc_ratio, cfg.hflip, rnd)
        else:
            view = draw_crop_flip(batch, cfg.crop_padding, cfg.hflip, rnd)
            if cfg.crop_padding > 0 or cfg.hflip:
                x = crop_flip(x, *view, cfg.padding_mode, reach=cfg.crop_padding)
            if view_targets is not None:
                soft = view_targets(*view)
        if cfg.auto_augment is not None and auto_augment:
            table, signed = self._table(height, width, device)
            randaugment = cfg.auto_augment == "randaugment"
            rounds, fixed_bin = (cfg.randaugment_n, cfg.randaugment_m) if randaugment else (1, None)
            for _ in range(rounds):
                op, magnitude = _draw_ops(table, signed, batch, rnd, fixed_bin)
                x = apply_ops(x, op, magnitude)
        out = preprocess(x, self.image_size, self.mean, self.std)
        if cfg.random_erasing > 0:
            out = random_erasing(out, cfg.random_erasing, rnd)
        targets: torch.Tensor = labels
        if cfg.mixes and mix:
            out, targets, soft = mix_batch(out, labels, self.num_classes, cfg, rnd, soft)
        return (out, targets) if view_targets is None else (out, targets, soft)


def preprocess(images: torch.Tensor, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Evaluation path: uint8 (B, 3, h, w) -> float32 normalised (B, 3, image_size, image_size), same device.

    Resizes with antialiased bilinear interpolation when the stored size differs (non-square input is
    resized to the square directly: the stored sets are square).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"preprocess expects uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    x = images.float()
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=x.device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], device=x.device).view(1, 3, 1, 1)
    return x.mul_(scale).sub_(shift)


def random_erasing(
    x: torch.Tensor,
    probability: float,
    rnd: _Random,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Per sample with ``probability``: replace a random box (area/ratio ranges as in the paper) by noise.

    The noise is standard normal per pixel, i.e. random colours in normalised space (timm's "pixel" mode).
    One draw per sample, with the box clipped to the image, instead of torchvision's retry loop.
    """
    batch, channels, height, width = x.shape
    apply = rnd.rand(batch) < probability
    box_area = rnd.uniform(area[0], area[1], batch) * (height * width)
    aspect = torch.exp(rnd.uniform(math.log(ratio[0]), math.log(ratio[1]), batch))
    box_h = torch.sqrt(box_area * aspect).round().clamp(1, height)
    box_w = torch.sqrt(box_area / aspect).round().clamp(1, width)
    top = torch.floor(rnd.rand(batch) * (height - box_h + 1))
    left = torch.floor(rnd.rand(batch) * (width - box_w + 1))
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    inside = (
        (rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1))
        & apply.view(-1, 1, 1)
    )  # fmt: skip
    noise = rnd.randn(batch, channels, height, width)
    return torch.where(inside.unsqueeze(1), noise, x)


def _beta(alpha: float, rnd: _Random) -> float:
    """One Beta(alpha, alpha) draw, seeded from the generator (torch's Beta sampler takes no generator)."""
    seed = int(rnd.scalars(1)[0] * 2**53)
    return random.Random(seed).betavariate(alpha, alpha)


def mix_batch(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: AugmentConfig, rnd: _Random,
    soft: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mixup or CutMix with the batch in reverse order; one lambda per batch from Beta(alpha, alpha).

    Returns int64 labels when this batch is not mixed (mix_prob), else float (B, num_classes) targets
    ``lam * onehot(y) + (1 - lam) * onehot(y reversed)``, with lam corrected to the real CutMix box area;
    soft (B, num_classes) targets, if given, are mixed with the same lam (a teacher's probabilities for
    the unmixed views: for CutMix, its answer weighted by area, not its answer on the pasted image).
    """
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    apply_draw, pick_draw, top_draw, left_draw = rnd.scalars(4)
    if apply_draw >= cfg.mix_prob:
        return x, labels, soft
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or pick_draw < 0.5)
    lam = _beta(cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha, rnd)
    partner = x.flip(0)
    if use_cutmix:
        height, width = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        center_y, center_x = int(top_draw * height), int(left_draw * width)
        y0, y1 = max(center_y - cut_h // 2, 0), min(center_y + cut_h // 2, height)
        x0, x1 = max(center_x - cut_w // 2, 0), min(center_x + cut_w // 2, width)
        x = x.clone()
        x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        x = x.mul(lam).add_(partner, alpha=1.0 - lam)
    one_hot = F.one_hot(labels, num_classes).to(x.dtype)
    if soft is not None:
        soft = soft.mul(lam).add_(soft.flip(0), alpha=1.0 - lam)
    return x, one_hot.mul(lam).add_(one_hot.flip(0), alpha=1.0 - lam), soft
