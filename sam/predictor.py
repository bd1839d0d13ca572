"""`SamPredictor`: encode an image once, then answer prompts with masks."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from . import runtime
from .model import Sam
from .transforms import ResizeLongestSide

log = logging.getLogger(__name__)

_DTYPES = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
PRECISIONS = tuple(_DTYPES)
RESIZES = ("pil", "torch")


def as_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Return an HxWx3 uint8 array; grayscale, alpha and 16-bit images are converted,
    anything else is refused with a message naming `name`."""
    image = np.asarray(image)
    if image.dtype == np.bool_ or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise ValueError(f"{name}: expected an HxWx3 uint8 RGB array, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(
            f"{name}: expected an HxWx3 RGB (or HxW gray, HxWx4 RGBA) array, got shape {image.shape}"
        )
    if image.shape[2] == 4:
        image = image[..., :3]
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name}: empty image of shape {image.shape}")
    if image.dtype.kind == "u" and image.dtype.itemsize == 2:  # also big-endian ('>u2')
        image = (image.astype(np.uint16) >> 8).astype(np.uint8)  # as OpenCV converts 16-bit
    elif image.dtype != np.uint8:
        raise ValueError(
            f"{name}: expected uint8 (or uint16) pixels, got {image.dtype}; convert floats "
            "with (image * 255).round().astype(np.uint8)"
        )
    return np.ascontiguousarray(image)


def pil_to_rgb(im) -> np.ndarray:
    """A PIL image as an HxWx3 uint8 RGB array, EXIF orientation applied (as OpenCV's
    ``imread`` does). 16- and 32-bit grayscale is scaled to 8 bits, not clipped (Pillow's
    ``convert("RGB")`` would clip it to 255, a nearly white image); float images in
    [0, 1] are scaled by 255."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode == "I":
        return as_rgb_uint8(np.clip(np.asarray(im), 0, 65535).astype(np.uint16))
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        a = a * 255 if np.nanmax(a, initial=0) <= 1.0 else a
        return as_rgb_uint8(np.nan_to_num(np.clip(a, 0, 255)).round().astype(np.uint8))
    return np.asarray(im.convert("RGB"))


class SamPredictor:
    """Same public interface as the reference predictor, plus:

    - ``precision="bf16"|"fp16"`` runs encoder and decoder under autocast;
    - ``resize="torch"`` resizes on the model's device (antialiased bilinear) instead of
      Pillow; Pillow (the default) matches the reference bit for bit;
    - ``set_images`` encodes several images in one forward pass; ``select(i)`` makes one
      of them current for ``predict``.
    """

    def __init__(self, sam_model: Sam, *, precision: str = "fp32", resize: str = "pil") -> None:
        super().__init__()
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        if resize not in RESIZES:
            raise ValueError(f"resize must be 'pil' or 'torch', got {resize!r}")
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.autocast_dtype = _DTYPES[precision]
        self.resize = resize
        self.reset_image()

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self._all_features: torch.Tensor | None = None
        self._sizes: list[tuple[tuple[int, int], tuple[int, int]]] = []

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ images
    def _to_input(self, image: np.ndarray, image_format: str) -> torch.Tensor:
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = as_rgb_uint8(image)
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        if self.resize == "pil":
            resized = self.transform.apply_image(np.ascontiguousarray(image))
            return torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None]
        with warnings.catch_warnings():  # read-only arrays (np.asarray of a PIL image) are
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            t = torch.as_tensor(np.ascontiguousarray(image), device=self.device)  # only read
        t = t.permute(2, 0, 1)[None].float()
        return self.transform.apply_image_torch(t).clamp_(0, 255).round_()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode an HxWx3 uint8 image (grayscale, RGBA and uint16 are converted)."""
        image = as_rgb_uint8(image)
        x = self._to_input(image, image_format)
        self.set_torch_image(x, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Encode an already resized 1x3xHxW image whose longest side is the model input size."""
        size = self.model.image_encoder.img_size
        if (
            transformed_image.dim() != 4
            or transformed_image.shape[:2] != (1, 3)
            or max(transformed_image.shape[2:]) != size
        ):
            raise ValueError(
                f"set_torch_image takes a 1x3xHxW tensor with longest side {size}, "
                f"got shape {tuple(transformed_image.shape)}"
            )
        self._encode([transformed_image], [tuple(original_image_size)])

    @torch.no_grad()
    def set_images(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> None:
        """Encode several images in one batched forward pass; image 0 becomes current."""
        if len(images) == 0:
            raise ValueError("set_images needs at least one image")
        rgb = [as_rgb_uint8(im, f"images[{i}]") for i, im in enumerate(images)]
        self._encode([self._to_input(im, image_format) for im in rgb], [im.shape[:2] for im in rgb])

    def _encode(self, inputs: list[torch.Tensor], original_sizes: list[tuple[int, ...]]) -> None:
        self.reset_image()
        model = self.model
        batch = torch.cat([model.preprocess(x.to(self.device).float()) for x in inputs])
        with self._autocast():
            feats = model.image_encoder(batch)
        self._all_features = feats.float() if self.autocast_dtype is not None else feats
        self._sizes = [
            ((int(o[0]), int(o[1])), (int(x.shape[2]), int(x.shape[3])))
            for o, x in zip(original_sizes, inputs)
        ]
        self.select(0)

    def select(self, index: int) -> None:
        """Make image `index` of the last `set_images` call the current one."""
        if self._all_features is None:
            raise RuntimeError("An image must be set with .set_image(...) before selecting.")
        n = len(self._sizes)
        if not -n <= index < n:
            raise IndexError(f"image index {index} out of range for {n} images")
        index %= n
        self.features = self._all_features[index : index + 1]
        self.original_size, self.input_size = self._sizes[index]
        self.orig_h, self.orig_w = self.original_size
        self.input_h, self.input_w = self.input_size
        self.is_image_set = True

    @property
    def num_images(self) -> int:
        return len(self._sizes)

    def get_image_embedding(self) -> torch.Tensor:
        """Embeddings of the set image(s): (N, C, h, w), N = number of images set."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self._all_features

    # ------------------------------------------------------------------ prompts
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks (C, H, W), their predicted IoUs (C,) and low-res logits (C, 4h, 4w) for
        prompts in original image pixels."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        dev = self.device
        coords = labels = boxes = masks = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied with point_coords")
            pc = np.asarray(point_coords, dtype=float).reshape(-1, 2)
            pl = np.asarray(point_labels).reshape(-1)
            if len(pc) != len(pl):
                raise ValueError(f"{len(pc)} point_coords but {len(pl)} point_labels")
            coords = torch.as_tensor(
                self.transform.apply_coords(pc, self.original_size), dtype=torch.float, device=dev
            )[None]
            labels = torch.as_tensor(pl, dtype=torch.int, device=dev)[None]
        if box is not None:
            b = self.transform.apply_boxes(np.asarray(box, dtype=float).reshape(-1, 4), self.original_size)
            boxes = torch.as_tensor(b, dtype=torch.float, device=dev)[None, :]
        if mask_input is not None:
            masks = torch.as_tensor(np.asarray(mask_input), dtype=torch.float, device=dev)[None]
        out, iou, low = self.predict_torch(coords, labels, boxes, masks, multimask_output, return_logits)
        return (
            out[0].detach().cpu().numpy(),
            iou[0].detach().float().cpu().numpy(),
            low[0].detach().float().cpu().numpy(),
        )

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction with prompts already in the resized input frame (see
        `self.transform`): masks (B, C, H, W), IoUs (B, C), low-res logits (B, C, 4h, 4w)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        low_res, iou = self.decode_low_res(
            point_coords, point_labels, boxes, mask_input, multimask_output
        )
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    @torch.no_grad()
    def decode_low_res(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder only: low-res logits and IoU predictions (fp32)."""
        points = (point_coords, point_labels) if point_coords is not None else None
        pe = self.model.prompt_encoder
        with self._autocast():
            sparse, dense = pe(points=points, boxes=boxes, masks=mask_input)
            low_res, iou = self.model.mask_decoder(
                image_embeddings=self.features,
                image_pe=pe.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
        return low_res.float(), iou.float()

    @torch.no_grad()
    def decode_above(
        self, point_coords: torch.Tensor, point_labels: torch.Tensor, iou_thresh: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Multimask decoding that upscales only the masks whose predicted IoU exceeds
        `iou_thresh` (the IoU head needs only the transformer's tokens, the upscaling is
        half the decoder's cost). Returns their low-res logits (K, 4h, 4w), IoUs (K,) and
        flat indices prompt * 3 + output, in that (the reference's) order."""
        pe = self.model.prompt_encoder
        dec = self.model.mask_decoder
        n = point_coords.shape[0]
        _, _, h, w = self.features.shape
        # on the CPU a few prompts at a time: their image tokens stay small and reused
        chunk = runtime.decoder_chunk(h * w, self.features.shape[1], self.features.device) or n
        ious, lows, all_rows = [], [], []
        with self._autocast():
            image_pe = pe.get_dense_pe()
            for s in range(0, n, chunk):
                sparse, dense = pe(
                    points=(point_coords[s : s + chunk], point_labels[s : s + chunk]),
                    boxes=None,
                    masks=None,
                )
                tokens, src = dec.run_transformer(self.features, image_pe, sparse, dense)
                iou = dec.predict_iou(tokens)[:, 1:]
                rows = (iou > iou_thresh).any(dim=1).nonzero()[:, 0]
                ious.append(iou)
                all_rows.append(rows + s)
                if len(rows):
                    wanted = list(range(1, dec.num_mask_tokens))
                    lows.append(dec.upscale_masks(src[rows], tokens[rows], wanted))
                del tokens, src
        iou = torch.cat(ious)
        rows = torch.cat(all_rows)
        keep = iou > iou_thresh
        low = torch.cat(lows) if lows else iou.new_zeros(0, iou.shape[1], 4 * h, 4 * w)
        flat = keep[rows]
        n_out = iou.shape[1]
        index = (rows[:, None] * n_out + torch.arange(n_out, device=rows.device))[flat]
        return low[flat].float(), iou[rows][flat], index
