"""The packed (Mallat) layout of a multi-level 2-D DWT, shared by the image processor and the model.

`pixel_values` of WaveCLIP hold the coefficients of `L` levels packed into one (B, C, S, S) array exactly
as `pywt.coeffs_to_array` packs `pywt.wavedec2`'s output (no padding needed for even sizes):

    +------+------+------------+
    | A_L  | V_L  |            |
    +------+------+    V_1     |      A_L: approximation of the coarsest level, (S/2^L)^2
    | H_L  | D_L  |            |      H_j, V_j, D_j: detail subbands of level j, (S/2^j)^2
    +------+------+------------+      (pywt's cH / cV / cD = keys 'da' / 'ad' / 'dd')
    |             |            |
    |     H_1     |    D_1     |
    |             |            |
    +-------------+------------+

so H_j sits bottom-left, V_j top-right and D_j bottom-right of the (S/2^(j-1))^2 square.
Keeping an image-shaped tensor means every tool that moves `pixel_values` (pipelines, collators,
`datasets.map`) keeps working unchanged.
"""

import torch


#: Orientation names in the order pywt / ptwt return the detail tuple of one level.
ORIENTATIONS = ("horizontal", "vertical", "diagonal")


def check_packable(size: int, levels: int) -> None:
    """Raise a `ValueError` unless a `size` x `size` image splits evenly into `levels` DWT levels."""
    if levels < 1:
        raise ValueError(f"`levels` must be at least 1, got {levels}.")
    if size % (2**levels) != 0:
        raise ValueError(
            f"An image of size {size} cannot be packed with {levels} DWT levels: the size must be divisible by "
            f"2**levels = {2**levels}. Choose another `image_size` or fewer `levels`."
        )


def pack_coefficients(coefficients: list) -> torch.Tensor:
    """Pack `ptwt.wavedec2` output into one image-shaped tensor.

    Args:
        coefficients: `[A_L, (H_L, V_L, D_L), ..., (H_1, V_1, D_1)]`, each of shape (..., n_j, n_j) with
            n_j = S / 2^j.

    Returns:
        Tensor of shape (..., S, S) in the Mallat layout of `pywt.coeffs_to_array`.
    """
    packed = coefficients[0]
    for horizontal, vertical, diagonal in coefficients[1:]:
        top = torch.cat([packed, vertical], dim=-1)
        bottom = torch.cat([horizontal, diagonal], dim=-1)
        packed = torch.cat([top, bottom], dim=-2)
    return packed


def unpack_coefficients(packed: torch.Tensor, levels: int) -> list:
    """Inverse of `pack_coefficients`.

    Args:
        packed: (..., S, S) tensor in the Mallat layout.
        levels: number of DWT levels L it holds.

    Returns:
        `[A_L, (H_L, V_L, D_L), ..., (H_1, V_1, D_1)]`, views into `packed` (level j subbands are
        (..., S/2^j, S/2^j)): the structure `ptwt.waverec2` takes.
    """
    size = packed.shape[-1]
    check_packable(size, levels)
    n = size >> levels
    coefficients = [packed[..., :n, :n]]
    for _ in range(levels):
        horizontal = packed[..., n : 2 * n, :n]
        vertical = packed[..., :n, n : 2 * n]
        diagonal = packed[..., n : 2 * n, n : 2 * n]
        coefficients.append((horizontal, vertical, diagonal))
        n *= 2
    return coefficients
