"""torch.compile of models holding LEM: the fused backends are torch.library operators, so the layer
traces into the graph without a break and the compiled model gives the eager results."""
import pytest
import torch
import torch._dynamo
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import lem
from lem import kernels
from asserts import assert_compiled_is_eager


def test_compiled_stack_is_eager_on_the_fused_cpu_path():
    assert_compiled_is_eager("cpp")


def test_inductor_compiles_the_fhn_model_in_one_graph():
    """The FitzHugh-Nagumo model (lem.RNNModel, H 16, a head at every step) with torch.compile's
    default compiler: forward and backward compiled, no graph break, the eager results."""
    torch.manual_seed(0)
    model = lem.RNNModel("lem", 1, 16, 1, head="every")
    x = torch.randn(20, 4, 1)
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for m in (compiled, model):
        out = m(x)
        results.append([out, *torch.autograd.grad(out.square().sum(), list(model.parameters()))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_packed_input_breaks_the_graph_only_to_pad_and_pack():
    """Padding and packing have data-dependent shapes: they run eagerly, a graph break on each side
    of the layers, which compile into one graph; the results are the eager ones."""
    torch.manual_seed(0)
    layer = lem.LEM(3, 8, bidirectional=True, dt=0.6)
    packed = pack_sequence([torch.randn(n, 3) for n in (3, 7, 1, 5)], enforce_sorted=False)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(packed)
    assert explained.break_reasons
    for reason in explained.break_reasons:  # each at a call of _padded or _packed (_eager_when_compiled's run)
        assert [f.name for f in reason.user_stack][-2:] == ["_forward_packed", "run"], reason
    assert [n.target for g in explained.graphs for n in g.graph.nodes].count(torch.ops.lem.cpu_forward.default) == 2
    out, (y, z) = torch.compile(layer, backend="aot_eager")(packed)
    eager_out, (eager_y, eager_z) = layer(packed)
    assert torch.equal(pad_packed_sequence(out)[0], pad_packed_sequence(eager_out)[0])
    assert torch.equal(y, eager_y) and torch.equal(z, eager_z)


def test_the_backend_choice_is_a_constant_to_torch_compile():
    """kernels.resolve carries what torch.compiler.assume_constant_result sets (set by hand there, so
    that importing lem does not import torch._dynamo): if torch changes that, this fails."""
    marked = torch.compiler.assume_constant_result(lambda: None)
    assert vars(marked) and all(getattr(kernels.resolve, k, None) == v for k, v in vars(marked).items())


def test_eager_calls_do_not_import_torch_dynamo():
    """Outside torch.compile the fused CPU path calls its functions without the operator around
    them: calling a torch.library operator imports torch._dynamo, ~1.7 s of every run's start."""
    import subprocess
    import sys
    code = ("import sys, torch, lem\n"
            "layer = lem.LEM(2, 4, backend='cpp')\n"
            "layer(torch.randn(5, 3, 2))[0].sum().backward()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
