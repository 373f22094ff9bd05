"""One gradient check shared by the test files: jax.grad against central differences."""
import jax
import jax.numpy as jnp
import numpy as np


def assert_grad_matches_finite_differences(loss, w, directions: int = 3, h: float = 1e-3, tol: float = 2e-2):
    """The jitted gradient of ``loss`` at ``w`` is finite and matches central finite
    differences along ``directions`` random directions."""
    g = jax.jit(jax.grad(loss))(w)
    assert np.all(np.isfinite(g))
    rng = np.random.default_rng(0)
    for _ in range(directions):
        d = jnp.asarray(rng.normal(size=w.shape), jnp.float32)
        fd = (loss(w + h * d) - loss(w - h * d)) / (2 * h)
        np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=tol, atol=tol)
