"""Storage of frozen projection weights in 4 bits (NF4) or 8 bits (int8), for QLoRA.

A projection weight is viewed per layer as a matrix W [in, out] (its input dims
flattened, then its output dims). Quantisation works in blocks of consecutive input rows
of one output column, which are the blocks bitsandbytes forms over a torch weight
[out, in] (64 consecutive inputs of one output row):

    nf4   blocks of 64 rows; absmax a = max |W| over the block (float32);
          code = the index of the NF4 value nearest W / a (midpoint buckets);
          two codes per byte, the even row in the high nibble:  codes [in/2, out] uint8
    int8  one block spanning the whole input axis (per output channel);
          code = round(127 W / a):                              codes [in, out] int8

    absmax [in/block, out] float32;  dequantised W = value(code) * a   (nf4: NF4[code] a,
    int8: code a / 127), computed in float32, then cast to the compute dtype.

Every function takes leading batch dims ([..., in, out]), so a stacked [layers, in, out]
parameter and one layer's slice go through the same code. No double quantisation: the
absmax costs 32/64 = 0.5 bit per weight on top of NF4's 4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("nf4", "int8")
NF4_BLOCK = 64

# bitsandbytes' NF4 code values (normal quantiles), index 0..15.
NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip
_NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2


def block_rows(kind: str, rows: int) -> int:
    """Input rows per absmax block: 64 for nf4, the whole input axis for int8."""
    return NF4_BLOCK if kind == "nf4" else rows


def rows_per_code(kind: str) -> int:
    """Input rows stored in one code element: 2 for nf4 (two per byte), 1 for int8."""
    return 2 if kind == "nf4" else 1


def check_rows(kind: str, rows: int, name: str) -> None:
    """ValueError unless a weight with ``rows`` input rows can be stored as ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r}; supported: {', '.join(KINDS)}")
    if kind == "nf4" and rows % NF4_BLOCK:
        raise ValueError(
            f"nf4 quantization needs every projection's input size to be a multiple of "
            f"{NF4_BLOCK}; {name} has {rows}"
        )


def storage(kind: str, lead: tuple[int, ...], rows: int, cols: int) -> dict[str, tuple]:
    """{"codes": (shape, dtype), "absmax": (shape, dtype)} of a [*lead, rows, cols] weight."""
    code_dtype = np.uint8 if kind == "nf4" else np.int8
    return {
        "codes": ((*lead, rows // rows_per_code(kind), cols), code_dtype),
        "absmax": ((*lead, rows // block_rows(kind, rows), cols), np.float32),
    }


def quantize(weight: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """(codes, absmax) of ``weight`` [..., in, out] (see the module docstring)."""
    w = jnp.asarray(weight, jnp.float32)
    *lead, rows, cols = w.shape
    block = block_rows(kind, rows)
    blocks = w.reshape(*lead, rows // block, block, cols)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)
    scaled = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None, :]
    if kind == "int8":
        codes = jnp.round(scaled * 127).astype(jnp.int8).reshape(w.shape)
        return codes, absmax
    index = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), jnp.clip(scaled, -1.0, 1.0))
    index = index.astype(jnp.uint8).reshape(*lead, rows // 2, 2, cols)
    return (index[..., 0, :] << 4) | index[..., 1, :], absmax


def dequantize(codes: jax.Array, absmax: jax.Array, kind: str, dtype) -> jax.Array:
    """W [..., in, out] in ``dtype`` from its codes and block absmax."""
    *lead, stored, cols = codes.shape
    if kind == "int8":
        values = codes.astype(jnp.float32) / 127
    else:
        index = jnp.stack([codes >> 4, codes & 15], axis=-2).reshape(*lead, 2 * stored, cols)
        values = jnp.asarray(NF4)[index.astype(jnp.int32)]
    rows = values.shape[-2]
    blocks = values.reshape(*lead, absmax.shape[-2], rows // absmax.shape[-2], cols)
    return (blocks * absmax[..., None, :]).reshape(*lead, rows, cols).astype(dtype)
