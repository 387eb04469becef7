"""torch.compile(fullgraph=True): no graph break in any scheme, and the compiled model equals eager."""

import pytest
import torch

from model import NORM_SCHEMES
from reference import build, tiny_config, tokens


def check_compiled_equals_eager(arch, norm_scheme, **overrides):
    torch._dynamo.reset()
    model = build(tiny_config(arch, norm_scheme, n_layer=3, **overrides))
    idx = tokens(model.config)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
    logits, loss = compiled(idx, idx)
    eager_logits, eager_loss = model(idx, idx)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-4)
    skipped, _, residuals = compiled(idx, skip_layers={2}, return_residuals=True)
    eager_skipped, _, eager_residuals = model(idx, skip_layers={2}, return_residuals=True)
    torch.testing.assert_close(skipped, eager_skipped, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(residuals[-1], eager_residuals[-1], rtol=1e-4, atol=1e-4)


def test_lns_compiles_without_graph_breaks_and_equals_eager():
    check_compiled_equals_eager('llama', 'lns')


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['gpt', 'llama'])
@pytest.mark.parametrize('norm_scheme', NORM_SCHEMES)
def test_every_scheme_compiles_without_graph_breaks_and_equals_eager(arch, norm_scheme):
    check_compiled_equals_eager(arch, norm_scheme)


@pytest.mark.slow
@pytest.mark.parametrize('overrides', [dict(norm_scheme='lns', lns_position='sublayer'), dict(layerscale=True),
                                       dict(skipinit=True, norm_scheme='peri')])
def test_residual_alternatives_compile_without_graph_breaks(overrides):
    check_compiled_equals_eager('llama', **{'norm_scheme': 'pre', **overrides})
