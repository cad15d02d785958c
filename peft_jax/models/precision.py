"""bfloat16 matrix products with float32 accumulation, in the forward and the backward pass.

On CPUs with AVX512-BF16 (and on accelerators) a bf16 x bf16 product runs at full speed only
when it accumulates into float32 (``preferred_element_type=float32``); a bf16-output product
runs at float32 speed. Plain autodiff of such a product differentiates into float32 x bf16
products, i.e. float32 speed again. ``mixed_einsum`` has its own backward pass: the incoming
cotangent is rounded to bf16 and both gradient products are bf16 x bf16 -> float32, so the
backward pass runs as fast as the forward. Gradients are returned in each operand's own
dtype: a float32 master weight receives a float32 gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixed_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(spec, a, b)`` computed in bf16 with a float32 result.

    Every index of an operand must appear in the other operand or in the output (true of
    linear layers and attention), so each gradient is again one two-operand einsum.
    """
    return _product(spec, a, b)


def _forward(spec, a, b):
    return _product(spec, a, b), (a, b)


def _gradient(out: str, first: tuple[str, jax.Array], second: tuple[str, jax.Array]) -> jax.Array:
    """One gradient product, with the operand whose free indices lead the result as the left one.

    XLA:CPU runs bf16 x bf16 -> float32 products in its library kernels, but not in its
    fallback, which it takes for some transposed output layouts ("Unsupported element type
    for DotThunk"); putting the operands in the result's order avoids those layouts.
    """
    (spec_1, x_1), (spec_2, x_2) = first, second

    def lead(spec: str, other: str) -> int:
        return min((out.index(c) for c in spec if c in out and c not in other), default=len(out))

    if lead(spec_2, spec_1) < lead(spec_1, spec_2):
        (spec_1, x_1), (spec_2, x_2) = (spec_2, x_2), (spec_1, x_1)
    return _product(f"{spec_1},{spec_2}->{out}", x_1, x_2)


def _backward(spec, residuals, g):
    a, b = residuals
    inputs, out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    grad_a = _gradient(spec_a, (out, g), (spec_b, b)).astype(a.dtype)
    grad_b = _gradient(spec_b, (out, g), (spec_a, a)).astype(b.dtype)
    return grad_a, grad_b


mixed_einsum.defvjp(_forward, _backward)
