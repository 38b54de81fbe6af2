"""The layer inside a ``flax.linen`` model, through ``flax.nnx.bridge``: the
same output as the NNX layer holding the same parameters, and gradients for
every parameter (docs/configuration.md, "Inside a Linen model")."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusedmoe import MoE, MoEConfig


class LinenBlock(nn.Module):
    """A residual Linen block around the MoE layer."""

    config: MoEConfig

    @nn.compact
    def __call__(self, x):
        out, aux = nnx.bridge.to_linen(MoE, self.config, name="moe")(nn.LayerNorm()(x))
        return x + out, aux["aux_loss"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_moe_in_a_linen_model(fused):
    cfg = MoEConfig(num_experts=4, emb_dim=8, mlp_dim=16, fused_moe_mlp=fused,
                    shared_experts=1, load_balance_loss_weight=0.01)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    model = LinenBlock(cfg)
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    assert params["moe"]["wi" if fused else "wi_0"].shape[0] == 4
    y, aux_loss = jax.jit(model.apply)(variables, x)

    # The same numbers as the NNX layer holding these parameters.
    layer = MoE.from_state(cfg, params["moe"])
    normed = nn.LayerNorm().apply({"params": params["LayerNorm_0"]}, x)
    want, want_aux = layer(normed)
    np.testing.assert_allclose(y, x + want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux_loss, want_aux["aux_loss"], rtol=1e-5)

    def loss(v):
        out, aux = model.apply(v, x)
        return jnp.sum(out**2) + aux

    grads = jax.jit(jax.grad(loss))(variables)["params"]["moe"]
    for name, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and np.any(g != 0), name
